"""Data: the BBC corpus, the fixed stratified split, JSONL/CSV loaders and their errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from elbert_stream.training.data import (
    DataError,
    Dataset,
    Example,
    load_bbc,
    load_dataset,
    load_texts_file,
    read_split,
    split_dataset,
    stratified_split,
    write_split,
)


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    return load_bbc()


def test_bbc_labels_are_sorted_folder_names(bbc: Dataset) -> None:
    assert len(bbc) == 2225
    assert bbc.label_names == sorted(bbc.label_names) and len(bbc.label_names) == 5
    assert bbc.label_names[0] == "business" and bbc.label_names[-1] == "tech"
    counts = Counter(bbc.labels)
    assert counts[bbc.label_names.index("business")] == 510
    assert all(e.id.startswith(bbc.label_names[e.label] + "/") for e in bbc.examples)
    assert all(e.text.strip() for e in bbc.examples)


def test_split_is_stratified_disjoint_complete_and_deterministic(bbc: Dataset) -> None:
    split = stratified_split(bbc.labels, seed=7)
    assert split == stratified_split(bbc.labels, seed=7)
    assert split != stratified_split(bbc.labels, seed=8)
    sets = {k: set(v) for k, v in split.items()}
    assert (
        not (sets["train"] & sets["val"])
        and not (sets["train"] & sets["test"])
        and not (sets["val"] & sets["test"])
    )
    assert sets["train"] | sets["val"] | sets["test"] == set(range(len(bbc)))
    total = Counter(bbc.labels)
    for name, frac in (("val", 0.1), ("test", 0.1)):
        per_class = Counter(bbc.labels[i] for i in split[name])
        for label, n in total.items():
            assert per_class[label] == round(n * frac)


def test_split_file_round_trip(bbc: Dataset, tmp_path) -> None:
    split = stratified_split(bbc.labels)
    write_split(tmp_path / "split.json", bbc, split, seed=1234, source="bbc")
    parts = read_split(tmp_path / "split.json", bbc)
    assert [e.id for e in parts["test"].examples] == [bbc.examples[i].id for i in split["test"]]
    assert split_dataset(bbc)["val"].examples == parts["val"].examples
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["seed"] == 1234 and doc["label_names"] == bbc.label_names
    with pytest.raises(DataError, match="not in the dataset"):
        Dataset([Example("x", "t", 0)], ["a"]).select_ids(["nope"])


def test_bad_split_fractions_raise() -> None:
    from elbert_stream.errors import ConfigError

    with pytest.raises(ConfigError, match="fractions"):
        stratified_split([0, 1], fractions=(0.5, 0.6, 0.1))


def test_jsonl_with_custom_columns(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"body": "a", "topic": "sport"}, {"body": "b", "topic": "arts"}, {"body": "c", "topic": "sport"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_texts_file(path, text_column="body", label_column="topic")
    assert ds.label_names == ["arts", "sport"] and ds.labels == [1, 0, 1] and ds.texts == ["a", "b", "c"]
    fixed = load_texts_file(path, "body", "topic", label_names=["sport", "arts"])
    assert fixed.labels == [0, 1, 0]
    with pytest.raises(DataError, match="not one of"):
        load_texts_file(path, "body", "topic", label_names=["sport"])


def test_csv_and_integer_labels(tmp_path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",1\nbye,0\nmore,10\n')
    ds = load_dataset(str(path))
    assert ds.texts == ["hello, world", "bye", "more"]
    assert ds.label_names == ["0", "1", "10"] and ds.labels == [1, 0, 2]
    assert [e.id for e in ds.examples] == ["2", "3", "4"]  # file line numbers


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", '{"text": "ok", "label": "a"}\n{"text": oops}\n', r"bad\.jsonl:2: not JSON"),
        ("cols.jsonl", '{"txt": "ok", "label": "a"}\n', r"cols\.jsonl:1: no column 'text'"),
        ("empty.jsonl", '{"text": "  ", "label": "a"}\n', r"empty\.jsonl:1: empty or non-string text"),
        ("nolabel.csv", "text,label\nhi,\n", r"nolabel\.csv:2: missing or bad label"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1: expected a JSON object"),
        ("none.jsonl", "\n", r"has no rows"),
        ("data.txt", "x", r"unknown data file type"),
    ],
)
def test_bad_files_raise_data_error_quoting_path_and_line(
    tmp_path, name: str, content: str, match: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_texts_file(path)


def test_missing_file_and_missing_datasets_package(tmp_path, monkeypatch) -> None:
    import sys

    with pytest.raises(DataError, match="no such data file"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_dataset("hf:ag_news")
