"""The user's labelled data: JSONL / CSV / Parquet files, ``datasets`` dirs, the built-in corpora.

* ``read_table(spec, columns)``: the raw rows (id, text, label value, split value) of a corpus name
  (``bbc``, ``tweets``), a JSONL / CSV / Parquet file, a ``datasets`` ``save_to_disk`` dir (needs the
  optional ``datasets`` package; a DatasetDict's keys are the rows' splits) or ``hf:NAME[:SPLIT]``.
* ``index_labels(rows, names)``: rows as a ``Dataset``; a label outside ``names`` is refused.
* ``load_dataset(spec)``: all rows of one of those as a ``Dataset``.

A missing column, an empty text, a missing label, an unknown split name or a non-UTF-8 file is a
``DataError`` quoting ``path:line`` and saying what to do. Ids are the 1-based line number (JSONL;
CSV, whose header is line 1), row number (Parquet, ``datasets``) or ``split/row`` (a DatasetDict).
The train/val/test sets of a run are ``training/splits.py``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elbert_stream.errors import ConfigError
from elbert_stream.training.data import CORPORA, DataError, Dataset, Example

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text, the label and (optionally) each row's split."""

    text: str = "text"
    label: str = "label"
    split: str | None = None


@dataclass(frozen=True)
class Row:
    """One unlabelled-yet row: ``label`` is the raw value (a name or an integer index)."""

    id: str
    text: str
    label: Any
    split: str | None = None


@dataclass(frozen=True)
class Table:
    """The rows of one source; ``label_names`` when the source fixes them (a corpus, a ClassLabel)."""

    rows: list[Row]
    source: str
    label_names: list[str] | None = None


def source_spec(spec: str) -> str:
    """The spec as recorded in ``split.json``: an existing path made absolute, names kept."""
    return str(Path(spec).resolve()) if spec not in CORPORA and Path(spec).exists() else spec


# ---- readers: (where, row dict) pairs -----------------------------------------------------------
def _rows_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
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
            yield str(n), row


def _rows_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as f:
        yield from ((str(n), row) for n, row in enumerate(csv.DictReader(f), 2))  # line 1: header


def _rows_parquet(path: Path, wanted: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{str(path)!r}: Parquet needs pyarrow (pip install 'elbert-stream[train]')") from e
    try:
        have = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in wanted if c in have])
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DataError(f"cannot read Parquet file {str(path)!r}: {e}") from e
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (have {sorted(have)}); name the right one "
                        "with --text-column / --label-column / --split-column")
    yield from ((str(n), row) for n, row in enumerate(table.to_pylist(), 1))


def _to_rows(pairs: Iterable[tuple[str, dict[str, Any]]], source: str, columns: Columns,
             split: str | None = None) -> list[Row]:
    """Checked rows: every column present, a non-empty string text, a label, a known split name."""
    wanted = [c for c in (columns.text, columns.label, columns.split) if c]
    rows = []
    for ident, row in pairs:
        where = f"{source}:{ident}"
        for col in wanted:
            if col not in row:
                raise DataError(f"{where}: no column {col!r} (have {sorted(row)}); name the right one "
                                "with --text-column / --label-column / --split-column")
        text = row[columns.text]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: empty or non-string text {str(text)[:80]!r}; fix or drop the row")
        value = row[columns.label]
        if isinstance(value, bool) or value is None or not str(value).strip():
            raise DataError(f"{where}: missing or bad label {value!r}; give every row a label")
        rows.append(Row(ident, text, value, _split_name(row[columns.split], where) if columns.split
                        else split))
    return rows


def _split_name(value: Any, where: str) -> str:
    name = SPLIT_NAMES.get(str(value).strip().lower())
    if name is None:
        raise DataError(f"{where}: split {value!r} is not one of train, val (validation, dev), test")
    return name


