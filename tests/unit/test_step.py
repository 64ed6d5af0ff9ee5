"""The engine's step compute (engine/step.py): the fused layer is transformers' AlbertLayer, the head
is ``model.classify``, the precision modes stay close to float32, bad modes are refused."""

from __future__ import annotations

import pytest
import torch
from tiny_elbert import tiny_model
from transformers.activations import ACT2FN

from elbert_stream.config import EngineSettings
from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import attention_bias
from elbert_stream.engine.policy import ExitPolicy
from elbert_stream.engine.step import StepCompute, StepMask
from elbert_stream.errors import ConfigError
from elbert_stream.types import Request


def _batch(seed: int = 1, rows: int = 6, width: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (rows, width), generator=g)
    lens = torch.randint(3, width + 1, (rows,), generator=g)
    lens[0] = width  # one full row, the others padded
    mask = (torch.arange(width)[None] < lens[:, None]).long()
    return ids, lens, mask


def test_tanh_gelu_is_gelu_new_exactly() -> None:
    x = torch.linspace(-12, 12, 100_001, dtype=torch.float64)
    fused = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(fused, ACT2FN["gelu_new"](x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused.float(), ACT2FN["gelu_new"](x.float()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fused_layer_and_head_equal_transformers(act: str, pooling: str) -> None:
    model = tiny_model(num_layers=3, pooling=pooling)
    model.config.hidden_act = act
    model.shared_layer.activation = ACT2FN[act]
    ids, lens, mask = _batch()
    compute = StepCompute(model)
    step_mask = compute.mask(lens, torch.arange(ids.shape[1]))
    with torch.no_grad():
        x = model.embed(ids, mask)
        ref = model.shared_layer(x, attention_bias(mask, x.dtype))  # [B, T, H]
        ours = compute.layer(x, step_mask)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        probs = compute.probs(ours, step_mask)
        torch.testing.assert_close(probs, model.classify(ref, mask).softmax(-1), atol=1e-6, rtol=0)
        every = compute.all_depths(model.embed(ids, mask), lens, 3)
        torch.testing.assert_close(every, model(ids, mask).softmax(-1), atol=1e-5, rtol=0)


def test_mask_is_boolean_and_pooling_counts_are_float32() -> None:
    lens = torch.tensor([1, 257, 300, 511])
    m = StepMask.of(lens, torch.arange(512), mean_pooling=True, dtype=torch.bfloat16)
    assert m.attn.dtype == torch.bool and m.attn.shape == (4, 1, 1, 512)
    assert m.tokens is not None and m.inv_count is not None
    assert m.tokens.dtype == torch.bfloat16  # 0/1 exactly; counted in fp32 (a bf16 sum gives 256 for 257):
    assert m.tokens.sum(-1, dtype=torch.float32).flatten().tolist() == [1, 257, 300, 511]
    assert m.inv_count.dtype == torch.float32
    assert m.inv_count.flatten().tolist() == (1.0 / lens.float()).tolist()  # bf16 would round 257 to 256
    half = m.rows(1, 3)
    assert half.attn.shape[0] == 2 and half.inv_count is not None and half.inv_count.shape == (2, 1)


@pytest.mark.parametrize(("precision", "atol"), [("bfloat16", 0.02), ("int8", 0.02)])
def test_precision_modes_stay_close_to_float32(precision: str, atol: float) -> None:
    model = tiny_model(num_layers=6, pooling="mean")
    ids, lens, mask = _batch(rows=12)
    with torch.no_grad():
        hidden = model.embed(ids, mask)
    ref = StepCompute(model).all_depths(hidden, lens, 6)
    compute = StepCompute(model, precision)
    out = compute.all_depths(hidden, lens, 6)
    diff = float((out - ref).abs().max())
    assert 0.0 < diff < atol, f"{precision}: max |prob diff| {diff} (0 = the mode did nothing)"
    assert compute.hidden_dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
    if precision == "int8":
        assert "quantized.dynamic" in type(compute.layer.qkv).__module__


def test_precision_is_a_copy_and_the_model_is_untouched() -> None:
    model = tiny_model(num_layers=2)
    before = model.shared_layer.ffn.weight.clone()
    StepCompute(model, "bfloat16")
    StepCompute(model, "int8")
    assert model.shared_layer.ffn.weight.dtype == torch.float32
    assert torch.equal(model.shared_layer.ffn.weight, before)


def test_bad_precisions_are_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of"):
        StepCompute(tiny_model(2), "int4")
    with pytest.raises(ConfigError, match="float32 model"):
        StepCompute(tiny_model(2).to(torch.bfloat16), "int8")


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_engine_runs_in_a_precision_mode(precision: str) -> None:
    model = tiny_model(num_layers=4)
    settings = EngineSettings(max_slots=4, layer_precision=precision)  # type: ignore[arg-type]
    policy = ExitPolicy.of("entropy", 4, tau=0.5)
    engine = Engine(model, policy, settings, max_length=32)
    reference = Engine(model, policy, EngineSettings(max_slots=4), max_length=32)
    reqs = lambda: [Request([2, *range(5, 5 + n), 3], request_id=str(n)) for n in range(1, 12)]  # noqa: E731
    got = {p.request_id: p for p in engine.run_all(reqs())}
    want = {p.request_id: p for p in reference.run_all(reqs())}
    assert set(got) == set(want) and engine._hidden.dtype == StepCompute(model, precision).hidden_dtype
    for rid, p in got.items():
        assert abs(p.trace[0].top_prob - want[rid].trace[0].top_prob) < 0.02
