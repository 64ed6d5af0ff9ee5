"""Requests that do not come from Kafka (``Worker.classify``'s synchronous jobs) and batch tokenizing
with per-text errors. No Kafka client and no torch here."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from elbert_stream.errors import BadMessage
from elbert_stream.types import Prediction, Request


@dataclass
class SyncJob:
    """Texts submitted by ``Worker.classify``; the loop thread fills ``results`` or fails it."""

    texts: list[str]
    results: list[Prediction | None] = field(default_factory=list)
    error: BaseException | None = None
    _left: int = 0
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.texts)
        self._left = len(self.texts)

    def set(self, index: int, pred: Prediction) -> None:
        with self._lock:
            if self.results[index] is None:
                self.results[index] = pred
                self._left -= 1
            if self._left == 0:
                self._done.set()

    def fail(self, error: BaseException, index: int | None) -> None:
        with self._lock:
            if self.error is None:
                if isinstance(error, BadMessage) and index is not None:
                    error = BadMessage(error.reason, f"text {index}: {error.detail}")
                self.error = error
            self._done.set()

    def wait(self, timeout_s: float) -> list[Prediction]:
        if not self._done.wait(timeout_s):
            self.fail(TimeoutError(f"classify of {len(self.texts)} texts took over {timeout_s}s"), None)
        if self.error is not None:
            raise self.error
        return [p for p in self.results if p is not None]


@dataclass(frozen=True, slots=True)
class SyncRef:
    """``Request.meta`` of a synchronous (not Kafka-backed) request."""

    job: SyncJob
    index: int


def batch_tokenizer(tokenizer: Any, max_length: int) -> Callable[[list[str]], list[list[int]]]:
    """Token ids (special tokens added, truncated to ``max_length``, no padding) for a list of texts,
    in one batch call. A Hugging Face fast tokenizer is called through a private copy of its Rust
    backend (``encode_batch_fast``: no offsets; the same ids as the tokenizer's own call, which costs
    ~1.5x more Python per text); the copy also keeps the caller's thread off the tokenizer the engine
    owns. Anything else is called like a Hugging Face tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return lambda texts: [list(ids) for ids in tokenizer(texts, truncation=True,
                                                             max_length=max_length)["input_ids"]]
    own = copy.deepcopy(backend)
    own.no_padding()
    own.enable_truncation(max_length, stride=0, strategy="longest_first",
                          direction=getattr(tokenizer, "truncation_side", "right"))
    return lambda texts: [e.ids for e in own.encode_batch_fast(texts)]


def tokenize_each(tokenize: Callable[[list[str]], list[list[int]]],
                  texts: list[str]) -> list[list[int] | BadMessage]:
    """Tokenize as one batch; when the batch fails, text by text, so one bad text fails alone
    (as a ``tokenizer_error`` BadMessage in its place)."""
    if not texts:
        return []
    try:
        return list(tokenize(texts))
    except Exception:  # noqa: BLE001 - find the culprit below
        pass
    out: list[list[int] | BadMessage] = []
    for text in texts:
        try:
            out.append(list(tokenize([text])[0]))
        except Exception as e:  # noqa: BLE001 - tokenizers raise many kinds
            out.append(BadMessage("tokenizer_error", f"{type(e).__name__}: {e}"[:300]))
    return out


def job_requests(job: SyncJob,
                 tokenize: Callable[[list[str]], list[list[int] | BadMessage]]) -> list[Request]:
    """The engine requests of ``job`` (one per text), or [] after failing the job on its first text
    the tokenizer refused."""
    results = tokenize(job.texts)
    bad = next((i for i, r in enumerate(results) if isinstance(r, BadMessage)), None)
    if bad is not None:
        job.fail(results[bad], bad)  # type: ignore[arg-type]
        return []
    return [Request(ids, text=t, meta=SyncRef(job, i))  # type: ignore[arg-type]
            for i, (t, ids) in enumerate(zip(job.texts, results, strict=True))]
