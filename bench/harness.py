"""Pieces of the engine benchmark that do not depend on the engine: inputs, model builders, exit
replay, the transformers baseline, the latency simulator and small statistics.

* ``bench_token_ids``: BBC val + test texts (``elbert_stream.training.data``), tokenized once and repeated
  to at least ``min_count`` inputs, so every variant sees exactly the same token ids.
* ``build_model``: the shipped model, or an ALBERT of a named size with random weights
  (``tiny`` for tests, ``base`` = albert-base: hidden 768, 12 heads, intermediate 3072, L=12).
* ``ReplayPolicy``: an ``ExitPolicy``-compatible rule whose exits follow a recorded exit-depth
  histogram instead of the model's confidence, so a random-weight model exits like a trained one.
* ``hf_static_throughput``: transformers' ``AlbertForSequenceClassification``, full depth, static
  batches (variant (a), the reference everything is divided by).
* ``simulate_stream``: Poisson arrivals in virtual time driven by measured step durations.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from transformers import AlbertConfig

from elbert_stream.engine.model import ElbertModel, load_tokenizer, normalised_entropy
from elbert_stream.engine.policy import EXIT_MAX_DEPTH, EXIT_WINDOW, NO_EXIT, ExitDecision, ExitState
from elbert_stream.errors import ConfigError
from elbert_stream.types import Prediction, Request

log = logging.getLogger(__name__)

# albert-base-v2 shapes; "tiny" keeps unit tests to seconds
SIZES: dict[str, dict[str, Any]] = {
    "base": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
             "embedding_size": 128, "num_hidden_layers": 12},
    "minilm": {"hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536,
               "embedding_size": 384, "num_hidden_layers": 12, "hidden_act": "gelu"},  # the shipped shape
    "tiny": {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
             "embedding_size": 16, "num_hidden_layers": 6},
}


# ---- inputs -----------------------------------------------------------------------------------
def bench_texts() -> list[str]:
    """BBC validation + test texts (the model never trained on them), in split order."""
    from elbert_stream.training.data import load_bbc, split_dataset

    parts = split_dataset(load_bbc())
    return parts["val"].texts + parts["test"].texts


def repeat_to(items: Sequence[Any], min_count: int) -> list[Any]:
    """``items`` cycled until there are at least ``min_count`` (whole passes only)."""
    if not items:
        raise ConfigError("no benchmark inputs")
    passes = max(1, math.ceil(min_count / len(items)))
    return list(items) * passes


def bench_token_ids(tokenizer_dir: str | Path | None, max_length: int, min_count: int) -> list[list[int]]:
    """BBC val+test texts tokenized with the checkpoint's tokenizer, repeated to ``min_count``."""
    tok = load_tokenizer(tokenizer_dir)
    ids = tok(bench_texts(), truncation=True, max_length=max_length)["input_ids"]
    return repeat_to([list(x) for x in ids], min_count)


