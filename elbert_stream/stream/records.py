"""Kafka record codec: input decoding (with dead-letter reasons), the output record schema, headers.

No Kafka client here: these are pure functions over bytes, so they are unit-tested without a broker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Literal

import orjson
from pydantic import BaseModel, Field

from elbert_stream.errors import BadMessage
from elbert_stream.types import TRACE_HEADERS, Headers, Prediction

SCHEMA_VERSION = 1
DEAD_LETTER_REASONS = (  # decode_input's, the worker's (tokenizer, producer) and Engine.add's
    "not_utf8", "empty", "null_value", "too_large", "text_too_long", "bad_json", "no_text",
    "tokenizer_error", "output_rejected", "too_long", "bad_token_id",
)


@dataclass(slots=True)
class InputMessage:
    """One polled input record plus what the worker learns about it on the way.

    ``epoch`` is the OffsetTracker's assignment epoch of the partition when it was polled (acks
    from an older epoch are ignored). Times: ``polled_s`` is ``time.monotonic()``;
    ``timestamp_ms`` is the record's Kafka timestamp (epoch ms, -1 when unknown).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int = -1
    epoch: int = 0
    polled_s: float = field(default_factory=time.monotonic)
    # a value too large to produce again, released as soon as the record is known bad (the dead letter
    # omits it; ``KafkaSink.shed_value``): its size, for ``elbert.value_omitted``
    shed_value_bytes: int | None = None
    id: str | int | None = None  # the JSON input's "id", once decoded

    @property
    def where(self) -> str:
        """``topic[partition]@offset``, the form every log line uses."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True, slots=True)
class Decoded:
    text: str
    id: str | int | None = None


def decode_input(value: bytes | None, *, input_format: Literal["text", "json", "auto"],
                 max_message_bytes: int, max_text_chars: int) -> Decoded:
    """Input value bytes -> text (and optional id). Raises BadMessage with a reason in
    DEAD_LETTER_REASONS. ``auto``: a value that parses as a JSON object is JSON, anything else text.
    """
    if value is None:
        raise BadMessage("null_value", "the record has a null value (tombstone)")
    if len(value) > max_message_bytes:
        raise BadMessage("too_large", f"value is {len(value)} bytes > max_message_bytes={max_message_bytes}")
    try:
        raw = value.decode("utf-8")
    except UnicodeDecodeError as e:
        around = value[max(0, e.start - 8):e.start + 8]
        raise BadMessage("not_utf8", f"{e.reason} at byte {e.start}: {around!r}") from None
    decoded = _decode_text(raw, input_format)
    if not decoded.text.strip():
        raise BadMessage("empty", f"no text in {_quote(raw)}")
    if len(decoded.text) > max_text_chars:
        raise BadMessage("text_too_long",
                         f"text has {len(decoded.text)} chars > max_text_chars={max_text_chars}")
    return decoded


def _decode_text(raw: str, input_format: str) -> Decoded:
    stripped = raw.lstrip()
    if input_format == "text" or (input_format == "auto" and not stripped.startswith("{")):
        return Decoded(raw)
    try:
        obj = json.loads(raw)
    except RecursionError:  # a JSON bomb: nesting deeper than the interpreter's recursion limit
        raise BadMessage("bad_json", f"JSON nested too deeply to parse: {_quote(raw)}") from None
    except ValueError as e:
        if input_format == "auto":
            return Decoded(raw)  # looked like JSON but is not: treat it as text
        raise BadMessage("bad_json", f"{e}: {_quote(raw)}") from None
    if not isinstance(obj, dict):
        if input_format == "auto":
            return Decoded(raw)
        raise BadMessage("bad_json", f"expected a JSON object, got {type(obj).__name__}: {_quote(raw)}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise BadMessage("no_text", f"JSON has no string 'text' (got {type(text).__name__}): {_quote(raw)}")
    rid = obj.get("id")
    rid = rid if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
    for name, s in (("text", text), ("id", rid)):
        if isinstance(s, str) and not _encodable(s):  # a \ud800-style escape: no UTF-8 output possible
            raise BadMessage("not_utf8", f"JSON '{name}' holds a lone surrogate: {_quote(raw)}")
    return Decoded(text, rid)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _quote(raw: str, limit: int = 80) -> str:
    return repr(raw if len(raw) <= limit else raw[:limit] + "...")


# ---- output ----------------------------------------------------------------------------------
class TraceStep(BaseModel):
    depth: int = Field(description="1-based shared-layer applications")
    label_index: int
    top_prob: float
    entropy: float = Field(description="normalised entropy H(p)/log K in [0, 1]")


class OutputRecord(BaseModel):
    """The value written to the output topic (JSON). Version 1; fields are only ever added."""

    schema_version: Literal[1] = 1
    topic: str = Field(description="input topic")
    partition: int = Field(description="input partition")
    offset: int = Field(description="input offset")
    key: str | None = Field(description="input key as UTF-8 (bad bytes escaped); the Kafka key is copied")
    id: str | int | None = Field(None, description="the JSON input's 'id', if any")
    label: str
    label_index: int
    probabilities: list[float] = Field(description="final exit-head softmax, one per label")
    exit_depth: int = Field(description="shared-layer applications before the exit")
    exit_reason: str = Field(description="entropy | window | patience | max_depth")
    trace: list[TraceStep] = Field(description="what the exit head said at each depth up to exit_depth")
    model_name: str
    model_version: str
    queue_ms: float = Field(description="engine: arrival -> admitted into a slot")
    compute_ms: float = Field(description="engine: admitted -> exited")
    worker_ms: float = Field(description="polled by the worker -> output produced")
    end_to_end_ms: float | None = Field(description="input record timestamp -> output produced (None: none)")
    replica_id: str
    produced_ms: int = Field(description="epoch milliseconds when the output was produced")
    gear: int = Field(0, description="exit gear that produced it: 0 = the default exit settings (always "
                      "with adaptive exit off); k > 0 = the k-th looser gear of the model's gears.json")

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> OutputRecord:
        return cls.model_validate_json(data)


def output_record(msg: InputMessage, pred: Prediction, *, model_name: str, model_version: str,
                  replica_id: str, now_ms: int | None = None, now_s: float | None = None,
                  gear: int = 0) -> OutputRecord:
    """The output record for ``pred``, the prediction made for input ``msg`` at exit gear ``gear``."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    now_s = time.monotonic() if now_s is None else now_s
    return OutputRecord(
        topic=msg.topic, partition=msg.partition, offset=msg.offset,
        key=None if msg.key is None else msg.key.decode("utf-8", "backslashreplace"),
        id=msg.id, label=pred.label, label_index=pred.label_index, probabilities=pred.probabilities,
        exit_depth=pred.exit_depth, exit_reason=pred.exit_reason,
        trace=[TraceStep(depth=t.depth, label_index=t.label_index, top_prob=t.top_prob, entropy=t.entropy)
               for t in pred.trace],
        model_name=model_name, model_version=model_version,
        queue_ms=pred.queue_s * 1e3, compute_ms=pred.compute_s * 1e3,
        worker_ms=(now_s - msg.polled_s) * 1e3,
        end_to_end_ms=float(now_ms - msg.timestamp_ms) if msg.timestamp_ms >= 0 else None,
        replica_id=replica_id, produced_ms=now_ms, gear=gear,
    )


