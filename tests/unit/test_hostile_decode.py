"""Hostile and odd input values through ``decode_input``: every value either decodes to a text the rest
of the pipeline can carry (UTF-8 encodable, non-empty, within the limits) or raises ``BadMessage`` with
a known reason; nothing else escapes (a crash here would stop the worker)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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

MAX_BYTES, MAX_CHARS = 200_000, 100_000


def outcome(value: bytes | None, fmt: str = "auto") -> Decoded | BadMessage:
    """decode_input's answer; any exception other than BadMessage fails the test."""
    try:
        return decode_input(value, input_format=fmt, max_message_bytes=MAX_BYTES,  # type: ignore[arg-type]
                            max_text_chars=MAX_CHARS)
    except BadMessage as e:
        return e


def check_carriable(result: Decoded | BadMessage, key: bytes | None = b"k") -> None:
    """A decoded text must survive the rest of the pipeline: an output record built from it serialises."""
    if isinstance(result, BadMessage):
        assert result.reason in DEAD_LETTER_REASONS, result.reason
        msg = InputMessage("t", 0, 1, key, b"v", [])
        headers = dead_letter_headers(msg, result.reason, result.detail, "r")
        assert len(dict(headers)["elbert.detail"]) <= 4096
        return
    assert result.text.strip() and len(result.text) <= MAX_CHARS
    result.text.encode("utf-8")  # no lone surrogates
    msg = InputMessage("t", 0, 1, key, b"v", [])
    msg.id = result.id
    probs = [0.5, 0.5]
    pred = Prediction(request_id="r", label="a", label_index=0, probabilities=probs, exit_depth=1,
                      exit_reason="max_depth", trace=[DepthTrace(1, 0, 0.5, 1.0)], queue_s=0.0, compute_s=0.0)
    rec = output_record(msg, pred, model_name="m", model_version="1", replica_id="r")
    assert OutputRecord.from_bytes(rec.to_bytes()).id == result.id


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
odd_text = st.text(st.characters(codec="utf-8") | st.sampled_from("\x00\x07\x1b\u202e\u200f\ufeff\u0627"),
                   max_size=200)
json_objects = st.fixed_dictionaries({}, optional={"text": odd_text | json_value, "id": json_value,
                                                    "extra": json_value})


@settings(max_examples=300, deadline=None)
@given(value=st.none() | st.binary(max_size=300), fmt=st.sampled_from(["auto", "text", "json"]),
       key=st.none() | st.binary(max_size=20))
def test_any_bytes_decode_or_dead_letter(value: bytes | None, fmt: str, key: bytes | None) -> None:
    check_carriable(outcome(value, fmt), key)


@settings(max_examples=300, deadline=None)
@given(obj=json_objects, fmt=st.sampled_from(["auto", "json"]))
def test_json_of_any_schema_decodes_or_dead_letters(obj: dict[str, Any], fmt: str) -> None:
    result = outcome(json.dumps(obj).encode(), fmt)
    check_carriable(result)
    text = obj.get("text")
    if isinstance(text, str) and text.strip():
        assert isinstance(result, Decoded) and result.text == text  # extra fields are ignored
    elif not isinstance(text, str):
        assert isinstance(result, BadMessage) and result.reason == "no_text"


@settings(max_examples=200, deadline=None)
@given(text=odd_text)
def test_control_and_rtl_text_is_kept_verbatim(text: str) -> None:
    result = outcome(text.encode("utf-8"), "text")
    if text.strip():
        assert isinstance(result, Decoded) and result.text == text
    else:
        assert isinstance(result, BadMessage) and result.reason == "empty"


@pytest.mark.parametrize(("value", "reason"), [
    (b'{"text": "x", "a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "bad_json"),  # nesting bomb
    (b"{\"a\":" * 30_000 + b"1" + b"}" * 30_000, "bad_json"),
    (b'{"text": "\\ud800 lone surrogate"}', "not_utf8"),
    (b'{"text": "ok", "id": "\\udfff"}', "not_utf8"),
    (b"\xed\xa0\x80 encoded surrogate", "not_utf8"),
    (b"z" * (MAX_BYTES + 1), "too_large"),
    (b"w" * (MAX_CHARS + 1), "text_too_long"),
    (b"", "empty"),
    (None, "null_value"),
])
def test_hostile_values_get_their_reason_quickly(value: bytes | None, reason: str) -> None:
    t0 = time.perf_counter()
    result = outcome(value)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(result, BadMessage) and result.reason == reason, result


def test_huge_array_and_long_text_within_limits_decode() -> None:
    arr = b'{"text": "shares rose", "id": 7, "extra": [' + b"1," * 60_000 + b'1]}'
    assert outcome(arr) == Decoded("shares rose", 7)
    long = "\u0627\u0644 " * (MAX_CHARS // 3)
    assert outcome(long.encode()) == Decoded(long)


def test_garbage_headers_are_carried_without_crashing() -> None:
    headers = [("traceparent", b"\xff\xfe not a trace"), ("tracestate", b""), ("\u202ex", b"\x00" * 10_000)]
    msg = InputMessage("t", 0, 3, b"\xff", b"v", headers)
    assert trace_headers(msg) == headers[:2]
    parsed = parse_headers(dead_letter_headers(msg, "empty", "d", "r"))
    assert parsed["elbert.source.offset"] == "3" and parsed["traceparent"] == "\\xff\\xfe not a trace"
