"""Input decoding reasons, the output record schema round-trip, and dead-letter headers."""

from __future__ import annotations

import json

import pytest

from elbert_stream.errors import BadMessage
from elbert_stream.stream.records import (
    DEAD_LETTER_REASONS,
    Decoded,
    InputMessage,
    OutputRecord,
    dead_letter_headers,
    decode_input,
    output_record,
    parse_headers,
    trace_headers,
)
from elbert_stream.types import DepthTrace, Prediction


def decode(value: bytes | None, fmt: str = "auto", max_bytes: int = 1000, max_chars: int = 100) -> Decoded:
    return decode_input(value, input_format=fmt, max_message_bytes=max_bytes, max_text_chars=max_chars)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "fmt", "reason"),
    [
        (None, "auto", "null_value"),
        (b"\xff\xfehello", "auto", "not_utf8"),
        (b"", "text", "empty"),
        (b"   \n\t", "auto", "empty"),
        (b"x" * 1001, "text", "too_large"),
        (b"y" * 101, "text", "text_too_long"),
        (b"not json", "json", "bad_json"),
        (b"[1, 2]", "json", "bad_json"),
        (b'{"id": 3}', "json", "no_text"),
        (b'{"text": 5}', "auto", "no_text"),
        (b'{"text": "   "}', "json", "empty"),
    ],
)
def test_bad_input_reasons(value: bytes | None, fmt: str, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        decode(value, fmt)
    assert info.value.reason == reason
    assert reason in DEAD_LETTER_REASONS
    assert info.value.detail  # every reason explains itself


def test_good_inputs() -> None:
    assert decode(b"plain words") == Decoded("plain words")
    assert decode("caf\u00e9".encode()) == Decoded("caf\u00e9")
    assert decode(b'{"text": "hi", "id": "a-1"}') == Decoded("hi", "a-1")
    assert decode(b'{"text": "hi", "id": 7}', "json") == Decoded("hi", 7)
    assert decode(b'{"text": "hi", "id": true}', "json") == Decoded("hi", None)
    # text mode keeps JSON-looking values verbatim; auto falls back to text for non-objects
    assert decode(b'{"text": "hi"}', "text") == Decoded('{"text": "hi"}')
    assert decode(b"{not json", "auto") == Decoded("{not json")
    assert decode(b"[1, 2]", "auto") == Decoded("[1, 2]")


def test_not_utf8_detail_quotes_the_bytes() -> None:
    with pytest.raises(BadMessage) as info:
        decode(b"abc\xc3\x28def")
    assert "byte 3" in info.value.detail and "\\xc3" in info.value.detail


def _msg() -> InputMessage:
    return InputMessage(topic="in", partition=2, offset=41, key=b"k\xff1", value=b"hello",
                        headers=[("traceparent", b"00-aa-bb-01"), ("tracestate", b"x=1"), ("other", b"z")],
                        timestamp_ms=1_000, polled_s=10.0, id="doc-1")


def _pred() -> Prediction:
    trace = [DepthTrace(1, 0, 0.5, 0.9), DepthTrace(2, 1, 0.8, 0.4)]
    return Prediction(request_id="r1", label="sport", label_index=1, probabilities=[0.2, 0.8],
                      exit_depth=2, exit_reason="window", trace=trace, queue_s=0.004, compute_s=0.01)


def test_output_record_round_trip() -> None:
    rec = output_record(_msg(), _pred(), model_name="bbc-elbert", model_version="1", replica_id="r-0",
                        now_ms=1_250, now_s=10.5)
    data = json.loads(rec.to_bytes())
    assert data["schema_version"] == 1
    assert (data["topic"], data["partition"], data["offset"]) == ("in", 2, 41)
    assert data["key"] == "k\\xff1" and data["id"] == "doc-1"
    assert data["label"] == "sport" and data["exit_depth"] == 2 and data["exit_reason"] == "window"
    assert [t["depth"] for t in data["trace"]] == [1, 2]
    assert data["queue_ms"] == pytest.approx(4.0) and data["compute_ms"] == pytest.approx(10.0)
    assert data["worker_ms"] == pytest.approx(500.0) and data["end_to_end_ms"] == pytest.approx(250.0)
    assert OutputRecord.from_bytes(rec.to_bytes()) == rec


def test_output_record_rejects_other_schema_versions() -> None:
    rec = output_record(_msg(), _pred(), model_name="m", model_version="0", replica_id="r")
    data = json.loads(rec.to_bytes())
    data["schema_version"] = 2
    with pytest.raises(ValueError, match="schema_version"):
        OutputRecord.model_validate(data)


def test_headers() -> None:
    msg = _msg()
    assert trace_headers(msg) == [("traceparent", b"00-aa-bb-01"), ("tracestate", b"x=1")]
    h = parse_headers(dead_letter_headers(msg, "bad_json", "Expecting value", "replica-3"))
    assert h["elbert.reason"] == "bad_json" and h["elbert.detail"] == "Expecting value"
    source = (h["elbert.source.topic"], h["elbert.source.partition"], h["elbert.source.offset"])
    assert source == ("in", "2", "41")
    assert h["elbert.replica"] == "replica-3" and h["traceparent"] == "00-aa-bb-01"
    assert msg.where == "in[2]@41"
