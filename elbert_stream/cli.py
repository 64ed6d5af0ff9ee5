"""``elbert-stream`` command line. Each command lives in its own module and is imported only
when invoked, so ``elbert-stream produce`` does not pay for importing torch or Ray.

A command module defines ``add_cli(subparsers)`` which adds its parser(s) and sets
``func=handler`` where ``handler(args) -> int`` (the exit status).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

COMMANDS: dict[str, str] = {
    "train": "elbert_stream.train",
    "evaluate": "elbert_stream.evaluate",
    "classify": "elbert_stream.evaluate",
    "bench": "elbert_stream.bench",
    "run": "elbert_stream.worker",
    "demo": "elbert_stream.demo",
    "produce": "elbert_stream.kafka_cli",
    "consume": "elbert_stream.kafka_cli",
    "broker": "elbert_stream.broker",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbert-stream", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {COMMANDS[command]} if command in COMMANDS else set(COMMANDS.values())
    for name in sorted(modules):
        try:
            importlib.import_module(name).add_cli(sub)
        except ModuleNotFoundError as e:  # a command whose module is not installed
            if command in COMMANDS:
                raise
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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
