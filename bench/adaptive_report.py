"""Numbers, markdown and the plot of ``bench adaptive`` (``adaptive_bench.py`` runs the modes)."""

from __future__ import annotations

import json
import math
import platform
from collections import Counter
from pathlib import Path
from typing import Any

from elbert_stream.testing.streamcheck import percentile

RETURN_TARGET_S = 30.0
P99_TARGET_RATIO = 1 / 3


def _window(rows: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [r["e2e_ms"] for r in rows if r["e2e_ms"] is not None]
    n = len(rows)
    return {
        "messages": n,
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "accuracy": sum(r["correct"] for r in rows) / n if n else math.nan,
        "consistency": sum(r["consistent"] for r in rows) / n if n else math.nan,
        "mean_exit_depth": sum(r["depth"] for r in rows) / n if n else math.nan,
        "gears": dict(sorted(Counter(r["gear"] for r in rows).items())),
    }


def _back_to_default_s(timeline: list[dict[str, Any]], burst_end_s: float) -> float | None:
    """Seconds after the burst until the gear was 0 for good (None: never, within the run)."""
    nonzero = [p["t_s"] for p in timeline if p["gear"] != 0]
    if not nonzero:
        return 0.0
    if timeline[-1]["gear"] != 0:
        return None
    return max(0.0, nonzero[-1] + 0.5 - burst_end_s)


def _drained_s(timeline: list[dict[str, Any]], burst_end_s: float, base_rate: float) -> float | None:
    """Seconds after the burst until the outstanding messages were back under one second's base load."""
    for p in timeline:
        if p["t_s"] >= burst_end_s and p["outstanding"] <= max(10.0, base_rate):
            return p["t_s"] - burst_end_s
    return None


def summarise(raw: dict[str, Any], gold: list[str], full: list[str], args: Any) -> dict[str, Any]:
    """One mode's run -> its figures (and the per-message rows the plot needs)."""
    start, sent, n = raw["start_s"], raw["sent"], len(gold)
    seen: Counter[int] = Counter()
    rows = []
    for rec in raw["records"]:
        seen[rec.id] += 1
        if seen[rec.id] > 1:
            continue
        rows.append(
            {
                "t_s": sent[rec.id] - start,
                "done_s": rec.produced_ms / 1e3 - start,
                "e2e_ms": rec.end_to_end_ms,
                "gear": rec.gear,
                "depth": rec.exit_depth,
                "correct": rec.label == gold[rec.id % n],
                "consistent": rec.label == full[rec.id % n],
            }
        )
    b0, b1 = args.base_s, args.base_s + args.burst_s
    burst = [r for r in rows if b0 <= r["t_s"] < b1]
    answered_in_burst = sum(1 for r in rows if b0 <= r["done_s"] < b1)
    return {
        "overall": _window(rows),
        "burst": _window(burst),
        "burst_msgs_per_s": answered_in_burst / args.burst_s,
        "max_outstanding": max((p["outstanding"] for p in raw["timeline"]), default=0),
        "sent": len(sent),
        "answered": len(seen),
        "lost": len(set(sent) - set(seen)),
        "duplicates": sum(c - 1 for c in seen.values()),
        "dead_letters": raw["dead_letters"],
        "back_to_default_after_burst_s": _back_to_default_s(raw["timeline"], b1),
        "drained_after_burst_s": _drained_s(raw["timeline"], b1, args.base_load * raw.get("capacity", 0)),
        "gear_changes": [
            {"t_s": round(p["t_s"], 1), "gear": p["gear"]}
            for i, p in enumerate(raw["timeline"])
            if i == 0 or p["gear"] != raw["timeline"][i - 1]["gear"]
        ],
        "timeline": raw["timeline"],
        "rows": rows,
        "error": raw["error"],
    }


def _mean(runs: list[dict[str, Any]], *keys: str) -> float:
    vals = []
    for run in runs:
        v: Any = run
        for k in keys:
            v = v[k]
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            vals.append(float(v))
    return sum(vals) / len(vals) if vals else math.nan


ROWS = [  # (label, keys, format)
    ("p50 end-to-end, burst (ms)", ("burst", "p50_ms"), "{:.0f}"),
    ("p99 end-to-end, burst (ms)", ("burst", "p99_ms"), "{:.0f}"),
    ("p50 end-to-end, overall (ms)", ("overall", "p50_ms"), "{:.0f}"),
    ("p99 end-to-end, overall (ms)", ("overall", "p99_ms"), "{:.0f}"),
    ("max outstanding (lag, messages)", ("max_outstanding",), "{:.0f}"),
    ("messages/s answered during the burst", ("burst_msgs_per_s",), "{:.1f}"),
    ("accuracy vs gold, burst", ("burst", "accuracy"), "{:.2%}"),
    ("accuracy vs gold, overall", ("overall", "accuracy"), "{:.2%}"),
    ("consistency with full depth, burst", ("burst", "consistency"), "{:.2%}"),
    ("consistency with full depth, overall", ("overall", "consistency"), "{:.2%}"),
    ("mean exit depth, burst", ("burst", "mean_exit_depth"), "{:.2f}"),
    ("messages lost", ("lost",), "{:.0f}"),
    ("back to gear 0 after the burst (s)", ("back_to_default_after_burst_s",), "{:.1f}"),
    ("backlog drained after the burst (s)", ("drained_after_burst_s",), "{:.1f}"),
]


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    fixed, adapt = doc["runs"]["fixed"], doc["runs"]["adaptive"]
    ratio = _mean(adapt, "burst", "p99_ms") / _mean(fixed, "burst", "p99_ms")
    loss = (_mean(fixed, "overall", "accuracy") - _mean(adapt, "overall", "accuracy")) * 100
    back = [r["back_to_default_after_burst_s"] for r in adapt]
    budget = doc["adaptive_settings"]["max_accuracy_loss_points"]
    return [
        {
            "target": "adaptive p99 during the burst <= 1/3 of fixed",
            "measured": f"{ratio:.2f}x",
            "met": ratio <= P99_TARGET_RATIO,
        },
        {
            "target": f"accuracy over the whole run within the budget ({budget} points below fixed)",
            "measured": f"{loss:.2f} points",
            "met": loss <= doc["adaptive_settings"]["max_accuracy_loss_points"],
        },
        {
            "target": "no message lost",
            "measured": str(sum(r["lost"] for r in fixed + adapt)),
            "met": all(r["lost"] == 0 for r in fixed + adapt),
        },
        {
            "target": f"gears back to default within {RETURN_TARGET_S:.0f} s after the burst",
            "measured": ", ".join("never" if b is None else f"{b:.1f} s" for b in back),
            "met": all(b is not None and b <= RETURN_TARGET_S for b in back),
        },
    ]


def markdown(doc: dict[str, Any]) -> str:
    fixed, adapt = doc["runs"]["fixed"], doc["runs"]["adaptive"]
    s = doc["settings"]
    lines = [
        "# Load-adaptive exit under a burst: fixed vs adaptive (one replica)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Machine: {doc['machine']} (CPU, **shared with other agents' jobs**: absolute numbers are noisy; "
        "both modes saw the same schedule back to back). Embedded Tansu, one Worker (no Ray), the shipped "
        "model, BBC validation + test texts cycled.",
        "",
        f"Capacity of the fixed worker: {doc['capacity_msgs_per_s']:.1f} msgs/s. Schedule: "
        f"{s['base_load']:.0%} for {s['base_s']:.0f} s, {s['burst_load']:.0%} for {s['burst_s']:.0f} s, "
        f"{s['base_load']:.0%} for {s['after_s']:.0f} s; rounds: {s['rounds']}. Adaptive settings: "
        f"`{json.dumps(doc['adaptive_settings'])}`.",
        "",
        "| | fixed | adaptive | adaptive / fixed |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, keys, fmt in ROWS:
        f, a = _mean(fixed, *keys), _mean(adapt, *keys)
        ratio = f"{a / f:.2f}" if f and not math.isnan(f) and not math.isnan(a) else "-"
        show = lambda v, fmt=fmt: "-" if math.isnan(v) else fmt.format(v)  # noqa: E731
        lines.append(f"| {label} | {show(f)} | {show(a)} | {ratio} |")
    lines += [
        "",
        "Gear trace (adaptive, s from the schedule's start: gear): "
        + "; ".join(", ".join(f"{c['t_s']}: {c['gear']}" for c in r["gear_changes"]) for r in adapt),
        "",
        "Messages per gear (adaptive, whole run): "
        + "; ".join(json.dumps(r["overall"]["gears"]) for r in adapt),
        "",
        "## Targets (issue 15)",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |" for t in doc["targets"]
    ]
    lines += ["", "Plot: `adaptive.png` (round 0 of each mode: outstanding messages, p99 latency per second "
              "of sending, gear)."]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    s = doc["settings"]
    for mode, color in (("fixed", "tab:red"), ("adaptive", "tab:blue")):
        run = doc["runs"][mode][0]
        tl = run["timeline"]
        axes[0].plot([p["t_s"] for p in tl], [p["outstanding"] for p in tl], color=color, label=mode)
        bins: dict[int, list[float]] = {}
        for r in run["rows"]:
            if r["e2e_ms"] is not None:
                bins.setdefault(int(r["t_s"]), []).append(r["e2e_ms"] / 1e3)
        xs = sorted(bins)
        axes[1].plot(xs, [percentile(bins[x], 0.99) for x in xs], color=color, label=mode)
        axes[2].step([p["t_s"] for p in tl], [p["gear"] for p in tl], where="post", color=color, label=mode)
    for ax, name in zip(
        axes, ("outstanding (messages)", "p99 end-to-end (s), by send second", "exit gear"), strict=True
    ):
        ax.axvspan(s["base_s"], s["base_s"] + s["burst_s"], color="0.9")
        ax.set_ylabel(name)
        ax.legend(loc="upper right")
    axes[2].set_xlabel("seconds since the schedule started (grey: burst)")
    fig.suptitle(
        "fixed thresholds vs load-adaptive exit, one replica, "
        f"{s['burst_load']:.0%} burst for {s['burst_s']:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_results(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    doc["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}, {_cores()} cores"
    doc["targets"] = targets(doc)
    paths = [out / "adaptive.json", out / "adaptive.md", out / "adaptive.png"]
    slim = {
        **doc,
        "runs": {
            m: [{k: v for k, v in r.items() if k != "rows"} for r in rs] for m, rs in doc["runs"].items()
        },
    }
    paths[0].write_text(json.dumps(slim, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(doc))
    plot(doc, paths[2])
    return paths


def _cores() -> int:
    import os

    return os.cpu_count() or 0
