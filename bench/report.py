"""The engine benchmark's ratios, targets and output files (``engine.json`` + ``engine.md``).

Targets are the project's acceptance bars; they are reported with the measured value and whether
it met the bar, never adjusted. CPU bars apply to a CPU run, GPU bars to a CUDA run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

if TYPE_CHECKING:
    from bench.engine_bench import BenchOptions, Setup

log = logging.getLogger(__name__)

# (name, numerator, denominator-or-"ideal", bar); value = num / den must be >= bar
THROUGHPUT_TARGETS: dict[str, list[tuple[str, str, str, float]]] = {
    "cpu": [("(f) >= 0.9 x ideal", "f", "ideal", 0.9), ("(f) >= 1.5 x (c)", "f", "c", 1.5),
            ("(f) >= 3 x (e)", "f", "e", 3.0)],
    "cuda": [("(f) >= 1.3 x (d)", "f", "d", 1.3), ("(f) >= 0.8 x ideal", "f", "ideal", 0.8)],
}


def ratios(variants: dict[str, dict[str, Any]], ideal: float) -> dict[str, float]:
    """(f) against ideal and every other variant, by samples/s; also against the ideal built from
    our own full-depth engine (b), which separates scheduling from kernel differences to (a)."""
    f = variants["f"]["samples_per_s"]
    depth_ratio = variants["b"]["mean_exit_depth"] / variants["f"]["mean_exit_depth"]
    out = {"f_vs_ideal": f / ideal, "f_vs_ideal_from_b": f / (variants["b"]["samples_per_s"] * depth_ratio)}
    out.update({f"f_vs_{v}": f / r["samples_per_s"] for v, r in variants.items() if v != "f"})
    return out


def targets(run: dict[str, Any], device_type: str) -> list[dict[str, Any]]:
    """The acceptance bars for this device, each with its measured value and ``met``."""
    speed = {v: r["samples_per_s"] for v, r in run["variants"].items()}
    speed["ideal"] = run["ideal_samples_per_s"]
    out = []
    for name, num, den, bar in THROUGHPUT_TARGETS.get(device_type, []):
        value = speed[num] / speed[den]
        out.append({"name": name, "value": value, "bar": bar, "met": value >= bar})
    if device_type == "cpu":
        out += peer_targets(run)
    heavy: Any = run["streaming"].get("80%") if device_type == "cpu" else None
    for other in ("c", "d") if heavy else ():
        value = heavy["f"]["p99_ms"] / heavy[other]["p99_ms"]
        out.append({"name": f"p99 (f) <= 0.5 x p99 ({other}) at 80% load", "value": value, "bar": 0.5,
                    "met": value <= 0.5})
    return out


PRECISION_VARIANTS = ("f", "f_bf16", "f_int8")


def peer_targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #11's CPU bars, when the peers ran: the engine in its fastest precision mode (labels
    >= 98 % equal to fp32 (f)) at least 3x ONNX Runtime int8 at full depth."""
    variants, agree = run["variants"], run.get("agreement", {})
    modes = [v for v in PRECISION_VARIANTS if v in variants]
    if "ort_int8" not in variants or len(modes) < 2:
        return []
    best = max(modes, key=lambda v: variants[v]["samples_per_s"])
    label = agree.get(best, {}).get("label_agreement", 1.0)
    value = variants[best]["samples_per_s"] / variants["ort_int8"]["samples_per_s"]
    return [{"name": f"({best}) fastest precision >= 3 x ONNX Runtime int8 full depth", "value": value,
             "bar": 3.0, "met": value >= 3.0},
            {"name": f"({best}) labels >= 98 % equal to fp32 (f)", "value": label, "bar": 0.98,
             "met": label >= 0.98}]


def machine() -> dict[str, Any]:
    """CPU model, core count, GPU card (if any), library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def document(opts: BenchOptions, setup: Setup, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """engine.json: provenance, then the first batch size's results at top level, then every run."""
    model = setup.model
    first = runs[0]
    return {
        "command": opts.command,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": {"size": opts.size, "num_layers": model.num_layers, "hidden_size": model.hidden_size,
                  "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
                  "max_length": opts.max_length},
        "policy": setup.policy_desc,
        "replay": opts.replay,
        "num_inputs": len(setup.inputs), "num_unique_inputs": len(setup.unique), "rounds": opts.rounds,
        "num_full_depth_batches": opts.full_depth_batches, "num_single_samples": opts.single_samples,
        "exit_depth_histogram": setup.histogram or first["exit_depth_histogram_f"],
        "batch_size": first["batch_size"], "variants": first["variants"], "ratios": first["ratios"],
        "ideal_samples_per_s": first["ideal_samples_per_s"], "streaming": first["streaming"],
        "targets": first["targets"], "runs": runs,
    }


