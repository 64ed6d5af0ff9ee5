"""ELBERT loss, depth weights, and a tiny deterministic / resumable training run."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest
import torch
from tiny_elbert import LABELS, save_tiny_model_dir, tiny_model, tiny_tokenizer, write_labelled_jsonl

from elbert_stream.engine.model import ElbertModel, load_tokenizer
from elbert_stream.errors import ConfigError
from elbert_stream.training.recipe import RECIPES, TrainConfig
from elbert_stream.training.train import (
    add_cli,
    config_from_args,
    elbert_loss,
    finish,
    train,
)


def test_depth_weights_formula() -> None:
    model = tiny_model(num_layers=4)
    t = torch.tensor([4.0, 0.0, -1.0])
    with torch.no_grad():
        model.depth_logits.copy_(t)
    w = model.depth_weights()
    expected = [1 / (1 + torch.exp(-x)).item() for x in t]
    assert w[:3].tolist() == pytest.approx(expected, abs=1e-6)
    assert w[3].item() == pytest.approx(4 - sum(expected), abs=1e-6)
    assert w.sum().item() == pytest.approx(4.0, abs=1e-5)


def _lr_per_step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                 steps: int) -> list[list[float]]:
    """The learning rate of each param group at steps 0..steps-1 (optimizer steps on zero grads)."""
    lrs = []
    for _ in range(steps):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return lrs


def test_depth_logits_init_and_own_constant_learning_rate() -> None:
    from elbert_stream.training.recipe import make_optimizer

    model = tiny_model(num_layers=5)
    assert model.depth_logits.tolist() == [4.0] * 4
    cfg = TrainConfig(lr=1e-4, head_lr=1e-3, depth_lr=0.05, warmup=0.4)
    opt, sched = make_optimizer(model, cfg, total_steps=10)  # warmup: 4 steps, then decay over 6
    def group_of(param: torch.nn.Parameter) -> int:
        (i,) = [i for i, g in enumerate(opt.param_groups) if any(p is param for p in g["params"])]
        return i

    depth, encoder = group_of(model.depth_logits), group_of(model.embeddings.word_embeddings.weight)
    assert opt.param_groups[depth]["params"] == [model.depth_logits]
    lrs = _lr_per_step(opt, sched, 10)
    factor = [min((s + 1) / 4, (10 - s) / 6) for s in range(10)]  # 0.25 0.5 0.75 1 (peak) then down
    assert [lr[encoder] for lr in lrs] == pytest.approx([1e-4 * f for f in factor])
    assert [lr[depth] for lr in lrs] == pytest.approx([0.05] * 10)  # the authors': no warmup, no decay


def test_depth_with_encoder_puts_the_depth_logits_on_the_encoder_schedule() -> None:
    from elbert_stream.training.recipe import make_optimizer

    model = tiny_model(num_layers=3)
    cfg = TrainConfig(lr=1e-4, depth_lr=0.05, warmup=0.4, depth_with_encoder=True)
    opt, sched = make_optimizer(model, cfg, total_steps=10)
    lrs = _lr_per_step(opt, sched, 10)
    assert [lr[-1] for lr in lrs] == pytest.approx([0.05 * lr[0] / 1e-4 for lr in lrs])


@pytest.mark.parametrize("with_encoder", [False, True])
def test_grad_norm_clip_leaves_the_depth_gradient_alone(with_encoder: bool) -> None:
    """A huge encoder gradient is clipped to norm 1; the depth logits' gradient is not scaled with it
    (the authors' way), unless ``depth_with_encoder``."""
    from elbert_stream.training.recipe import make_optimizer
    from elbert_stream.training.train import _step

    model = tiny_model(num_layers=3).train()
    cfg = TrainConfig(depth_with_encoder=True) if with_encoder else TrainConfig()  # default: the authors'
    opt, sched = make_optimizer(model, cfg, total_steps=4)
    others = [p for p in model.parameters() if p is not model.depth_logits]
    for p in others:
        p.register_hook(lambda g: g * 1e6)
    raw: list[torch.Tensor] = []
    model.depth_logits.register_hook(lambda g: raw.append(g.clone()))
    seen: dict[str, torch.Tensor] = {}

    def before_step(*_: object) -> None:  # the gradients opt.step() uses, after clipping
        seen["depth"] = model.depth_logits.grad.clone()
        norms = torch.stack([torch.linalg.vector_norm(p.grad) for p in others])
        seen["others"] = torch.linalg.vector_norm(norms)

    opt.register_step_pre_hook(before_step)
    ids = torch.randint(5, 60, (4, 7))
    _step(cfg, model, opt, sched, (ids, torch.ones_like(ids), torch.tensor([0, 1, 2, 1])), step=0)
    assert raw[0].abs().sum() > 0
    if with_encoder:  # clipped together: the encoder's huge norm shrinks t's gradient to ~nothing
        assert seen["others"].item() <= 1.0 + 1e-4
        assert seen["depth"].abs().max() < 1e-3 * raw[0].abs().max()
    else:
        assert seen["others"].item() == pytest.approx(1.0, rel=1e-4)
        torch.testing.assert_close(seen["depth"], raw[0], rtol=0, atol=0)


def test_elbert_loss_is_weighted_sum_of_per_depth_ce_and_reaches_t() -> None:
    model = tiny_model(num_layers=3).train()
    ids = torch.randint(5, 60, (4, 7))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1, 2, 1])
    logits = model(ids, mask)  # [L, B, K]
    weights = model.depth_weights()
    loss, ce = elbert_loss(logits, labels, weights)
    manual = [torch.nn.functional.cross_entropy(logits[d], labels) for d in range(3)]
    assert ce.tolist() == pytest.approx([m.item() for m in manual], abs=1e-6)
    assert loss.item() == pytest.approx(
        sum(w * m for w, m in zip(weights.tolist(), ce.tolist(), strict=True)), abs=1e-5
    )
    loss.backward()
    grad = model.depth_logits.grad
    assert grad is not None and grad.abs().sum() > 0
    # dL/dt_i = sigmoid'(t_i) * (CE_i - CE_L)
    s = torch.sigmoid(model.depth_logits.detach())
    torch.testing.assert_close(grad, s * (1 - s) * (ce[:-1] - ce[-1]), atol=1e-6, rtol=1e-4)


