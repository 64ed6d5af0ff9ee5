"""``elbert-stream bench {engine,accuracy,stream,host,padding,ops,adaptive,all}``: the benchmarks, each
writing JSON + markdown to ``bench/results/`` with the command that produced them. ``make bench`` runs
``bench all``.

* ``engine``   variants (a)-(f) side by side + streaming latency (``engine_bench``)
* ``accuracy`` accuracy / exit depth per policy (the ``evaluate`` command, written to ``--out``)
* ``stream``   broker -> Serve replica -> broker vs the engine alone (``stream_bench``)
* ``padding``  training step time, per-batch vs whole-set padding (``train_padding``)
* ``host``     a bare kafka-python loop vs one Worker's data path, interleaved (``host_bench``)
* ``ops``      aten ops (and CUDA kernels) per steady engine step (``step_ops``)
* ``adaptive`` fixed thresholds vs load-adaptive exit gears under a 2x burst (``adaptive_bench``)
* ``all``      every part in turn with their defaults (``--quick`` shrinks each for a smoke run)

A part module offers ``add_arguments(parser)`` and a handler ``(args) -> int``; this module
adds ``--out`` and ``--quick`` to each and imports the part only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

from elbert_stream.errors import ElbertError

log = logging.getLogger(__name__)

# part -> (module, handler name); the module's add_arguments(parser) adds the part's own flags
PARTS: dict[str, tuple[str, str]] = {
    "engine": ("bench.engine_bench", "main"),
    "accuracy": ("bench.cli", "run_accuracy"),
    "stream": ("bench.stream_bench", "run_stream_bench"),
    "padding": ("bench.train_padding", "run_padding_bench"),
    "host": ("bench.host_bench", "run_host_bench"),
    "ops": ("bench.step_ops", "main"),
    "adaptive": ("bench.adaptive_bench", "run_adaptive_bench"),
}
QUICK_STREAM_MESSAGES = 100


def command_line() -> str:
    return shlex.join(["elbert-stream", *sys.argv[1:]])


def run_accuracy(args: argparse.Namespace) -> int:
    """Accuracy is the ``evaluate`` command's job; run it with this benchmark's output dir."""
    from elbert_stream import cli

    argv = ["evaluate", "--out", args.out, "--command-line", args.command_line]
    return cli.main(argv + (["--no-plots"] if args.quick else []))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """(accuracy) no flags of its own beyond ``--out``."""


def _part_module(part: str) -> Any:
    return importlib.import_module(PARTS[part][0])


def _describe(part: str) -> str:
    try:
        return (_part_module(part).__doc__ or part).strip().splitlines()[0]
    except ImportError as e:  # a part whose module is missing still shows up, and says why
        return f"(unavailable: {e})"


def _add_part_arguments(p: argparse.ArgumentParser, part: str) -> None:
    p.add_argument("--out", default="bench/results", help="directory for the JSON + markdown results")
    p.add_argument("--quick", action="store_true", help="a small smoke run (seconds to a minute)")
    try:
        _part_module(part).add_arguments(p)
    except ImportError as e:
        log.debug("bench %s unavailable: %s", part, e)


def _apply_quick(part: str, args: argparse.Namespace) -> None:
    if part == "stream" and getattr(args, "quick", False):
        args.messages = min(args.messages, QUICK_STREAM_MESSAGES)
    if part == "adaptive" and getattr(args, "quick", False):
        args.base_s, args.burst_s = min(args.base_s, 5.0), min(args.burst_s, 8.0)
        args.after_s = min(args.after_s, 25.0)


def run_part(part: str, args: argparse.Namespace) -> int:
    args.command_line = getattr(args, "command_line", None) or command_line()
    _apply_quick(part, args)
    module, handler = PARTS[part]
    func: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), handler)
    log.info("bench %s -> %s", part, args.out)
    return int(func(args) or 0)


def run_all(args: argparse.Namespace) -> int:
    """Every part with its defaults; a failing part is logged and the others still run."""
    failed = []
    for part in PARTS:
        p = argparse.ArgumentParser(prog=f"elbert-stream bench {part}", conflict_handler="resolve")
        _add_part_arguments(p, part)
        part_args = p.parse_args(["--out", args.out, *(["--quick"] if args.quick else [])])
        try:
            status = run_part(part, part_args)
        except ElbertError as e:  # a known failure (no model, no broker, ...): its message says why
            log.error("bench %s failed: %s", part, e)
            status = 1
        except Exception:  # noqa: BLE001 - one part's failure must not hide the others' results
            log.exception("bench %s failed", part)
            status = 1
        if status:
            failed.append(part)
    if failed:
        log.error("bench parts failed: %s", failed)
    return 1 if failed else 0


def add_cli(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks -> bench/results/*.json + *.md")
    parts = bench.add_subparsers(dest="part", metavar="{" + ",".join([*PARTS, "all"]) + "}", required=True)
    for part in PARTS:
        p = parts.add_parser(part, help=_describe(part), conflict_handler="resolve")
        _add_part_arguments(p, part)
        p.set_defaults(func=lambda a, part=part: run_part(part, a))
    p = parts.add_parser("all", help="every part in turn")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="a small smoke run of every part")
    p.set_defaults(func=run_all)
