"""The engine benchmark: six ways (and four CPU peers) to run the same model over the same inputs.

* (a) transformers' ``AlbertForSequenceClassification``, full depth, static batches
* (b) our engine, policy ``none`` (full depth), continuous batching
* (c) naive early-exit batching: a static batch runs until its LAST sample exits (HF PABEE port)
* (d) compaction: exited rows dropped, nobody joins until the batch is empty (FastBERT-like)
* (e) batch size 1, early exit (the ELBERT paper's setting)
* (f) continuous batching, early exit (the product)

(b)-(f) are the ``Engine`` in its three modes, so they share every line of the hot path.
Ideal = (a) x L / mean exit depth of (f). Fairness on a noisy machine: the inputs are cut into
``rounds`` chunks and every round runs every variant on its chunk, in an order rotated per round.
The early-exit variants (c, d, f) run on all inputs; the full-depth ones (a, b) on the first
``full_depth_batches`` batches of them and batch-1 (e) on the first ``single_samples`` (a sample's
cost at full depth does not depend on which text it is: every BBC text fills ``max_length``).

CPU peers (``bench.peers``, same rounds): ONNX Runtime full depth fp32 / int8 (inputs of (a)), and
(f) with the layer in bfloat16 / int8; labels compared with (f) (precision) and (b) (ONNX Runtime).

Streaming: Poisson arrivals at fractions of (f)'s measured capacity, simulated in virtual time
(see ``bench.harness.simulate_stream`` and docs/benchmarks.md), p50/p99 latency of (c), (d), (f).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from bench import harness as H
from bench import peers as P
from bench import report as bench_report
from elbert_stream.config import EngineSettings, ExitSettings
from elbert_stream.engine.engine import BatchMode, Engine
from elbert_stream.engine.model import ElbertModel, resolve_device, resolve_dtype
from elbert_stream.engine.policy import ExitPolicy, exit_depths_offline
from elbert_stream.errors import ConfigError

log = logging.getLogger(__name__)

VARIANTS: dict[str, str] = {
    "a": "transformers AlbertForSequenceClassification, full depth, static batches",
    "b": "engine, policy none (full depth), continuous batching",
    "c": "naive early exit: a static batch runs until its last sample exits",
    "d": "compaction: exited rows dropped, nobody joins until the batch is empty",
    "e": "batch size 1, early exit",
    "f": "continuous batching, early exit",
}
DESCRIPTIONS: dict[str, str] = {**VARIANTS, **P.PEERS}
FULL_DEPTH = ("a", "b", *P.ORT_PEERS)
STREAM_VARIANTS = ("c", "d", "f")


@dataclass
class BenchOptions:
    """What ``elbert-stream bench engine`` runs; see ``add_arguments`` for each field's meaning."""

    size: str = "shipped"
    model_dir: str | None = None
    tokenizer_dir: str | None = None  # default: the model dir, else the shipped model's
    device: str = "cpu"
    dtype: str = "auto"
    batches: list[int] = field(default_factory=lambda: [64])
    max_length: int = 128
    min_samples: int = 2000
    replay: bool = False
    replay_from: str | None = None
    rounds: int = 6
    samples_per_slot: int = 32  # early-exit inputs >= this x the largest batch (fill/drain stay small)
    full_depth_batches: int = 6  # (a), (b) run on this many batches (>= rounds: a batch per round)
    single_samples: int = 128  # (e) runs on this many inputs
    stream_batches: int = 6  # streaming requests >= this x the batch size
    max_unique: int | None = None  # cap on the unique texts (quick runs)
    loads: list[float] = field(default_factory=lambda: [0.5, 0.8])
    stream_requests: int = 600
    compile: bool = False
    peers: bool = True  # the CPU peers (bench.peers): ONNX Runtime and the layer precision modes
    seed: int = 0
    out_dir: Path = Path("bench/results")
    command: str = "elbert-stream bench engine"


@dataclass
class Setup:
    """The model, inputs and exit rule every variant shares."""

    model: ElbertModel
    inputs: list[list[int]]  # all inputs (>= min_samples, whole passes of the unique texts)
    unique: list[list[int]]  # one pass of the unique texts
    make_policy: Callable[[], Any]  # a fresh ExitPolicy / ReplayPolicy per run
    histogram: list[int] | None  # the replayed exit-depth counts, or None (the model's own policy)
    policy_desc: dict[str, Any]


