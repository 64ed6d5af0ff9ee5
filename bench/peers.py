"""The engine bench's CPU peers: ONNX Runtime full depth (fp32, dynamic int8) and the engine's own
layer precision modes, run side by side with variants (a)-(f) in the same interleaved rounds.

* ``ort_fp32`` / ``ort_int8``: the model's full-depth forward (embeddings, the shared layer L times,
  ELBERT's exit head: the same function as (b), same weights) exported with ``torch.onnx.export``
  (dynamo, dynamic batch and sequence axes) and run by ``onnxruntime`` on CPU with the torch thread
  count and every graph optimisation; int8 is ``onnxruntime.quantization.quantize_dynamic`` (int8
  weights, activations quantised per call: the scheme of the engine's int8 mode). Static batches
  padded to their longest text, like (a): what a CPU user would deploy instead of this engine.
* ``f_bf16`` / ``f_int8``: (f), continuous batching with early exit, with
  ``engine.layer_precision`` = bfloat16 / int8.

The exported files go to a temporary directory (the export takes ~20 s). Without ``onnxruntime``
(``pip install onnxruntime onnx onnxscript``, the ``[bench]`` extra) the ORT peers are skipped with a
warning. Label and exit-depth agreement of the precision modes with (f) are computed over the same
inputs (``agreement``).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench import harness as H
from elbert_stream.engine.model import ElbertModel, attention_bias

log = logging.getLogger(__name__)

PEERS: dict[str, str] = {
    "f_bf16": "(f) with the shared layer in bfloat16 (engine.layer_precision)",
    "f_int8": "(f) with the shared layer in dynamic int8 (engine.layer_precision)",
    "ort_fp32": "ONNX Runtime fp32, full depth, static batches",
    "ort_int8": "ONNX Runtime dynamic int8, full depth, static batches",
}
PRECISION_PEERS = {"f_bf16": "bfloat16", "f_int8": "int8"}
ORT_PEERS = ("ort_fp32", "ort_int8")


class FullDepth(nn.Module):
    """ids, mask ``[B, T]`` -> logits ``[B, K]`` after all ``L`` layers (ELBERT's head): for export."""

    def __init__(self, model: ElbertModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        hidden = m.embed(ids, mask)  # [B, T, H]
        bias = attention_bias(mask, hidden.dtype)  # [B, 1, 1, T]
        for _ in range(m.num_layers):
            hidden = m.shared_layer(hidden, bias)
        return m.classify(hidden, mask)  # [B, K]


def export_onnx(model: ElbertModel, out_dir: Path, max_length: int) -> dict[str, Path]:
    """``full_fp32.onnx`` and its dynamic-int8 quantisation ``full_int8.onnx`` in ``out_dir``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = out_dir / "full_fp32.onnx", out_dir / "full_int8.onnx"
    ids = torch.randint(5, 100, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FullDepth(model).eval(), (ids, torch.ones_like(ids)), str(fp32), dynamo=True,
                          input_names=["ids", "mask"], output_names=["logits"], optimize=True,
                          dynamic_shapes={"ids": {0: batch, 1: seq}, "mask": {0: batch, 1: seq}})
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.WARNING)  # onnxruntime.quantization logs a line per node on the root logger
        try:
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
    return {"ort_fp32": fp32, "ort_int8": int8}


def ort_runner(path: Path, pad_id: int, batch_size: int,
               num_layers: int) -> Callable[[Sequence[Sequence[int]]], dict[str, Any]]:
    """A variant runner: static batches through an ORT session, labels back on the host."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def run(inputs: Sequence[Sequence[int]]) -> dict[str, Any]:
        labels: list[int] = []
        start = time.perf_counter()
        for i in range(0, len(inputs), batch_size):
            ids, mask = H.pad_batch(inputs[i:i + batch_size], pad_id, torch.device("cpu"))
            logits = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]  # [b, K]
            labels.extend(int(x) for x in np.argmax(logits, -1))
        return {"elapsed_s": time.perf_counter() - start, "num_samples": len(inputs),
                "num_layer_rows": len(inputs) * num_layers, "labels": labels}

    return run


def peer_runners(model: ElbertModel, batch: int, max_length: int, work_dir: Path | None,
                 make_engine_runner: Callable[[str], Callable[..., dict[str, Any]]]) -> dict[str, Any]:
    """Runners of every peer this machine can run (CPU only): precision modes always, ORT when
    ``onnxruntime`` imports. ``make_engine_runner(precision)`` builds (f) in that precision."""
    if model.device.type != "cpu":
        log.info("engine bench peers are CPU peers; skipped on %s", model.device)
        return {}
    runners: dict[str, Any] = {v: make_engine_runner(p) for v, p in PRECISION_PEERS.items()}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: ONNX Runtime peers skipped (pip install onnxruntime onnx "
                    "onnxscript, or the [bench] extra)")
        return runners
    out_dir = work_dir or Path(tempfile.mkdtemp(prefix="elbert-onnx-"))
    t0 = time.perf_counter()
    paths = export_onnx(model, out_dir, max_length)
    log.info("exported the full-depth model to ONNX (fp32 + int8) in %s, %.0f s", out_dir,
             time.perf_counter() - t0)
    pad = int(model.config.pad_token_id or 0)
    for name in ORT_PEERS:
        runners[name] = ort_runner(paths[name], pad, batch, model.num_layers)
    for name in ORT_PEERS:
        for _ in range(2):  # warm-up
            runners[name]([[2, 5, 6, 3]] * batch)
    return runners


def agreement(per_input: dict[str, dict[str, list[int]]], reference: str) -> dict[str, dict[str, float]]:
    """Label (and exit-depth, where recorded) agreement of each variant with ``reference`` over the
    inputs both ran, in input order."""
    ref = per_input.get(reference)
    out: dict[str, dict[str, float]] = {}
    for name, got in per_input.items():
        if name == reference or ref is None:
            continue
        n = min(len(got["labels"]), len(ref["labels"]))
        if n == 0:
            continue
        row = {"num_inputs": float(n),
               "label_agreement": float(np.mean(np.array(got["labels"][:n]) == np.array(ref["labels"][:n])))}
        if got.get("depths") and ref.get("depths"):
            d, r = np.array(got["depths"][:n]), np.array(ref["depths"][:n])
            row.update(exit_depth_agreement=float(np.mean(d == r)), mean_exit_depth=float(d.mean()),
                       reference_mean_exit_depth=float(r.mean()))
        out[name] = row
    return out


def agreements(per_input: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, float]]:
    """The bench's comparisons: precision modes against (f), ONNX Runtime against (b)."""
    pick = lambda names: {v: per_input[v] for v in names if v in per_input}  # noqa: E731
    return {**agreement(pick(("f", *PRECISION_PEERS)), "f"), **agreement(pick(("b", *ORT_PEERS)), "b")}
