"""The train/val/test sets of a training run, and the held-out sets of a saved model.

* ``load_splits(DataSpec)``: ``--train`` [``--val``] [``--test``] files; or one ``--data`` set whose
  rows name their split (``--split-column``, or a ``datasets`` DatasetDict dir's keys); or one set
  split 80/10/10. A split not given is carved from the training rows (10 % per class, stratified,
  seed ``split_seed``; logged). Label names are the training rows' (sorted; a corpus's or a
  ClassLabel's own order); a val/test label outside them and an empty split are refused.
* ``read_model_split(model_dir)``: the val/test sets a model's ``split.json`` names, reloaded from
  the sources it records.
* ``rows_seen_in_training(doc, dataset, source)``: the rows of a set that the model trained on
  (by ``split.json``'s text hashes, or by id when the set is the training source itself).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elbert_stream.errors import ConfigError
from elbert_stream.training.data import (
    DEFAULT_SEED,
    SPLITS,
    DataError,
    Dataset,
    read_split_doc,
    stratified_split,
    text_hash,
    write_split_parts,
)
from elbert_stream.training.files import Columns, Row, index_labels, label_names_of, read_table, source_spec

log = logging.getLogger(__name__)

CARVE_FRACTION = 0.1  # of the training rows, per class, for each split that is not given


@dataclass(frozen=True)
class DataSpec:
    """Where a run's data comes from (the data flags of ``elbert-stream train``)."""

    data: str | None = "bbc"
    train: str | None = None
    val: str | None = None
    test: str | None = None
    columns: Columns = field(default_factory=Columns)
    seed: int = DEFAULT_SEED

    @classmethod
    def of(cls, cfg: Any) -> DataSpec:
        """The spec of a ``TrainConfig``."""
        return cls(cfg.data, cfg.train, cfg.val, cfg.test,
                   Columns(cfg.text_column, cfg.label_column, cfg.split_column), cfg.split_seed)


@dataclass(frozen=True)
class RunData:
    """A run's ``train``/``val``/``test`` sets and the source spec each one's ids refer to."""

    parts: dict[str, Dataset]
    sources: dict[str, str]
    columns: Columns

    @property
    def label_names(self) -> list[str]:
        return self.parts["train"].label_names

    def write(self, path: Path, seed: int) -> None:
        """``split.json`` for these sets."""
        cols = {"text": self.columns.text, "label": self.columns.label, "split": self.columns.split}
        write_split_parts(path, self.parts, seed, self.sources, cols)


def _gather(spec: DataSpec) -> tuple[dict[str, list[Row]], dict[str, str], list[str]]:
    """Rows per split given, their sources, and the label names (from the training rows)."""
    if spec.train:
        if spec.data is not None:
            raise ConfigError("give either --data (one set) or --train [--val] [--test] (files), not both")
        if spec.columns.split:
            raise ConfigError("--split-column goes with --data FILE; with --train the files are the splits")
        plain = Columns(spec.columns.text, spec.columns.label)
        tables = {s: read_table(f, plain) for s, f in zip(SPLITS, (spec.train, spec.val, spec.test),
                                                          strict=True) if f}
        for s, t in tables.items():
            if any(r.split for r in t.rows):
                raise ConfigError(f"--{s} {t.source!r} names its own splits (a datasets DatasetDict); give "
                                  "it as --data DIR instead")
        rows = {s: t.rows for s, t in tables.items()}
        return rows, {s: t.source for s, t in tables.items()}, \
            tables["train"].label_names or label_names_of(rows["train"])
    if spec.val or spec.test:
        raise ConfigError("--val/--test go with --train FILE; one --data file names its splits with "
                          "--split-column")
    if spec.data is None:
        raise ConfigError("no data: give --data (bbc, tweets, a file) or --train FILE")
    table = read_table(spec.data, spec.columns)
    grouped: dict[str, list[Row]] = {}
    for r in table.rows:
        grouped.setdefault(r.split or "train", []).append(r)
    if "train" not in grouped:
        raise DataError(f"no training rows in {spec.data!r} (splits found: {sorted(grouped)}); mark "
                        f"the rows to train on with split 'train'")
    return grouped, {s: table.source for s in grouped}, table.label_names or label_names_of(grouped["train"])


def _carve(parts: dict[str, Dataset], sources: dict[str, str], seed: int) -> None:
    """Fill a missing val/test (in place) with a stratified share of the training rows."""
    missing = [s for s in ("val", "test") if s not in parts]
    if not missing:
        return
    fr = {s: CARVE_FRACTION if s in missing else 0.0 for s in ("val", "test")}
    train = parts["train"]
    split = stratified_split(train.labels, seed, (1.0 - fr["val"] - fr["test"], fr["val"], fr["test"]))
    parts["train"] = train.subset(split["train"])
    for s in missing:
        parts[s], sources[s] = train.subset(split[s]), sources["train"]
    log.info("%s: %d%% per class of the %d training rows of %s (seed %d)", " and ".join(missing),
             round(CARVE_FRACTION * 100), len(train), sources["train"], seed)


def load_splits(spec: DataSpec) -> RunData:
    """The run's three sets (see the module doc); every one non-empty."""
    rows, sources, names = _gather(spec)
    given = set(rows)
    parts = {s: index_labels(rows[s], names, sources[s], s) for s in rows}
    _carve(parts, sources, spec.seed)
    for s in SPLITS:
        if not len(parts[s]):
            how = (f"{round(CARVE_FRACTION * 100)}% per class of the training rows rounds to 0"
                   if s not in given else f"no {s} rows in {sources[s]}")
            flag = f"--{s} FILE" if spec.train else "more data, or rows marked with this split"
            raise DataError(f"the {s} split is empty ({how}); give {flag}")
    _warn_overlap(parts)
    return RunData(parts, sources, spec.columns)