# ---- setup ------------------------------------------------------------------------------------
def shipped_histogram(unique: Sequence[Sequence[int]], max_length: int, device: torch.device,
                      model_dir: str | None = None) -> list[int]:
    """The shipped model's exit-depth counts (its saved default policy) over ``unique`` inputs."""
    model = ElbertModel.from_pretrained(model_dir, device=device, dtype=torch.float32)
    policy = ExitPolicy.for_model(ExitSettings(), model.num_layers, model.extras.exit)
    pad = int(model.config.pad_token_id or 0)
    depths = []
    with torch.inference_mode():
        for i in range(0, len(unique), 64):
            ids, mask = H.pad_batch(unique[i:i + 64], pad, device)
            probs = model(ids, mask).float().softmax(-1)  # [L, B, K]
            depths.append(exit_depths_offline(policy, probs)[0].cpu())
    counts = torch.bincount(torch.cat(depths), minlength=model.num_layers + 1)[1:]
    return [int(c) for c in counts]


def build_setup(opts: BenchOptions, unique: list[list[int]] | None = None) -> Setup:
    """Model, inputs and exit rule; ``unique`` replaces the BBC texts (tests: synthetic token ids)."""
    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    if unique is None:
        unique = H.bench_token_ids(opts.tokenizer_dir or opts.model_dir, opts.max_length, 1)  # None: shipped
    unique = unique[: opts.max_unique]
    count = max(opts.min_samples, opts.samples_per_slot * max(opts.batches))
    inputs = H.repeat_to(unique, count)[:count]
    vocab = 1 + max(max(r) for r in unique)
    model = H.build_model(opts.size, device, dtype, vocab_size=vocab, model_dir=opts.model_dir)
    histogram = None
    if opts.replay:
        histogram = (H.load_depth_histogram(opts.replay_from) if opts.replay_from
                     else shipped_histogram(unique, opts.max_length, device))
        counts, num_layers, seed = histogram, model.num_layers, opts.seed
        make_policy: Callable[[], Any] = lambda: H.ReplayPolicy(counts, num_layers, seed)
        desc = make_policy().describe()
    elif opts.size != "shipped" and opts.model_dir is None:
        raise ConfigError(f"a random-weight model (size {opts.size!r}) exits at random: use --replay")
    else:
        fixed = ExitPolicy.for_model(ExitSettings(), model.num_layers, model.extras.exit)
        make_policy, desc = (lambda: fixed), fixed.describe()
    return Setup(model, inputs, unique, make_policy, histogram, desc)


# ---- one variant, one chunk -------------------------------------------------------------------
def engine_runner(setup: Setup, mode: BatchMode, slots: int, max_length: int, early_exit: bool,
                  compile: bool = False,
                  precision: str = "model") -> Callable[[Sequence[Sequence[int]]], dict[str, Any]]:
    """A callable that runs a fresh ``Engine`` in ``mode`` over some inputs and reports counts."""
    settings = EngineSettings(max_slots=slots, max_batch_tokens=slots * max_length,
                              max_queue=max(1024, 4 * slots), layer_precision=precision)
    model = setup.model

    def run(inputs: Sequence[Sequence[int]]) -> dict[str, Any]:
        policy = setup.make_policy() if early_exit else ExitPolicy.of("none", model.num_layers)
        engine = Engine(model, cast(ExitPolicy, policy), settings, max_length=max_length, mode=mode,
                        compile=compile)
        res = H.run_closed(engine, inputs, model.device)
        st = engine.stats()
        res.update(num_layer_rows=st.num_layer_rows, num_steps=st.num_steps,
                   padding_efficiency=st.padding_efficiency)
        return res

    return run


