"""``elbert-stream classify``: texts from the arguments or stdin through the continuous-batching
``Engine`` (the same engine a replica runs), printing each label, exit depth and per-depth trace.

Stdin is read in chunks of ``--batch`` lines; each chunk runs through the engine's slots together and
its results print in input order, so a pipe sees output as it goes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import ValidationError

from elbert_stream.config import ExitSettings, Settings
from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import ElbertModel
from elbert_stream.engine.policy import POLICIES
from elbert_stream.errors import BadMessage, ConfigError
from elbert_stream.types import Prediction, Request

THRESHOLD_FLAGS = ("policy", "tau", "window", "patience", "min_depth")


def classify_texts(engine: Engine, texts: list[str]) -> list[Prediction | BadMessage]:
    """Every text through ``engine`` in one continuous batch; results in input order. A text the
    engine cannot take (say, nothing left after tokenizing) is its ``BadMessage`` in its place."""
    out: list[Prediction | BadMessage | None] = [None] * len(texts)

    def bad(request: Request, error: BadMessage) -> None:
        out[request.meta] = error

    requests = [Request(tokens, text=text, meta=i)
                for i, (text, tokens) in enumerate(zip(texts, engine.tokenize(texts), strict=True))]
    for pred in engine.run_all(requests, on_bad=bad):
        out[pred.meta] = pred
    return [r for r in out if r is not None]


def engine_for_cli(args: argparse.Namespace) -> Engine:
    """The engine ``classify`` runs: the same ``Settings`` as every command (``ELBERT_MODEL__PATH``,
    ``ELBERT_EXIT__*``, ...) with the flags on top; unset exit fields take the model's saved ones."""
    settings = Settings()
    if args.model:
        settings.model.path = args.model
    changes = {k: getattr(args, k) for k in THRESHOLD_FLAGS if getattr(args, k, None) is not None}
    try:
        settings.exit = ExitSettings.model_validate({**settings.exit.model_dump(), **changes})
    except ValidationError as e:
        raise ConfigError(f"bad exit flags {changes}: {e.errors()[0]['msg']}") from e
    if args.max_length:
        settings.model.max_length = args.max_length
    elif "max_length" not in settings.model.model_fields_set:  # the default, for a model with fewer positions
        settings.model.max_length = min(settings.model.max_length, _max_positions(settings.model.path))
    return Engine.from_settings(settings)


def _max_positions(path: str | None) -> int:
    return ElbertModel.config_of(path).max_position_embeddings


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = (t for t in texts if t.strip())
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _classify(args: argparse.Namespace) -> int:
    engine = engine_for_cli(args)
    names = engine.model.label_names
    texts: Iterable[str] = args.text or (line.rstrip("\n") for line in sys.stdin)
    status = 0
    for chunk in _chunks(texts, args.batch):
        for text, result in zip(chunk, classify_texts(engine, chunk), strict=True):
            if isinstance(result, BadMessage):
                print(f"elbert-stream classify: {result.reason}: {result.detail}", file=sys.stderr)
                status = 1
            elif args.json:
                print(json.dumps({**result.to_dict(), "text": text[:200]}), flush=True)
            else:
                steps = " ".join(f"{t.depth}:{names[t.label_index]}@{t.top_prob:.2f}" for t in result.trace)
                print(f"{result.label}\texit_depth={result.exit_depth} ({result.exit_reason})\t{steps}",
                      flush=True)
    return status


def add_cli(subparsers: Any) -> None:
    c = subparsers.add_parser("classify", help="classify texts (args or one per stdin line) with early exit",
                              description="Runs the texts through the continuous-batching engine; the exit "
                                          "rule is the model's saved one unless a flag changes it.")
    c.add_argument("text", nargs="*", help="texts; none = read one per stdin line")
    c.add_argument("--model", help="model dir (default: ELBERT_MODEL__PATH, else the shipped BBC model)")
    c.add_argument("--json", action="store_true", help="one JSON object per line")
    c.add_argument("--max-length", type=int, default=None,
                   help="truncation length in tokens (default: ELBERT_MODEL__MAX_LENGTH, else 128 or the "
                        "model's maximum positions if fewer)")
    c.add_argument("--batch", type=int, default=64, help="stdin lines classified together (engine slots)")
    c.add_argument("--policy", choices=POLICIES, help="default: the model's saved policy")
    c.add_argument("--tau", type=float, help="normalised-entropy threshold in [0, 1]")
    c.add_argument("--window", type=int, help="confidence window length in depths")
    c.add_argument("--patience", type=int, help="PABEE patience")
    c.add_argument("--min-depth", type=int, help="no exit before this depth")
    c.set_defaults(func=_classify)
