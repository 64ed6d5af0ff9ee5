"""``elbert-stream produce`` / ``consume``: feed the input topic, read the results or dead letters.

Connection settings come from ``ELBERT_KAFKA__*`` (bootstrap, security) with ``--bootstrap`` and the
topic flags on top. No torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import IO, Any

from elbert_stream.config import KafkaSettings, Settings
from elbert_stream.stream.records import OutputRecord, parse_headers

log = logging.getLogger(__name__)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="send lines (or JSONL) from FILE or - to the input topic")
    p.add_argument("file", help="a file of one text per line, or - for stdin")
    p.add_argument("--json", action="store_true",
                   help="lines are JSON objects {'text':..,'id':..}, sent verbatim (default: wrap nothing)")
    p.add_argument("--key", default=None, help="key for every record; '{n}' is replaced by the line number")
    p.add_argument("--topic", default=None, help="default: the first of ELBERT_KAFKA__INPUT_TOPICS")
    p.add_argument("--bootstrap", default=None)
    p.set_defaults(func=_produce)
    c = sub.add_parser("consume", help="print output records (or dead letters) as JSON lines")
    c.add_argument("--dead-letters", action="store_true", help="read the dead-letter topic instead")
    c.add_argument("--topic", default=None, help="override the topic to read")
    c.add_argument("--max", type=int, default=None, help="stop after N records")
    c.add_argument("--timeout", type=float, default=10.0, help="stop after this many idle seconds")
    c.add_argument("--bootstrap", default=None)
    c.set_defaults(func=_consume)


def _settings(args: argparse.Namespace) -> KafkaSettings:
    kafka = Settings().kafka
    if args.bootstrap:
        kafka.bootstrap_servers = args.bootstrap
    return kafka


def _produce(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    from elbert_stream.stream.client import client_config

    kafka = _settings(args)
    topic = args.topic or kafka.input_topics[0]
    producer = KafkaProducer(**client_config(kafka), acks="all", linger_ms=5, client_id="elbert-produce")
    stream: IO[str] = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")  # noqa: SIM115
    sent = 0
    try:
        for n, line in enumerate(stream):
            line = line.rstrip("\n")
            if not line:
                continue
            if args.json:
                json.loads(line)  # a clear error for a bad line, before it is sent
            key = args.key.replace("{n}", str(n)).encode() if args.key else None
            producer.send(topic, value=line.encode("utf-8"), key=key)
            sent += 1
        producer.flush()
    finally:
        producer.close()
        if stream is not sys.stdin:
            stream.close()
    log.info("sent %d records to %s", sent, topic)
    return 0


def _consume(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer

    from elbert_stream.stream.client import client_config

    kafka = _settings(args)
    topic = args.topic or (kafka.dead_letter_topic if args.dead_letters else kafka.output_topic)
    consumer = KafkaConsumer(topic, **client_config(kafka), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, isolation_level="read_committed",
                             client_id="elbert-consume")
    seen, idle_since = 0, time.monotonic()
    try:
        while (args.max is None or seen < args.max) and time.monotonic() - idle_since < args.timeout:
            for _, records in consumer.poll(timeout_ms=200).items():
                for r in records:
                    print(json.dumps(_describe(r, args.dead_letters), ensure_ascii=False), flush=True)  # noqa: T201
                    seen += 1
                    idle_since = time.monotonic()
                    if args.max is not None and seen >= args.max:
                        return 0
    finally:
        consumer.close()
    return 0


def _describe(r: Any, dead_letter: bool) -> dict[str, Any]:
    where = {"topic": r.topic, "partition": r.partition, "offset": r.offset}
    if dead_letter:
        value = None if r.value is None else r.value.decode("utf-8", "backslashreplace")
        return {**where, "headers": parse_headers(list(r.headers or [])), "value": value}
    try:
        return {**where, "record": OutputRecord.from_bytes(r.value).model_dump()}
    except ValueError as e:
        return {**where, "error": f"not an elbert output record: {e}"[:300]}