def encode_output(msg: InputMessage, pred: Prediction, *, model_name: str, model_version: str,
                  replica_id: str, now_ms: int | None = None, now_s: float | None = None,
                  gear: int = 0) -> bytes:
    """``output_record(...).to_bytes()`` without the model objects: the same fields in the same
    order, one dict and orjson (about 5 us a record instead of 26; the output stage's hot path).
    ``OutputRecord.from_bytes`` reads it back; a unit test keeps the two equal."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    now_s = time.monotonic() if now_s is None else now_s
    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "topic": msg.topic, "partition": msg.partition,
        "offset": msg.offset,
        "key": None if msg.key is None else msg.key.decode("utf-8", "backslashreplace"),
        "id": msg.id, "label": pred.label, "label_index": pred.label_index,
        "probabilities": pred.probabilities, "exit_depth": pred.exit_depth, "exit_reason": pred.exit_reason,
        "trace": [{"depth": t.depth, "label_index": t.label_index, "top_prob": t.top_prob,
                   "entropy": t.entropy} for t in pred.trace],
        "model_name": model_name, "model_version": model_version,
        "queue_ms": pred.queue_s * 1e3, "compute_ms": pred.compute_s * 1e3,
        "worker_ms": (now_s - msg.polled_s) * 1e3,
        "end_to_end_ms": float(now_ms - msg.timestamp_ms) if msg.timestamp_ms >= 0 else None,
        "replica_id": replica_id, "produced_ms": now_ms, "gear": gear,
    })


def trace_headers(msg: InputMessage) -> Headers:
    """The W3C trace-context headers of the input, to put on the output."""
    return [(k, v) for k, v in msg.headers if k in TRACE_HEADERS]


def dead_letter_headers(msg: InputMessage, reason: str, detail: str, replica_id: str) -> Headers:
    """Headers of a dead letter: why, and where the original came from (plus its trace context)."""
    return [
        ("elbert.reason", reason.encode()),
        ("elbert.detail", detail.encode("utf-8", "backslashreplace")[:4096]),
        ("elbert.source.topic", msg.topic.encode()),
        ("elbert.source.partition", str(msg.partition).encode()),
        ("elbert.source.offset", str(msg.offset).encode()),
        ("elbert.replica", replica_id.encode()),
        *trace_headers(msg),
    ]


def parse_headers(headers: Headers) -> dict[str, str]:
    """Headers -> {name: text} (last value wins), for printing and tests."""
    return {k: (v or b"").decode("utf-8", "backslashreplace") for k, v in headers}