def synthetic_token_ids(n: int, vocab_size: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """Random token ids with lengths uniform in ``lengths`` (tests; no tokenizer needed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        out.append([int(x) for x in rng.integers(5, vocab_size, size=length)])
    return out


# ---- models -----------------------------------------------------------------------------------
def random_model(size: str, vocab_size: int, num_labels: int = 5, max_positions: int = 512,
                 seed: int = 0) -> ElbertModel:
    """An ALBERT of a named size with random weights (timing only: its labels mean nothing)."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {sorted(SIZES)} or 'shipped'")
    torch.manual_seed(seed)
    fields: dict[str, Any] = dict(vocab_size=vocab_size, num_labels=num_labels, **SIZES[size],
                                  max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    config = AlbertConfig(**fields)
    return ElbertModel(config).eval()


def build_model(size: str, device: torch.device, dtype: torch.dtype, vocab_size: int | None = None,
                model_dir: str | None = None) -> ElbertModel:
    """``shipped`` (or a checkpoint dir) -> the trained model; a SIZES name -> random weights."""
    if size == "shipped":
        return ElbertModel.from_pretrained(model_dir, device=device, dtype=dtype)
    if vocab_size is None:
        raise ConfigError("a random-weight model needs vocab_size (the tokenizer's)")
    return random_model(size, vocab_size).to(device=device, dtype=dtype)


# ---- exit replay ------------------------------------------------------------------------------
def load_depth_histogram(path: str | Path) -> list[int]:
    """Counts per exit depth (index 0 = depth 1) from a JSON file: a plain list of counts, or an
    object with ``exit_depth_histogram`` (a previous ``engine.json`` or evaluation output)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read an exit-depth histogram from {str(path)!r}: {e}") from e
    counts = doc.get("exit_depth_histogram") if isinstance(doc, dict) else doc
    if not isinstance(counts, list) or not counts or any(not isinstance(c, int) or c < 0 for c in counts):
        raise ConfigError(f"{str(path)!r}: expected a list of non-negative integer counts, got {counts!r}")
    return counts


def replay_sequence(counts: Sequence[int], length: int, seed: int = 0, block: int = 512) -> torch.Tensor:
    """``length`` exit depths (1-based, long ``[length]``) in shuffled blocks of ``min(block,
    sum(counts))`` whose histogram matches ``counts`` (largest-remainder rounding), so any run of
    whole blocks replays the recorded distribution exactly (up to that rounding)."""
    total = sum(counts)
    if total <= 0:
        raise ConfigError(f"exit-depth histogram is empty: {list(counts)}")
    size = min(block, total)
    share = np.asarray(counts, dtype=np.float64) * size / total
    whole = np.floor(share).astype(np.int64)
    whole[np.argsort(-(share - whole), kind="stable")[: size - int(whole.sum())]] += 1
    one = np.repeat(np.arange(1, len(counts) + 1), whole)  # [size]
    rng = np.random.default_rng(seed)
    blocks = [rng.permutation(one) for _ in range(-(-length // size))]
    return torch.from_numpy(np.concatenate(blocks)[:length])


@dataclass
class ReplayPolicy:
    """Exits each request at a predetermined depth drawn from a recorded histogram.

    ``ExitPolicy``-compatible (``decide(probs, depth, state)``). A row is *fresh* when its state
    was reset on admission (``pred == -1``); its target depth is then read from the replay sequence
    (``replay_sequence``: shuffled, histogram-exact blocks) and rides along in ``ExitState.streak``
    (replay keeps no streak). Every call reads the next ``B`` entries of the sequence and fresh rows
    take the entry at their row position, so the rule never reads the device back (no host sync
    on CUDA); the targets are an unbiased sample of the histogram. Depths beyond ``num_layers``
    are clipped to it. Each policy object replays from the start of its sequence.
    """

    counts: list[int]
    num_layers: int
    seed: int = 0
    name: str = "replay"
    min_depth: int = 1
    _seq: torch.Tensor = field(init=False, repr=False)
    _cursor: torch.Tensor | None = field(default=None, init=False, repr=False)  # [] long, on the device

    def __post_init__(self) -> None:
        size = min(512, sum(self.counts))  # whole blocks, so the cycle is histogram-exact
        seq = replay_sequence(self.counts, size * -(-4096 // size), self.seed)
        self._seq = seq.clamp(max=self.num_layers)

    @property
    def mean_depth(self) -> float:
        depths = torch.arange(1, len(self.counts) + 1).clamp(max=self.num_layers).double()
        return float((depths * torch.tensor(self.counts).double()).sum() / sum(self.counts))

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "mean_depth": self.mean_depth, "histogram": self.counts}

    def _window(self, n: int, device: torch.device) -> torch.Tensor:
        """The next ``n`` sequence entries ``[n]``, gathered on ``device``. The cursor is a device
        tensor updated in place: no host sync, and no Python state for ``torch.compile`` to guard."""
        if self._cursor is None or self._seq.device != device:
            self._seq = self._seq.to(device)
            self._cursor = torch.zeros((), dtype=torch.long, device=device)
        idx = (torch.arange(n, device=device) + self._cursor) % self._seq.numel()  # [n]
        self._cursor.add_(n).remainder_(self._seq.numel())
        return self._seq[idx]

    def decide(self, probs: torch.Tensor, depth: torch.Tensor, state: ExitState) -> ExitDecision:
        probs = probs.float()
        top, pred = probs.max(-1)  # [B], [B]
        drawn = self._window(depth.shape[0], depth.device).to(state.streak.dtype)  # [B]
        target = torch.where(state.pred < 0, drawn, state.streak)  # [B] fresh rows take a new depth
        done = depth >= target  # [B]
        reason = torch.where(done, EXIT_WINDOW, NO_EXIT)
        reason = torch.where(depth >= self.num_layers, EXIT_MAX_DEPTH, reason)
        state_out = ExitState(pred=pred, top=top, streak=target, rising=torch.zeros_like(target))
        return ExitDecision(reason=reason, pred=pred, top=top,
                            entropy=normalised_entropy(probs), state=state_out)


# ---- the transformers baseline ----------------------------------------------------------------
def pad_batch(rows: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest row: (input_ids ``[B, T]``, attention_mask ``[B, T]``) on ``device``."""
    from elbert_stream.training.scoring import pad_batch as pad

    ids, mask = pad(rows, pad_id)
    return ids.to(device), mask.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_static_throughput(model: ElbertModel, inputs: Sequence[Sequence[int]],
                         batch_size: int) -> dict[str, float]:
    """Variant (a): ``AlbertForSequenceClassification`` over static batches, full depth."""
    hf, device = model.hf_model, model.device
    pad_id = int(model.config.pad_token_id or 0)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        ids, mask = pad_batch(inputs[i:i + batch_size], pad_id, device)
        hf(input_ids=ids, attention_mask=mask).logits.argmax(-1).tolist()  # results back on host
    sync(device)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "num_samples": len(inputs),
            "num_layer_rows": len(inputs) * model.num_layers, "mean_exit_depth": float(model.num_layers)}