def _tiny_cfg(tmp_path, **kw) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_labelled_jsonl(tmp_path / "data.jsonl", n=30)
    init = save_tiny_model_dir(tmp_path / "init", num_layers=3)
    return TrainConfig(
        out=str(tmp_path / "out"),
        init=str(init),
        data=str(data),
        num_layers=3,
        max_length=16,
        batch_size=8,
        epochs=2,
        lr=1e-3,
        head_lr=1e-2,
        save_dtype="float32",
        threads=1,
        checkpoint_every=2,
        **kw,
    )


def test_training_is_deterministic_and_resume_continues_exactly(tmp_path) -> None:
    cfg_a = _tiny_cfg(tmp_path / "a")
    straight = train(cfg_a)
    cfg_b = _tiny_cfg(tmp_path / "b")
    train(cfg_b, stop_at_step=3)  # "interrupted" mid-epoch 2 (3 steps per epoch)
    resumed = train(cfg_b, resume=True)
    assert straight.steps == resumed.steps == 6
    for (name, p), q in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(p, q, msg=f"{name} differs after resume")
    assert len(straight.val_depth_accuracy) == 3
    assert not torch.equal(straight.model.depth_logits.detach(), torch.full((2,), 4.0))  # t learned


def test_finish_saves_a_loadable_dir_with_split_card_and_exit_defaults(tmp_path) -> None:
    cfg = _tiny_cfg(tmp_path, max_steps=2)
    out = finish(cfg, train(cfg))
    model = ElbertModel.from_pretrained(out)
    assert model.label_names == sorted(LABELS) and model.num_layers == 3
    assert model.extras.exit.policy == "confidence_window"
    assert load_tokenizer(out)("market")["input_ids"]
    card = (out / "MODEL_CARD.md").read_text()
    assert (out / "split.json").is_file() and "Accuracy per depth" in card
    assert "train 24 rows of " in card and "data.jsonl (split seed 1234)" in card
    assert not (out / "checkpoint").exists()


def test_cli_flags_override_recipe_and_bad_init_is_a_config_error(tmp_path) -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["train", "--recipe", "bbc-minilm", "--epochs", "1", "--no-trim-vocab", "--out", "x"]
    )
    cfg = config_from_args(args)
    assert cfg.epochs == 1 and cfg.trim_vocab is False and cfg.out == "x"
    assert cfg.pooling == RECIPES["bbc-minilm"]["pooling"] == "mean" and cfg.init == "minilm"
    bad = _tiny_cfg(tmp_path)
    bad.init = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="nope"):
        train(bad)


