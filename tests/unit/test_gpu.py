"""The engine on CUDA in bfloat16 agrees with the CPU float32 engine (skipped without CUDA).

Run by bench/gpu_check.sh on a GPU box: ``pytest -m gpu tests/unit/test_gpu.py``.
bf16 rounding may flip a borderline label or move an exit by a depth, so full-depth labels must
agree on >= 98% of texts and early-exit labels on >= 95% (measured, not assumed: a broken cast,
mask or slot index on CUDA drops agreement to chance).
"""

from __future__ import annotations

import pytest
import torch

from elbert_stream.config import EngineSettings, ExitSettings
from elbert_stream.engine.engine import Engine
from elbert_stream.engine.model import ElbertModel, load_tokenizer, shipped_model_dir
from elbert_stream.engine.policy import ExitPolicy
from elbert_stream.types import Request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NUM_TEXTS = 96


def _labels(device: str, dtype: torch.dtype, policy_name: str,
            ids: list[list[int]]) -> list[tuple[int, int]]:
    """(label, exit depth) per text from a fresh engine on ``device``."""
    model = ElbertModel.from_pretrained(None, device=device, dtype=dtype)
    if policy_name == "none":
        policy = ExitPolicy.of("none", model.num_layers)
    else:
        policy = ExitPolicy.for_model(ExitSettings(), model.num_layers, model.extras.exit)
    engine = Engine(model, policy, EngineSettings(max_slots=32, max_batch_tokens=32 * 128), max_length=128)
    preds = engine.run_all([Request(x, request_id=str(i)) for i, x in enumerate(ids)])
    by_id = {p.request_id: (p.label_index, p.exit_depth) for p in preds}
    return [by_id[str(i)] for i in range(len(ids))]


@pytest.fixture(scope="module")
def bbc_ids() -> list[list[int]]:
    from bench.harness import bench_texts

    tok = load_tokenizer(shipped_model_dir())  # package data: missing is a failure, not a skip
    texts = bench_texts()[:NUM_TEXTS]
    return [list(x) for x in tok(texts, truncation=True, max_length=128)["input_ids"]]


@pytest.mark.parametrize(("policy", "min_agree"), [("none", 0.98), ("default", 0.95)])
def test_cuda_bf16_engine_matches_cpu_fp32(bbc_ids: list[list[int]], policy: str, min_agree: float) -> None:
    cpu = _labels("cpu", torch.float32, policy, bbc_ids)
    gpu = _labels("cuda", torch.bfloat16, policy, bbc_ids)
    agree = sum(c[0] == g[0] for c, g in zip(cpu, gpu, strict=True)) / len(cpu)
    assert agree >= min_agree, f"bf16 CUDA labels agree with fp32 CPU on only {agree:.1%}"
    mean_cpu = sum(c[1] for c in cpu) / len(cpu)
    mean_gpu = sum(g[1] for g in gpu) / len(gpu)
    assert abs(mean_cpu - mean_gpu) <= 0.5, f"mean exit depth {mean_gpu:.2f} on CUDA vs {mean_cpu:.2f} on CPU"


def test_engine_steps_make_no_hidden_sync(bbc_ids: list[list[int]]) -> None:
    """Every step after a warm-up runs under ``set_sync_debug_mode("error")``: any implicit sync
    (``.item()``, ``.cpu()``, a pageable copy, ``torch.tensor(..., device=...)``, a boolean-mask
    index) raises. The step's explicit read (a pinned copy and an event wait) is the only wait."""
    model = ElbertModel.from_pretrained(None, device="cuda", dtype=torch.bfloat16)
    policy = ExitPolicy.for_model(ExitSettings(), model.num_layers, model.extras.exit)
    engine = Engine(model, policy, EngineSettings(max_slots=16, max_batch_tokens=16 * 128), max_length=128)
    reqs = [Request(x, request_id=str(i)) for i, x in enumerate(bbc_ids)]
    engine.run_all(reqs[:16])  # warm-up: allocator, kernels, pinned buffers
    for r in reqs[16:]:
        assert engine.add(r)
    reads, steps, done = engine._link.num_reads, 0, 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        while engine.has_work():
            done += len(engine.step())
            steps += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert done == len(reqs) - 16
    assert steps <= engine._link.num_reads - reads <= 2 * steps  # one read per step, two with exits