def _warn_overlap(parts: Mapping[str, Dataset]) -> None:
    """Warn when val/test repeat training texts (their scores would flatter the model)."""
    seen = {text_hash(t) for t in parts["train"].texts}
    for s in ("val", "test"):
        n = sum(text_hash(t) in seen for t in parts[s].texts)
        if n:
            log.warning("%d of the %d %s texts also occur in the training split: %s scores on them "
                        "overstate accuracy on unseen text; deduplicate the data", n, len(parts[s]), s, s)


# ---- a saved model's split ----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSplit:
    """``split.json`` of a model and the held-out sets it names."""

    doc: dict[str, Any]
    parts: dict[str, Dataset]  # "val", "test"
    sources: dict[str, str]


def split_sources(doc: Mapping[str, Any]) -> dict[str, str]:
    """The source spec of each split's ids (older files name one ``source`` for all)."""
    return dict(doc.get("sources") or {s: doc["source"] for s in SPLITS})


def read_model_split(model_dir: Path) -> ModelSplit | None:
    """The val/test sets named by ``model_dir/split.json``; None when the model has none."""
    path = model_dir / "split.json"
    if not path.is_file():
        return None
    doc = read_split_doc(path)
    sources, cols = split_sources(doc), doc.get("columns") or {}
    columns = Columns(cols.get("text") or "text", cols.get("label") or "label")
    parts: dict[str, Dataset] = {}
    for s in ("val", "test"):
        try:
            table = read_table(sources[s], columns)
        except DataError as e:
            raise DataError(f"{path} names {sources[s]!r} as the {s} data, which cannot be read ({e}); "
                            "give --data FILE [--val-data FILE] to evaluate on other data") from e
        parts[s] = index_labels(table.rows, doc["label_names"], sources[s], s).select_ids(doc[s])
    return ModelSplit(doc, parts, sources)


def rows_seen_in_training(doc: Mapping[str, Any], dataset: Dataset, source: str) -> list[str]:
    """Ids of the rows of ``dataset`` (read from ``source``) that the model of ``doc`` trained on."""
    hashes = set(doc.get("train_text_hashes") or ())
    if hashes:
        return [e.id for e in dataset.examples if text_hash(e.text) in hashes]
    if source_spec(source) == split_sources(doc).get("train"):
        seen = set(doc.get("train") or ())
        return [e.id for e in dataset.examples if e.id in seen]
    return []


# ---- what evaluate scores -----------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSets:
    """The validation set thresholds are chosen on, the test set they are scored on, and where each
    came from (for the report); ``training_rows`` counts rows the model trained on, per set."""

    val: Dataset
    test: Dataset
    described: dict[str, str]
    training_rows: dict[str, int]


def evaluation_sets(model_dir: Path, data: str | None, val_data: str | None, columns: Columns,
                    allow_training_rows: bool = False) -> EvalSets:
    """The model's own held-out val/test (``split.json``) when ``data`` is omitted or is the data it
    was trained on; else ``data`` as test and ``val_data`` (default: a stratified 10 % of ``data``)
    as validation. Rows the model trained on are refused unless ``allow_training_rows`` (then
    counted, with a warning)."""
    own = read_model_split(model_dir)
    trained_on = own and own.sources.get("train")
    if data is None or (own and val_data is None and source_spec(data) == trained_on):
        if own is None:
            raise DataError(f"{str(model_dir)!r} has no split.json, so its held-out data is unknown; give "
                            "--data FILE (and --val-data FILE) to evaluate on data it did not train on")
        described = {s: f"held-out {s} split of {own.sources[s]} (split.json)" for s in ("val", "test")}
        return EvalSets(own.parts["val"], own.parts["test"], described, {"val": 0, "test": 0})
    test = read_labelled(data, columns)
    if val_data:
        val, described = read_labelled(val_data, columns), {"val": val_data, "test": data}
    else:
        split = stratified_split(test.labels, DEFAULT_SEED, (0.9, 0.1, 0.0))
        val, test = test.subset(split["val"]), test.subset(split["train"])
        described = {"val": f"stratified 10% of {data}", "test": f"the other 90% of {data}"}
        log.warning("no --val-data: choosing thresholds on %d of the %d rows of %s, testing on the rest",
                    len(val), len(val) + len(test), data)
    seen = {"val": rows_seen_in_training(own.doc, val, val_data or data) if own else [],
            "test": rows_seen_in_training(own.doc, test, data) if own else []}
    _refuse_training_rows(seen, {"val": len(val), "test": len(test)}, described, allow_training_rows)
    return EvalSets(val, test, described, {s: len(v) for s, v in seen.items()})


def read_labelled(spec: str, columns: Columns) -> Dataset:
    """All rows of ``spec`` with its own label names (``evaluate`` maps them to the model's by name)."""
    table = read_table(spec, Columns(columns.text, columns.label))
    return index_labels(table.rows, table.label_names or label_names_of(table.rows), spec)


def _refuse_training_rows(seen: Mapping[str, list[str]], sizes: Mapping[str, int],
                          described: Mapping[str, str], allow: bool) -> None:
    for s, ids in seen.items():
        if not ids:
            continue
        what = (f"{len(ids)} of the {sizes[s]} {s} rows ({described[s]}) are rows the model trained on "
                f"(e.g. ids {ids[:3]})")
        if not allow:
            raise DataError(f"{what}: their scores say nothing about unseen text. Evaluate on the model's "
                            "held-out split (omit --data), on data it did not train on, or pass "
                            "--allow-training-rows to score them anyway")
        log.warning("%s; scoring them anyway (--allow-training-rows): the %s numbers OVERSTATE the "
                    "accuracy on unseen text", what, s)
