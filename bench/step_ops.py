"""Aten ops per steady engine step (torch CPU profiler, eager): what a step launches.

A *steady* step admits nothing and releases nothing: one shared-layer application, the head, the
policy, the state and trace updates and the one read. The count is the number of top-level
``aten::`` calls that are not views (an op called inside another op, e.g. ``addmm`` inside
``linear``, is part of its caller; ``view``/``transpose``/``select``/``unbind``... move no data).
On a GPU each counted op is roughly one kernel launch (some launch several, a view none), so at
small batch the count is what bounds the step time. The reference setup is the issue's: the L=12
tiny test model (``tests/unit/tiny_elbert.py``: hidden 32, gelu_new), its default exit policy,
8 texts of 12-19 tokens, the second step (depth 2, where nothing exits).

``python -m bench.step_ops [--device cuda] [--out DIR]`` writes ``step_ops.json`` + ``step_ops.md``
(on CUDA also the kernels launched per steady step); ``elbert-stream bench ops`` does the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from elbert_stream.config import EngineSettings, ExitSettings
from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import ElbertModel
from elbert_stream.engine.policy import ExitPolicy
from elbert_stream.types import Request

log = logging.getLogger(__name__)

VIEW_OPS = frozenset({
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::transpose",
    "aten::t", "aten::permute", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze",
    "aten::expand", "aten::as_strided", "aten::alias", "aten::flatten", "aten::unflatten", "aten::split",
    "aten::unbind", "aten::chunk", "aten::narrow", "aten::detach", "aten::resolve_conj", "aten::resolve_neg",
    "aten::lift_fresh",
})
NUM_TEXTS = 8


def _is_top(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def _copies(event: Any) -> bool:
    """A reshape/flatten that had to copy (it called clone/copy_) is not a view."""
    stack = list(event.cpu_children)
    while stack:
        child = stack.pop()
        if child.name in ("aten::clone", "aten::copy_", "aten::contiguous"):
            return True
        stack.extend(child.cpu_children)
    return False


def count_ops(events: list[Any]) -> dict[str, Any]:
    """Top-level non-view aten ops among profiler ``events``: total, all aten events, by name."""
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if _is_top(e)]
    real = [e for e in top if e.name not in VIEW_OPS or _copies(e)]
    return {"num_ops": len(real), "num_aten_events": len(aten), "num_top_level": len(top),
            "by_name": dict(Counter(e.name for e in real).most_common())}


def reference_engine(model: ElbertModel | None = None, device: str = "cpu", **settings: Any) -> Engine:
    """The reference setup (module docstring), one step in: the next step is steady."""
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit"))
        from tiny_elbert import tiny_model  # the test model, by design

        model = tiny_model(12).to(device)
    policy = ExitPolicy.for_model(ExitSettings(), model.num_layers, model.extras.exit)
    engine = Engine(model, policy, EngineSettings(max_slots=NUM_TEXTS, **settings), max_length=32)
    for i in range(NUM_TEXTS):
        engine.add(Request([2] + [5 + (i * 7 + j) % 40 for j in range(10 + i)] + [3], request_id=str(i)))
    engine.step()
    return engine


def steady_step_ops(engine: Engine) -> dict[str, Any]:
    """Profile the engine's next step; ``ValueError`` if it was not steady."""
    before = engine.stats()
    cuda = engine.model.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        out = engine.step()
    after = engine.stats()
    if out or after.num_admitted != before.num_admitted:
        raise ValueError(f"not a steady step: {len(out)} exits, {after.num_admitted - before.num_admitted} "
                         "admitted")
    events = list(prof.events())
    doc = count_ops([e for e in events if e.device_type == torch.autograd.DeviceType.CPU])
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        doc["num_cuda_kernels"] = len(kernels)
        doc["cuda_kernels"] = dict(Counter(e.name[:80] for e in kernels).most_common(40))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Aten ops per steady engine step", "", f"Command: `{doc['command']}`  ",
             f"torch {doc['torch']}; setup: {doc['setup']}", "",
             f"**{doc['num_ops']} top-level non-view aten ops** per steady step "
             f"({doc['num_aten_events']} aten events counting nested ones). Before this change "
             f"(issue #11): {doc['before']} ops."
             + (f" CUDA kernels: {doc['num_cuda_kernels']}." if "num_cuda_kernels" in doc else ""),
             "", "| op | count |", "| --- | ---: |"]
    lines += [f"| `{name}` | {n} |" for name, n in doc["by_name"].items()]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """(ops) ``--device``."""
    p.add_argument("--device", default="cpu", help="cpu | cuda")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    doc = steady_step_ops(reference_engine(device=args.device))
    command = f"python -m bench.step_ops --device {args.device}"
    doc.update(command=getattr(args, "command_line", None) or command,
               device=args.device,
               torch=torch.__version__, before=87,
               setup="tiny_model(12) (tests/unit/tiny_elbert.py), default policy, 8 texts, step 2, CPU eager")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_ops.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "step_ops.md").write_text(markdown(doc))
    log.info("steady step: %d ops (%d aten events); wrote %s/step_ops.{json,md}", doc["num_ops"],
             doc["num_aten_events"], out)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main(parser.parse_args()))
