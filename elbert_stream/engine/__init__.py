"""The model and the continuous-batching engine: torch only, no Kafka and no Ray.

``model.py`` (the shared ALBERT layer and exit head) · ``policy.py`` (exit rules) · ``scheduler.py``
(the slot table; no torch) · ``engine.py`` (the step loop) · ``classify.py`` (the one-off command).
"""
