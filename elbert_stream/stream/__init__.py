"""Kafka in and out: no torch (the worker takes any ``types.EngineLike``) and no Ray.

``client.py`` (client options, bootstrap errors) · ``source.py`` (consumer) · ``sink.py`` (producer) ·
``transactions.py`` (exactly_once) · ``offsets.py`` (what and when to commit) · ``records.py`` (input
decoding, output schema, dead-letter headers) · ``worker.py`` (the loop) with ``loop_stats.py`` and
``sync_jobs.py`` · ``redact.py`` (secrets out of kafka-python's logs) · ``commands.py`` (produce/consume).
"""