def variant_runners(setup: Setup, batch: int, opts: BenchOptions) -> dict[str, Callable[..., dict[str, Any]]]:
    L = opts.max_length  # noqa: N806
    runners = {
        "a": lambda x: H.hf_static_throughput(setup.model, x, batch),
        "b": engine_runner(setup, "continuous", batch, L, early_exit=False, compile=opts.compile),
        "c": engine_runner(setup, "naive", batch, L, early_exit=True, compile=opts.compile),
        "d": engine_runner(setup, "compaction", batch, L, early_exit=True, compile=opts.compile),
        "e": engine_runner(setup, "continuous", 1, L, early_exit=True, compile=opts.compile),
        "f": engine_runner(setup, "continuous", batch, L, early_exit=True, compile=opts.compile),
    }
    if opts.peers:
        runners.update(P.peer_runners(setup.model, batch, L, None, lambda precision: engine_runner(
            setup, "continuous", batch, L, early_exit=True, compile=opts.compile, precision=precision)))
    return runners


def chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    """``items`` cut into ``n`` nearly equal contiguous parts."""
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


# ---- throughput -------------------------------------------------------------------------------
def variant_inputs(setup: Setup, batch: int, opts: BenchOptions,
                   names: Sequence[str]) -> dict[str, Sequence[list[int]]]:
    full = setup.inputs[: opts.full_depth_batches * batch]
    single = setup.inputs[: opts.single_samples]
    return {v: full if v in FULL_DEPTH else single if v == "e" else setup.inputs for v in names}


