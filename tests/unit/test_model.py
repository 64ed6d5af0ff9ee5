"""ElbertModel: parity with transformers' ALBERT at every depth, persistence, loading errors."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from tiny_elbert import LABELS, save_tiny_model_dir, tiny_model, tiny_tokenizer
from transformers import AlbertForSequenceClassification

from elbert_stream.engine.model import ElbertModel, load_tokenizer, shipped_model_dir
from elbert_stream.errors import ModelLoadError


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    enc = tiny_tokenizer()(
        ["market shares vote", "goal", "a film about music and a phone chip"],
        padding=True,
        return_tensors="pt",
    )
    assert enc["attention_mask"].sum(1).unique().numel() == 3  # mixed lengths, really padded
    return enc["input_ids"], enc["attention_mask"]


def test_every_depth_matches_transformers_albert_for_sequence_classification() -> None:
    model = tiny_model(num_layers=5, pooling="cls")
    ids, mask = _padded_batch()
    with torch.no_grad():
        ours = model(ids, mask)  # [L, B, K]
    assert ours.shape == (5, 3, len(LABELS))
    state = model.hf_model.state_dict()
    for depth in range(1, 6):
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = depth
        config._attn_implementation = "eager"
        hf = AlbertForSequenceClassification(config).eval()
        hf.load_state_dict(state)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask).logits  # [B, K]
        torch.testing.assert_close(ours[depth - 1], ref, atol=1e-5, rtol=0)


def test_step_api_equals_forward() -> None:
    model = tiny_model(num_layers=3, pooling="mean")
    ids, mask = _padded_batch()
    with torch.no_grad():
        hidden = model.embed(ids, mask)
        steps = []
        for _ in range(3):
            hidden = model.layer(hidden, mask)
            steps.append(model.classify(hidden, mask))
        torch.testing.assert_close(torch.stack(steps), model(ids, mask), atol=1e-6, rtol=0)


def test_save_load_round_trip_keeps_elbert_block_and_depth_logits(tmp_path) -> None:
    model = tiny_model(num_layers=4, pooling="mean")
    with torch.no_grad():
        model.depth_logits.copy_(torch.tensor([1.5, -0.5, 2.0]))
    model.extras.exit.tau = 0.25
    model.extras.name = "tiny"
    model.save_pretrained(tmp_path, tokenizer=tiny_tokenizer())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "albert"
    assert saved["elbert"]["depth_logits"] == pytest.approx([1.5, -0.5, 2.0])
    loaded = ElbertModel.from_pretrained(tmp_path)
    assert loaded.extras.pooling == "mean" and loaded.extras.exit.tau == 0.25 and loaded.extras.name == "tiny"
    torch.testing.assert_close(loaded.depth_logits.detach(), torch.tensor([1.5, -0.5, 2.0]))
    assert loaded.label_names == LABELS
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))
    tok = load_tokenizer(tmp_path)
    assert tok("market shares")["input_ids"] == tiny_tokenizer()("market shares")["input_ids"]


def test_save_in_float16_loads_as_float32_close(tmp_path) -> None:
    model = tiny_model(num_layers=2)
    model.save_pretrained(tmp_path, dtype=torch.float16)
    loaded = ElbertModel.from_pretrained(tmp_path)
    assert loaded.dtype == torch.float32 and model.dtype == torch.float32
    ids, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), atol=2e-2, rtol=0)


def test_albert_model_only_checkpoint_is_refused_for_serving_and_gets_a_head_for_training(tmp_path,
                                                                                          caplog) -> None:
    model = tiny_model(num_layers=2)
    model.hf_model.albert.save_pretrained(tmp_path)  # an AlbertModel: no classifier
    with pytest.raises(ModelLoadError, match="no classifier .*classifier.weight.*elbert-stream train"):
        ElbertModel.from_pretrained(tmp_path)  # serving it would answer with a random head
    with caplog.at_level(logging.WARNING, logger="elbert_stream.engine.model"):
        loaded = ElbertModel.from_pretrained(tmp_path, label_names=["x", "y"], allow_missing_head=True)
    assert loaded.num_labels == 2 and loaded.label_names == ["x", "y"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "classifier absent" in warned and "fine-tune" in warned
    torch.testing.assert_close(loaded.shared_layer.ffn.weight, model.shared_layer.ffn.weight)


def test_a_head_for_other_labels_is_refused_unless_replaced(tmp_path) -> None:
    save_tiny_model_dir(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="predicts .* the data has .*--new-head"):
        ElbertModel.from_pretrained(tmp_path / "m", label_names=["x", "y", "z"])
    fresh = ElbertModel.from_pretrained(tmp_path / "m", label_names=["x", "y"], new_head=True)
    assert fresh.label_names == ["x", "y"] and float(fresh.classifier.bias.abs().sum()) == 0.0


def test_non_albert_and_tokenizer_less_dirs_are_refused(tmp_path) -> None:
    save_tiny_model_dir(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    (tmp_path / "bert" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="'bert' checkpoint.*ALBERT"):
        ElbertModel.from_pretrained(tmp_path / "bert")
    bare = tmp_path / "bare"
    tiny_model(num_layers=2).save_pretrained(bare)  # weights and config, no tokenizer
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(bare)


def test_fine_tuning_a_loaded_dir_keeps_every_elbert_field(tmp_path) -> None:
    """A model loaded from a dir (transformers copies its config) saves the ELBERT block it carries."""
    save_tiny_model_dir(tmp_path / "a", num_layers=4, pooling="mean")
    model = ElbertModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        model.depth_logits.copy_(torch.tensor([0.5, 1.5, -1.0]))
    model.extras.exit = model.extras.exit.model_copy(update={"tau": 0.33, "window": 2})
    model.extras.name, model.extras.version = "mine", "7"
    model.save_pretrained(tmp_path / "b", tokenizer=load_tokenizer(tmp_path / "a"))
    again = ElbertModel.from_pretrained(tmp_path / "b")
    assert again.extras.pooling == "mean" and (again.extras.name, again.extras.version) == ("mine", "7")
    assert again.extras.exit.tau == 0.33 and again.extras.exit.window == 2
    assert again.extras.depth_logits == pytest.approx([0.5, 1.5, -1.0])


def test_bad_dirs_raise_model_load_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        ElbertModel.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read ALBERT config"):
        ElbertModel.from_pretrained(tmp_path)
    save_tiny_model_dir(tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load ALBERT weights"):
        ElbertModel.from_pretrained(tmp_path / "ok")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(tmp_path / "missing")


def _shipped() -> Path:
    """The shipped model dir: package data, so its absence is a broken install or checkout (a failure)."""
    try:
        return shipped_model_dir()
    except ModelLoadError as e:
        missing = str(e)
    pytest.fail(f"the shipped model is part of the package but is missing: {missing}", pytrace=False)


def test_shipped_model_is_an_ordinary_albert_dir_and_small() -> None:
    path = _shipped()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "albert" and config["num_hidden_layers"] == 12
    assert config["elbert"]["exit"]["policy"] == "confidence_window"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"shipped model dir is {size / 2**20:.1f} MiB"


def test_shipped_model_full_depth_accuracy_on_test_slice() -> None:
    from elbert_stream.training.data import load_bbc, read_split
    from elbert_stream.training.scoring import all_depth_probs, depth_accuracy, encode

    path = _shipped()
    model, tok = ElbertModel.from_pretrained(path), load_tokenizer(path)
    test = read_split(path / "split.json", load_bbc())["test"].subset(range(0, 223, 3))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~5 s; several threads on a busy 2-core machine are far slower
    try:
        probs = all_depth_probs(model, *encode(tok, test.texts, 128))
    finally:
        torch.set_num_threads(threads)
    acc = depth_accuracy(probs, torch.tensor(test.labels))
    assert acc[-1] >= 0.95, acc