def _datasets_dir(path: Path, columns: Columns) -> Table:
    """A dir written by ``datasets``' ``save_to_disk``: one Dataset, or a DatasetDict whose keys
    name the rows' splits."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{str(path)!r} is a datasets save_to_disk dir: reading it needs the "
                        "'datasets' package (pip install datasets)") from e
    loaded = datasets.load_from_disk(str(path))
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    rows: list[Row] = []
    names: list[str] | None = None
    for key, ds in parts:
        feature = ds.features.get(columns.label)
        names = list(feature.names) if hasattr(feature, "names") else names
        split = _split_name(key, str(path)) if key is not None and not columns.split else None
        prefix = f"{key}/" if key is not None else ""
        rows += _to_rows(((f"{prefix}{n}", r) for n, r in enumerate(ds, 1)), str(path), columns, split)
    return Table(rows, source_spec(str(path)), names)


def load_hf(name: str, split: str = "train", text_column: str = "text", label_column: str = "label") -> Table:
    """A Hugging Face hub dataset (needs ``datasets`` and network access; imported lazily)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"dataset 'hf:{name}' needs the 'datasets' package (pip install datasets)") from e
    ds = datasets.load_dataset(name, split=split)
    feature = ds.features.get(label_column)
    names = list(feature.names) if hasattr(feature, "names") else None
    rows = _to_rows(((str(i), r) for i, r in enumerate(ds)), f"hf:{name}", Columns(text_column, label_column))
    return Table(rows, f"hf:{name}:{split}", names)


def read_table(spec: str, columns: Columns = Columns()) -> Table:  # noqa: B008 - frozen, immutable
    """The raw rows of ``spec`` (see the module doc); errors quote the path and line."""
    if spec in CORPORA:
        if columns.split:
            raise ConfigError(f"--split-column does not apply to the built-in corpus {spec!r}")
        ds = CORPORA[spec]()
        return Table([Row(e.id, e.text, ds.label_names[e.label]) for e in ds.examples], spec, ds.label_names)
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        hub = load_hf(name, split or "train", columns.text, columns.label)
        return Table(hub.rows, spec, hub.label_names)
    path = Path(spec)
    if path.is_dir():
        return _datasets_dir(path, columns)
    if not path.is_file():
        raise DataError(f"no such data file {spec!r}")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"unknown data file type {suffix!r} for {spec!r}; use one of {', '.join(FILE_TYPES)} "
                        "or a datasets save_to_disk dir")
    wanted = [c for c in (columns.text, columns.label, columns.split) if c]
    pairs = _rows_csv(path) if suffix == ".csv" else \
        _rows_parquet(path, wanted) if suffix == ".parquet" else _rows_jsonl(path)
    try:
        rows = _to_rows(pairs, spec, columns)
    except UnicodeDecodeError as e:
        raise DataError(f"{spec!r} is not UTF-8 ({e.reason} at byte {e.start}); convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from e
    if not rows:
        raise DataError(f"data file {spec!r} has no rows")
    return Table(rows, source_spec(spec))


# ---- labels -------------------------------------------------------------------------------------
def label_names_of(rows: Iterable[Row]) -> list[str]:
    """Distinct label values in sorted order (integers numerically, before names)."""
    values = {str(r.label).strip() for r in rows}
    return sorted(values, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))


def index_labels(rows: list[Row], names: list[str], source: str, split: str = "train") -> Dataset:
    """``rows`` as a Dataset over ``names``; a label outside them (a name, or an integer index into
    them) is a ``DataError`` naming the row."""
    examples = []
    for r in rows:
        key = str(r.label).strip()
        if key not in names and key.isdigit() and int(key) < len(names):
            key = names[int(key)]
        if key not in names:
            raise DataError(f"{source}:{r.id}: label {r.label!r} is not one of the training labels {names}; "
                            f"every {split} label must occur in the training data")
        examples.append(Example(r.id, r.text, names.index(key)))
    return Dataset(examples, names)


def load_dataset(spec: str, text_column: str = "text", label_column: str = "label",
                 label_names: list[str] | None = None) -> Dataset:
    """All rows of ``spec`` (a corpus name, a file, a ``datasets`` dir or ``hf:NAME[:SPLIT]``).

    Labels may be names or integers. With ``label_names`` given every label must be one of them (or
    an index into them); else a source's own names (a corpus, a ClassLabel), else the sorted values.
    """
    table = read_table(spec, Columns(text_column, label_column))
    names = label_names or table.label_names or label_names_of(table.rows)
    return index_labels(table.rows, list(names), spec)


def load_texts_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                    label_names: list[str] | None = None) -> Dataset:
    """A JSONL, CSV or Parquet file with a text and a label column (``load_dataset`` of a path)."""
    return load_dataset(str(path), text_column, label_column, label_names)
