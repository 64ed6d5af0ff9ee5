"""``elbert-stream`` command line: the command registry only. Each command lives with the concern it
belongs to and is imported only when invoked, so ``elbert-stream produce`` does not pay for importing
torch or Ray.

A command module defines ``add_cli(subparsers)`` which adds its parser(s) and sets
``func=handler`` where ``handler(args) -> int`` (the exit status). ``bench`` and ``demo`` live in the
source checkout (``bench/``, ``examples/``), outside the installed package: they run from a clone
(``make bench``, ``make demo``) and say so when the package was installed without one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from pathlib import Path

from pydantic import ValidationError

from elbert_stream.errors import ElbertError

COMMANDS: dict[str, str] = {
    "classify": "elbert_stream.engine.classify",
    "run": "elbert_stream.run",
    "produce": "elbert_stream.stream.commands",
    "consume": "elbert_stream.stream.commands",
    "train": "elbert_stream.training.train",
    "evaluate": "elbert_stream.training.evaluate",
    "gears": "elbert_stream.training.gears",
    "broker": "elbert_stream.testing.broker",
    "bench": "bench.cli",
    "demo": "examples.demo",
}
CHECKOUT_MODULES = {"bench.cli": "make bench", "examples.demo": "make demo"}  # not installed: need a clone
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]  # the clone, when the package is an editable install


def _import_command(name: str) -> object:
    in_checkout = name in CHECKOUT_MODULES and (CHECKOUT_ROOT / name.split(".")[0]).is_dir()
    if in_checkout and str(CHECKOUT_ROOT) not in sys.path:
        sys.path.append(str(CHECKOUT_ROOT))
    return importlib.import_module(name)


def _not_installed(name: str, error: ModuleNotFoundError) -> argparse.Namespace:
    hint = CHECKOUT_MODULES.get(name)
    if hint:
        raise SystemExit(f"elbert-stream: this command runs from a source checkout of elbert-stream "
                         f"(git clone, then `{hint}`); it is not part of the installed package")
    extra = "testing" if name.startswith("elbert_stream.testing") else \
        "train" if name.startswith("elbert_stream.training") else None
    fix = f"; install the extra it needs: pip install 'elbert-stream[{extra}]'" if extra else ""
    raise SystemExit(f"elbert-stream: {error}{fix}")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbert-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        try:
            _import_command(name).add_cli(sub)  # type: ignore[attr-defined]
        except ModuleNotFoundError as e:  # a command whose module or extra is not installed
            if command in COMMANDS:
                _not_installed(name, e)
            logging.getLogger(__name__).debug("command module %s unavailable: %s", name, e)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    args.invocation = shlex.join(["elbert-stream", *argv])  # what benchmarks record as their command
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ElbertError, ValidationError) as e:  # a user's mistake (a bad ELBERT_* value, say) or a
        # known failure: its message says what to do
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        print(f"elbert-stream {args.command}: {type(e).__name__}: {e}", file=sys.stderr)  # noqa: T201
        return 1


if __name__ == "__main__":
    sys.exit(main())