def measure_throughput(runners: dict[str, Callable[..., dict[str, Any]]], inputs: dict[str, Sequence[Any]],
                       rounds: int) -> dict[str, dict[str, Any]]:
    """Every variant over its inputs, interleaved: round r runs all variants on chunk r, rotated.
    Per-input labels (and exit depths) are kept under ``per_input`` in ``totals[v]``."""
    names = list(runners)
    parts = {v: chunks(inputs[v], rounds) for v in names}
    for v in names:  # warm-up: allocator, kernels, first-call overheads
        runners[v](parts[v][0][: 8 if v == "e" else 64])
    totals: dict[str, dict[str, Any]] = {v: {"elapsed_s": 0.0, "num_samples": 0, "num_layer_rows": 0,
                                             "depth_sum": 0, "per_round": []} for v in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        order = order if r % 2 == 0 else order[::-1]
        for v in order:
            res = runners[v](parts[v][r])
            t = totals[v]
            t["elapsed_s"] += res["elapsed_s"]
            t["num_samples"] += res["num_samples"]
            t["num_layer_rows"] += res["num_layer_rows"]
            t["depth_sum"] += sum(res["depths"]) if "depths" in res else res["num_layer_rows"]
            t["per_round"].append(res["num_samples"] / res["elapsed_s"])
            if "labels" in res:
                t.setdefault("labels", []).extend(res["labels"])
                t.setdefault("depths", []).extend(res.get("depths", []))
            log.info("round %d variant %s: %.1f samples/s", r, v, t["per_round"][-1])
    return {v: summarise_variant(v, t) for v, t in totals.items()}


def summarise_variant(name: str, t: dict[str, Any]) -> dict[str, Any]:
    """Headline rates scale the pooled rate by median/pooled over rounds: the median round is
    robust to a burst of load from other processes; ``pooled_samples_per_s`` is total / total."""
    el = t["elapsed_s"]
    pooled = t["num_samples"] / el
    robust = float(np.median(t["per_round"])) / pooled  # 1.0 on a quiet machine
    out = {"description": DESCRIPTIONS[name], "samples_per_s": pooled * robust,
           "pooled_samples_per_s": pooled,
           "layer_steps_per_s": t["num_layer_rows"] / el * robust,
           "useful_layer_steps_per_s": t["depth_sum"] / el * robust,
           "mean_exit_depth": t["depth_sum"] / t["num_samples"], "num_samples": t["num_samples"],
           "elapsed_s": el, "per_round_samples_per_s": t["per_round"]}
    if "labels" in t:
        out["per_input"] = {"labels": t["labels"], "depths": t["depths"]}
    return out


# ---- streaming --------------------------------------------------------------------------------
def measure_streaming(setup: Setup, batch: int, capacity: float,
                      opts: BenchOptions) -> dict[str, dict[str, Any]]:
    """Latency of (c), (d), (f) under Poisson load at each fraction of (f)'s capacity; the three
    variants of one load run interleaved step by step on the same arrival sequence."""
    L = opts.max_length  # noqa: N806
    modes: dict[str, BatchMode] = {"c": "naive", "d": "compaction", "f": "continuous"}
    reqs = setup.inputs[: max(opts.stream_requests, opts.stream_batches * batch)]
    out: dict[str, dict[str, Any]] = {}
    for i, load in enumerate(opts.loads):
        sims = {}
        for v in STREAM_VARIANTS:
            settings = EngineSettings(max_slots=batch, max_batch_tokens=batch * L, max_queue=len(reqs) + 1)
            engine = Engine(setup.model, cast(ExitPolicy, setup.make_policy()), settings, max_length=L,
                            mode=modes[v], compile=opts.compile)
            sims[v] = H.StreamSim(engine, reqs, load * capacity, seed=opts.seed + i)
        key = f"{round(load * 100)}%"
        out[key] = H.simulate_streams(sims)
        for v, r in out[key].items():
            log.info("stream %s variant %s: p50 %.0f ms p99 %.0f ms", key, v, r["p50_ms"], r["p99_ms"])
    return out


@torch.inference_mode()
def layer_row_cost(setup: Setup, batch: int, max_length: int, min_rows: int = 256) -> dict[str, float]:
    """Milliseconds per row of one engine layer+head call on full-length rows, alone and in a batch of
    ``batch`` (the engine's own call, CPU row chunks included). ``batching_gain`` = alone / batched is
    what batching saves per layer row over batch size 1 on this device; (f) and (e) run the same rows,
    so beyond this gain (f) saves only per-step overhead (Python, embed and head calls, host read)."""
    model = setup.model
    settings = EngineSettings(max_slots=batch, max_batch_tokens=batch * max_length)
    engine = Engine(model, ExitPolicy.of("none", model.num_layers), settings, max_length=max_length)
    out: dict[str, float] = {}
    for rows in (1, batch):
        x = torch.randn(rows, max_length, model.hidden_size, device=model.device, dtype=model.dtype)
        x = x.to(engine._compute.hidden_dtype)
        mask = engine._compute.mask(torch.full((rows,), max_length, device=model.device),
                                    torch.arange(max_length, device=model.device))
        reps = max(3, min_rows // rows)
        for _ in range(2):
            engine._layer_head(x, mask)  # the exact call a step makes
        H.sync(model.device)
        t0 = time.perf_counter()
        for _ in range(reps):
            engine._layer_head(x, mask)
        H.sync(model.device)
        out[f"ms_per_row_at_{rows}"] = (time.perf_counter() - t0) * 1e3 / (reps * rows)
    out["batching_gain"] = out["ms_per_row_at_1"] / out[f"ms_per_row_at_{batch}"]
    return out


# ---- one batch size ---------------------------------------------------------------------------
def bench_batch(setup: Setup, batch: int, opts: BenchOptions) -> dict[str, Any]:
    """All variants at one batch size, then streaming at that batch size."""
    runners = variant_runners(setup, batch, opts)
    row_cost = layer_row_cost(setup, batch, opts.max_length)
    variants = measure_throughput(runners, variant_inputs(setup, batch, opts, list(runners)), opts.rounds)
    per_input = {v: r.pop("per_input") for v, r in variants.items() if "per_input" in r}
    depths = per_input["f"]["depths"]
    num_layers = setup.model.num_layers
    ideal = variants["a"]["samples_per_s"] * num_layers / variants["f"]["mean_exit_depth"]
    for v in variants.values():
        v["vs_a"] = v["samples_per_s"] / variants["a"]["samples_per_s"]
        v["vs_ideal"] = v["samples_per_s"] / ideal
    streaming = (measure_streaming(setup, batch, variants["f"]["samples_per_s"], opts)
                 if opts.loads and opts.stream_requests else {})
    run = {"batch_size": batch, "variants": variants, "ideal_samples_per_s": ideal,
           "ratios": bench_report.ratios(variants, ideal), "streaming": streaming, "layer_row_cost": row_cost,
           "agreement": P.agreements(per_input),
           "exit_depth_histogram_f": np.bincount(depths, minlength=num_layers + 1)[1:].tolist()}
    run["targets"] = bench_report.targets(run, setup.model.device.type)
    return run


def run_engine_bench(opts: BenchOptions, unique: list[list[int]] | None = None) -> dict[str, Any]:
    """Run every batch size; returns the engine.json document (also written to ``opts.out_dir``)."""
    if opts.rounds < 1 or not opts.batches or any(b < 1 for b in opts.batches):
        raise ConfigError(f"rounds and batch sizes must be >= 1, got {opts.rounds}, {opts.batches}")
    load_start = os.getloadavg()[0]
    setup = build_setup(opts, unique)
    log.info("engine bench: %d inputs (%d unique), model %s, policy %s", len(setup.inputs),
             len(setup.unique), opts.size, setup.policy_desc)
    runs = [bench_batch(setup, batch, opts) for batch in opts.batches]
    doc = bench_report.document(opts, setup, runs)
    doc["load_average_1m"] = {"start": load_start, "end": os.getloadavg()[0]}
    bench_report.write(doc, opts.out_dir)
    return doc


# ---- command line -----------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="shipped", choices=["shipped", *sorted(H.SIZES)],
                   help="shipped = the trained BBC model; base/tiny = random weights (use --replay)")
    p.add_argument("--model-dir", default=None, help="checkpoint dir (default: the shipped model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (default: the model's, else the shipped one)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch", default="64", help="comma-separated batch sizes (slots), e.g. 64,128,256,512")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (truncation)")
    p.add_argument("--min-samples", type=int, default=2000, help="inputs per early-exit variant (at least)")
    p.add_argument("--replay", action="store_true", help="exit at depths drawn from a recorded histogram")
    p.add_argument("--replay-from", default=None,
                   help="JSON histogram (a list, or engine.json's exit_depth_histogram); default: the "
                        "shipped model's on BBC")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds (variants alternate)")
    p.add_argument("--loads", default="0.5,0.8", help="streaming loads as fractions of (f)'s capacity")
    p.add_argument("--single-samples", type=int, default=128, help="inputs for (e), batch size 1")
    p.add_argument("--stream-requests", type=int, default=600,
                   help="requests per streaming run, at least 6 x the batch size (0 = skip)")
    p.add_argument("--full-depth-batches", type=int, default=6,
                   help="(a), (b) run on at least this many batches")
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's layer (CUDA)")
    p.add_argument("--no-peers", action="store_true",
                   help="skip the CPU peers (ONNX Runtime fp32/int8, layer precision modes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    opts = BenchOptions(
        size=args.size, model_dir=args.model_dir, tokenizer_dir=args.tokenizer, device=args.device,
        dtype=args.dtype,
        batches=[int(b) for b in str(args.batch).split(",") if b], max_length=args.max_length,
        min_samples=args.min_samples, replay=args.replay, replay_from=args.replay_from, rounds=args.rounds,
        loads=[float(x) for x in str(args.loads).split(",") if x], stream_requests=args.stream_requests,
        compile=args.compile, peers=not args.no_peers, seed=args.seed, out_dir=Path(args.out),
        command=args.command_line,
        full_depth_batches=args.full_depth_batches, single_samples=args.single_samples,
    )
    if getattr(args, "quick", False):
        opts.min_samples, opts.rounds, opts.samples_per_slot = min(opts.min_samples, 200), 1, 2
        opts.max_unique, opts.full_depth_batches, opts.single_samples = 100, 2, min(opts.single_samples, 32)
        opts.stream_requests, opts.stream_batches = min(opts.stream_requests, 60), 2
    return opts


def warn_if_busy() -> None:
    """Busy CPUs make OpenMP threads wait on each other (25x slower batch-1 steps seen): use 1 thread."""
    load, cpus, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load > cpus:
        log.warning("machine busy: load %.1f on %d CPUs with %d torch threads; timings will be noisy "
                    "(consider --threads 1)", load, cpus, threads)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        warn_if_busy()
    doc = run_engine_bench(options_from_args(args))
    for run in doc["runs"]:
        log.info("batch %d: %s", run["batch_size"], json.dumps(run["ratios"]))
    missed = [t["name"] for run in doc["runs"] for t in run["targets"] if not t["met"]]
    if missed:
        log.warning("targets missed: %s", missed)
    return 0