def _variants_md(run: dict[str, Any]) -> list[str]:
    lines = [f"### batch size {run['batch_size']}", "",
             "| variant | what | samples/s | x (a) | x ideal | layer-steps/s | mean exit depth |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for v, r in run["variants"].items():
        lines.append(f"| ({v}) | {r['description']} | {r['samples_per_s']:.1f} | {r['vs_a']:.2f} | "
                     f"{r['vs_ideal']:.2f} | {r['layer_steps_per_s']:.0f} | {r['mean_exit_depth']:.2f} |")
    lines += ["", f"Ideal = (a) x L / mean exit depth of (f) = {run['ideal_samples_per_s']:.1f} samples/s. "
              + "Ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in run["ratios"].items()), ""]
    if run["streaming"]:
        lines += ["| load (of (f)'s capacity) | variant | offered/s | p50 ms | p99 ms | utilisation |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for load, by_v in run["streaming"].items():
            for v, s in by_v.items():
                lines.append(f"| {load} | ({v}) | {s['offered_per_s']:.1f} | {s['p50_ms']:.0f} | "
                             f"{s['p99_ms']:.0f} | {s['utilisation']:.2f} |")
        lines.append("")
    if run.get("agreement"):
        lines += ["| variant | vs | inputs | labels equal | exit depths equal | mean exit depth (vs) |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for v, a in run["agreement"].items():
            ref = "(f)" if v.startswith("f_") else "(b)"
            depth = (f"{a['exit_depth_agreement'] * 100:.1f} %" if "exit_depth_agreement" in a else "-")
            mean = (f"{a['mean_exit_depth']:.3f} ({a['reference_mean_exit_depth']:.3f})"
                    if "mean_exit_depth" in a else "-")
            lines.append(f"| ({v}) | {ref} | {int(a['num_inputs'])} | {a['label_agreement'] * 100:.1f} % | "
                         f"{depth} | {mean} |")
        lines.append("")
    cost = run.get("layer_row_cost")
    if cost:
        b = run["batch_size"]
        lines += [f"Layer+head cost per full-length row: {cost['ms_per_row_at_1']:.2f} ms alone, "
                  f"{cost[f'ms_per_row_at_{b}']:.2f} ms in a batch of {b}: batching gain "
                  f"{cost['batching_gain']:.2f}x. Beyond that gain, (f) saves over (e) only per-step "
                  "overhead (Python, the embed and head calls, the host read).", ""]
    if run["targets"]:
        lines += ["| target | measured | met |", "| --- | ---: | --- |"]
        lines += [f"| {t['name']} | {t['value']:.2f} | {'yes' if t['met'] else 'NO'} |"
                  for t in run["targets"]]
        lines.append("")
    return lines


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    head = [
        "# Engine benchmark", "",
        f"Command: `{doc['command']}`  ", f"Date: {doc['date']}  ",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if m["gpu"] else "") + "  ",
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}  ",
        *([f"Load average (1 min) at start / end: {doc['load_average_1m']['start']:.1f} / "
           f"{doc['load_average_1m']['end']:.1f} on {m['cpu_count']} CPUs: other processes share this "
           "machine; compare variants within this run (interleaved rounds), not rates across runs.  "]
          if "load_average_1m" in doc else []),
        f"Model: {doc['model']}  ", f"Exit policy: {doc['policy']}  ",
        f"Inputs: {doc['num_inputs']} BBC val+test texts ({doc['num_unique_inputs']} unique, repeated) for "
        f"(c), (d), (f); the first {doc['num_full_depth_batches']} batches of them for (a), (b); the first "
        f"{doc['num_single_samples']} for (e); {doc['rounds']} interleaved round(s).", "",
        "Streaming: Poisson arrivals in virtual time advanced by measured step durations "
        "(docs/benchmarks.md).", "",
    ]
    body = [line for run in doc["runs"] for line in _variants_md(run)]
    return "\n".join(head + body) + "\n"


def write(doc: dict[str, Any], out_dir: Path, stem: str = "engine") -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(doc, indent=1) + "\n")
    md.write_text(markdown(doc))
    log.info("wrote %s and %s", js, md)
    return js, md