# ---- engine drivers ---------------------------------------------------------------------------
class EngineLike(Protocol):
    def add(self, request: Request) -> bool: ...
    def step(self) -> list[Prediction]: ...
    def has_work(self) -> bool: ...


def run_closed(engine: EngineLike, inputs: Sequence[Sequence[int]], device: torch.device) -> dict[str, Any]:
    """Feed every input as fast as the engine accepts it and step until done (throughput).
    ``depths`` and ``labels`` are per input, in input order."""
    requests = [Request(list(ids), request_id=f"q{i}") for i, ids in enumerate(inputs)]
    depths, labels = [0] * len(requests), [-1] * len(requests)
    nxt = done = 0
    sync(device)
    start = time.perf_counter()
    while nxt < len(requests) or engine.has_work():
        while nxt < len(requests) and engine.add(requests[nxt]):
            nxt += 1
        for p in engine.step():
            i = int(p.request_id[1:])
            depths[i], labels[i] = p.exit_depth, p.label_index
            done += 1
    sync(device)
    elapsed = time.perf_counter() - start
    if done != len(requests) or min(depths, default=1) < 1:
        raise RuntimeError(f"engine returned {done} predictions for {len(requests)} requests")
    return {"elapsed_s": elapsed, "num_samples": done, "depths": depths, "labels": labels}


class StreamSim:
    """Poisson arrivals at ``rate_per_s`` into one engine, in VIRTUAL time: each engine step
    advances the clock by its measured wall duration; idle gaps are skipped. Latency = arrival ->
    the end of the step that returned the prediction. ``advance()`` does one step (or one idle
    jump), so several simulations can be interleaved step by step (``simulate_streams``)."""

    def __init__(self, engine: EngineLike, inputs: Sequence[Sequence[int]], rate_per_s: float, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        rng = np.random.default_rng(seed)
        self.engine, self.rate_per_s, self.clock = engine, rate_per_s, clock
        self.arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, size=len(inputs)))  # [N] seconds
        self.requests = [Request(list(ids), request_id=f"s{i}") for i, ids in enumerate(inputs)]
        self.latency: dict[str, float] = {}
        self.now, self.busy, self._next = 0.0, 0.0, 0

    @property
    def done(self) -> bool:
        return len(self.latency) == len(self.requests)

    def advance(self) -> None:
        reqs, engine, arrivals = self.requests, self.engine, self.arrivals
        while self._next < len(reqs) and arrivals[self._next] <= self.now and engine.add(reqs[self._next]):
            self._next += 1
        if not engine.has_work():
            self.now = float(self.arrivals[self._next])  # idle until the next arrival
            return
        t0 = self.clock()
        preds = engine.step()
        dt = self.clock() - t0
        self.now, self.busy = self.now + dt, self.busy + dt
        for p in preds:
            self.latency[p.request_id] = self.now - float(self.arrivals[int(p.request_id[1:])])

    def result(self) -> dict[str, Any]:
        lat_ms = np.asarray(list(self.latency.values())) * 1e3
        return {"p50_ms": float(np.percentile(lat_ms, 50)), "p99_ms": float(np.percentile(lat_ms, 99)),
                "mean_ms": float(lat_ms.mean()), "num_requests": len(self.requests),
                "offered_per_s": self.rate_per_s,
                "utilisation": self.busy / self.now if self.now > 0 else 0.0}


def simulate_streams(sims: dict[str, StreamSim]) -> dict[str, dict[str, Any]]:
    """Run several simulations interleaved: always advance the one whose virtual clock is
    furthest behind, so a burst of load from elsewhere on the machine hits them all alike."""
    live = dict(sims)
    while live:
        name = min(live, key=lambda k: live[k].now)
        live[name].advance()
        if live[name].done:
            del live[name]
    return {name: sim.result() for name, sim in sims.items()}


def simulate_stream(engine: EngineLike, inputs: Sequence[Sequence[int]], rate_per_s: float,
                    seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """One ``StreamSim`` run to the end."""
    return simulate_streams({"x": StreamSim(engine, inputs, rate_per_s, seed, clock)})["x"]
