"""Training step time: each batch padded to its own longest text vs to the longest text of the set.

Two copies of the same ``bbc-minilm`` starting model (MiniLM-L6 layer 2 as the shared layer, 12
depths, mean pooling) take the same optimizer steps on the same batches of tweets (the development
corpus), one with batches padded to their own longest text (``train`` now), one padded to the
longest text of the whole corpus (``train`` before #14 padded every batch to the longest text
of the whole training split). The steps alternate A, B, A, B, ... so a
load change on the shared machine hits both alike; the result is the ratio of their median step
times and the share of token slots that hold a real token. Writes ``train_padding.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from elbert_stream.training.recipe import RECIPES, TrainConfig, init_model, make_optimizer
from elbert_stream.training.scoring import pad_batch, tokenize
from elbert_stream.training.train import _step


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--examples", type=int, default=320, help="tweets sampled (default 320)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per step (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


def _batches(seqs: list[list[int]], batch_size: int, pad_id: int, width: int) -> list[dict[str, Any]]:
    """Per batch: the token ids padded to its own longest text and to ``width``."""
    out = []
    for b in range(0, len(seqs) - batch_size + 1, batch_size):
        chunk = seqs[b : b + batch_size]
        own = pad_batch(chunk, pad_id)
        whole = pad_batch([*chunk, [pad_id] * width], pad_id)  # a pad row forces the set's width
        out.append({"batch": own, "set": (whole[0][:-1], whole[1][:-1]), "tokens": sum(map(len, chunk))})
    return out


def run_padding_bench(args: argparse.Namespace) -> int:
    from elbert_stream.training.data import load_tweets

    torch.set_num_threads(args.threads)
    n = 8 * args.batch_size if args.quick else args.examples
    tweets = load_tweets()
    picked = random.Random(0).sample(range(len(tweets)), n)
    texts, labels = [tweets.examples[i].text for i in picked], [tweets.examples[i].label for i in picked]
    cfg = TrainConfig(**{**RECIPES["bbc-minilm"], "data": "tweets", "trim_vocab": False})
    torch.manual_seed(cfg.seed)
    model, tok = init_model(cfg, tweets.label_names, texts)
    seqs = tokenize(tok, texts, cfg.max_length)
    width = max(map(len, tokenize(tok, tweets.texts, cfg.max_length)))  # what the whole set padded to
    batches = _batches(seqs, args.batch_size, int(tok.pad_token_id or 0), width)
    models = {way: copy.deepcopy(model) for way in ("batch", "set")}
    opts = {way: make_optimizer(m, cfg, len(batches)) for way, m in models.items()}
    seconds: dict[str, list[float]] = {way: [] for way in models}
    y = torch.tensor(labels)
    for i, b in enumerate(batches):
        for way in (("batch", "set") if i % 2 == 0 else ("set", "batch")):  # alternate who goes first
            batch = (*b[way], y[i * args.batch_size : (i + 1) * args.batch_size])
            t0 = time.perf_counter()
            _step(cfg, models[way], *opts[way], batch, i)
            seconds[way].append(time.perf_counter() - t0)
    return _report(args, seconds, batches, n, width)


def _report(args: argparse.Namespace, seconds: dict[str, list[float]], batches: list[dict[str, Any]], n: int,
            width: int) -> int:
    med = {w: statistics.median(s) for w, s in seconds.items()}
    slots = {w: sum(b[w][0].numel() for b in batches) for w in ("batch", "set")}
    tokens = sum(b["tokens"] for b in batches)
    result = {
        "command": args.command_line,
        "examples": n, "batch_size": args.batch_size, "steps_each": len(batches), "threads": args.threads,
        "median_step_s": med, "mean_step_s": {w: statistics.fmean(s) for w, s in seconds.items()},
        "speedup_median": med["set"] / med["batch"],
        "token_slots": slots, "real_tokens": tokens, "set_width_tokens": width,
        "slot_use": {w: tokens / s for w, s in slots.items()},
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_padding.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "train_padding.md").write_text(_markdown(result))
    return 0


def _markdown(r: dict[str, Any]) -> str:
    names = {"set": f"padded to the corpus's longest text ({r['set_width_tokens']} tokens)",
             "batch": "padded to the batch's longest text"}
    rows = [f"| {name} | {r['median_step_s'][w]:.3f} | {r['mean_step_s'][w]:.3f} | {r['token_slots'][w]} | "
            f"{r['slot_use'][w] * 100:.0f}% |" for w, name in names.items()]
    return "\n".join([
        "# Training step time: per-batch padding", "", f"Command: `{r['command']}`", "",
        f"{r['steps_each']} optimizer steps each of batch {r['batch_size']} on {r['examples']} random tweets "
        f"(bbc-minilm starting model, 12 depths, max length 128), {r['threads']} torch thread(s), "
        f"{r['machine']}; the two ways alternate step by step. **The machine is shared with other "
        "agents' work (2 cores)**: absolute times are noisy, the ratio less so.", "",
        "| batches | median step (s) | mean step (s) | token slots | slots holding a token |",
        "| --- | ---: | ---: | ---: | ---: |", *rows, "",
        f"Per-batch padding: **{r['speedup_median']:.2f}x** faster per step (ratio of medians); "
        "the outputs are the same (padding is masked; tests/unit/test_train.py).", "",
    ])