def test_sentencepiece_tokenizer_from_training_texts(tmp_path) -> None:
    from elbert_stream.training.convert import train_sentencepiece

    texts = [
        f"the market for {w} shares rose {i} points" for i, w in enumerate(["film", "chip", "vote"] * 40)
    ]
    tok = train_sentencepiece(texts, tmp_path, vocab_size=60)
    assert (tmp_path / "spiece.model").is_file()
    ids = tok("the market rose")["input_ids"]
    assert len(ids) > 3 and tok.unk_token_id not in ids[1:-1]
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok")("the market rose")["input_ids"] == ids


def test_every_train_flag_has_help_text() -> None:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert len(flags) == len(fields(TrainConfig)) + 2  # + --recipe, --resume
    assert all(a.help and len(a.help) > 15 for a in flags), [a.dest for a in flags if not a.help]
    text = sub.format_help()
    assert "--train TRAIN" in text and "--split-column" in text and "10% of --train" in text


def test_the_model_is_named_after_the_run(tmp_path) -> None:
    cfg = _tiny_cfg(tmp_path, max_steps=1)
    assert cfg.model_name == "out"
    model = ElbertModel.from_pretrained(finish(cfg, train(cfg)))
    assert model.extras.name == "out"
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["train", "--recipe", "bbc-minilm", "--out", "models/news-topics"])
    assert config_from_args(args).model_name == "news-topics"  # not the recipe's bbc-elbert
    args = parser.parse_args(["train", "--recipe", "bbc-minilm", "--train", "t.jsonl", "--name", "mine"])
    cfg = config_from_args(args)
    assert cfg.data is None and cfg.train == "t.jsonl" and cfg.model_name == "mine"


def test_train_on_the_users_files_from_the_command_line(tmp_path) -> None:
    from elbert_stream.cli import main

    train_file = write_labelled_jsonl(tmp_path / "train.jsonl", n=30, seed=3, text_key="body")
    val_file = write_labelled_jsonl(tmp_path / "val.jsonl", n=9, seed=4, text_key="body")
    init = save_tiny_model_dir(tmp_path / "init", num_layers=3)
    out = tmp_path / "my-run"
    rc = main(["train", "--init", str(init), "--train", str(train_file), "--val", str(val_file),
               "--text-column", "body", "--out", str(out), "--num-layers", "3", "--max-length", "16",
               "--max-steps", "2", "--save-dtype", "float32", "--threads", "1"])
    assert rc == 0
    doc = json.loads((out / "split.json").read_text())
    assert len(doc["val"]) == 9 and doc["sources"]["val"] == str(val_file.resolve())
    assert len(doc["test"]) == 3 and doc["sources"]["test"] == doc["sources"]["train"]  # carved: 10%
    assert ElbertModel.from_pretrained(out).extras.name == "my-run"


def test_per_batch_padding_gives_the_same_outputs_as_padding_to_the_longest_text() -> None:
    from elbert_stream.training.scoring import encode, pad_batch, tokenize

    tok = tiny_tokenizer()
    texts = ["market", "shares film music vote party goal match phone chip", "vote party"]
    seqs = tokenize(tok, texts, 32)
    ids, mask = pad_batch(seqs[:1] + seqs[2:], int(tok.pad_token_id))  # the short ones: [2, 4]
    assert ids.shape == (2, max(len(seqs[0]), len(seqs[2])))
    set_ids, set_mask = encode(tok, texts, 32)  # padded to the longest of all three
    model = tiny_model(num_layers=3, pooling="mean")
    with torch.no_grad():
        per_batch = model(ids, mask)  # [L, 2, K]
        whole = model(set_ids[[0, 2]], set_mask[[0, 2]])
    torch.testing.assert_close(per_batch, whole, atol=1e-5, rtol=0)
    assert mask.sum().item() == set_mask[[0, 2]].sum().item() < set_mask[[0, 2]].numel()


def test_progress_reports_rate_and_time_left() -> None:
    from elbert_stream.training.progress import RunProgress, format_duration

    now = [100.0]
    p = RunProgress(total=100, done=20, batch_size=16, clock=lambda: now[0])  # resumed at step 20
    assert p.rate_text() == "- steps/s" and p.eta_s is None and "ETA -" in p.summary()
    now[0] += 40.0
    p.advance(10)
    assert p.steps_per_s == pytest.approx(0.25) and p.eta_s == pytest.approx(280.0)
    assert p.summary() == "step 30/100 (30.0%), 0.25 steps/s, 4.0 texts/s, elapsed 40s, ETA 4m40s"
    now[0] += 1000.0
    assert p.rate_text().startswith("104.0 s/step")
    assert [format_duration(s) for s in (7.2, 160, 3723)] == ["7s", "2m40s", "1h02m03s"]
