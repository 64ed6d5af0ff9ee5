"""What one engine step computes on the device: the shared layer fused for inference, the exit head,
one mask per step, and the layer's precision modes.

``StepCompute(model, precision)`` is built once per engine. It holds

* ``FusedLayer``: transformers' ``AlbertLayer`` in eval mode as fewer, larger ops (one QKV matmul,
  SDPA with a boolean mask, ``F.gelu(approximate="tanh")`` when the checkpoint says ``gelu_new``, no
  dropout calls). The same function as the reference (``tests/unit/test_step.py`` checks it); its
  weights are a copy taken at construction, in the precision asked for.
* the exit head (the model's own pooler and classifier, in the model dtype).

``StepMask.of(lengths, positions)`` is built once per step and shared by the layer (attention) and
mean pooling. Pooling divides by token counts in float32 (exact up to 2^24 tokens).

Precision modes (``EngineSettings.layer_precision``): ``model`` runs the layer in the model dtype;
``bfloat16`` keeps the layer's weights and the hidden states in bf16 (embeddings and the head stay in
the model dtype); ``int8`` quantises the layer's four Linear modules dynamically (``torch.ao``,
weights int8 per tensor, activations quantised per call; CPU only: fbgemm/x86 with VNNI).
Label agreement with float32 is reported by ``elbert-stream evaluate --precision`` (docs/engine.md).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from elbert_stream.engine.model import ElbertModel
from elbert_stream.errors import ConfigError

Precision = Literal["model", "bfloat16", "int8"]
PRECISIONS: tuple[str, ...] = ("model", "bfloat16", "int8")

# transformers' ACT2FN names -> one aten op each (gelu_new is the tanh approximation, exactly)
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass(frozen=True, slots=True)
class StepMask:
    """The step's attention mask, built once and shared by the layer and pooling (all ``[B, ...]``).

    ``attn`` is boolean (True = attend), the form SDPA takes without an additive bias tensor;
    ``tokens`` (the mask in the hidden dtype) and ``inv_count`` (1 / tokens per row, float32) are set
    for mean pooling only."""

    attn: torch.Tensor  # [B, 1, 1, T] bool
    tokens: torch.Tensor | None = None  # [B, 1, T] hidden dtype (mean pooling)
    inv_count: torch.Tensor | None = None  # [B, 1] float32 (mean pooling)

    @classmethod
    def of(cls, lengths: torch.Tensor, positions: torch.Tensor, *, mean_pooling: bool = False,
           dtype: torch.dtype = torch.float32) -> StepMask:
        """``lengths`` ``[B]`` tokens per row, ``positions`` ``arange(T)`` ``[T]``; device ops only."""
        keep = positions[None, :] < lengths[:, None]  # [B, T] bool
        if not mean_pooling:
            return cls(keep[:, None, None, :])
        count = lengths[:, None].to(torch.float32).clamp_min_(1.0)  # [B, 1]
        return cls(keep[:, None, None, :], keep[:, None, :].to(dtype), count.reciprocal_())

    def rows(self, start: int, stop: int) -> StepMask:
        """The same mask for rows ``start:stop`` (views)."""
        part = slice(start, stop)
        return StepMask(self.attn[part], None if self.tokens is None else self.tokens[part],
                        None if self.inv_count is None else self.inv_count[part])


class FusedLayer(nn.Module):
    """ALBERT's shared transformer layer for inference: ``hidden [B, T, H], StepMask -> [B, T, H]``."""

    def __init__(self, albert_layer: nn.Module, hidden_act: str, num_heads: int) -> None:
        super().__init__()
        attention = cast(nn.Module, albert_layer.attention)
        q, k, v = (cast(nn.Linear, getattr(attention, n)) for n in ("query", "key", "value"))
        assert isinstance(q.bias, torch.Tensor) and isinstance(k.bias, torch.Tensor)  # ALBERT has biases
        hidden = q.in_features
        self.qkv = nn.Linear(hidden, 3 * hidden, device=q.weight.device, dtype=q.weight.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))  # [3H, H]
            self.qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))  # [3H]
        part = lambda owner, name: copy.deepcopy(cast(nn.Module, getattr(owner, name)))  # noqa: E731
        self.dense = part(attention, "dense")
        self.norm_attn = part(attention, "LayerNorm")
        self.ffn = part(albert_layer, "ffn")
        self.ffn_output = part(albert_layer, "ffn_output")
        self.norm_out = part(albert_layer, "full_layer_layer_norm")
        self.num_heads = num_heads
        self.act = _ACTIVATIONS.get(hidden_act) or _transformers_activation(hidden_act)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, mask: StepMask) -> torch.Tensor:
        b, t, h = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, h // self.num_heads)  # [B, T, 3, nh, hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, nh, T, hd] (views)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.attn)  # [B, nh, T, hd]
        a = a.transpose(1, 2).reshape(b, t, h)  # [B, T, H]
        x = self.norm_attn(self.dense(a).add_(x))  # [B, T, H]
        f = self.ffn_output(self.act(self.ffn(x)))  # [B, T, H]
        return cast(torch.Tensor, self.norm_out(f.add_(x)))  # [B, T, H]


def _transformers_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ConfigError(f"unknown hidden_act {name!r} in the checkpoint's config")
    return cast(Callable[[torch.Tensor], torch.Tensor], ACT2FN[name])


def quantize_int8(layer: FusedLayer) -> nn.Module:
    """The layer with its Linear modules dynamically quantised to int8 (CPU)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        return quantize_dynamic(layer, {nn.Linear}, dtype=torch.qint8)


class StepCompute:
    """Layer + exit head of one step for an ``ElbertModel`` in a precision mode. ``hidden_dtype`` is
    the dtype of the hidden states the layer reads and writes (the engine's buffer)."""

    def __init__(self, model: ElbertModel, precision: str = "model") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown layer precision {precision!r}; choose one of {PRECISIONS}")
        m = model
        device, dtype = m.device, m.dtype
        config = m.config
        layer: nn.Module = FusedLayer(m.shared_layer, str(config.hidden_act), int(config.num_attention_heads))
        self.hidden_dtype: torch.dtype = dtype
        if precision == "bfloat16":
            layer, self.hidden_dtype = layer.to(torch.bfloat16), torch.bfloat16
        elif precision == "int8":
            if device.type != "cpu" or dtype != torch.float32:
                raise ConfigError(f"layer_precision int8 runs on CPU with a float32 model, not "
                                  f"{device}/{dtype}; use bfloat16 on CUDA")
            layer = quantize_int8(cast(FusedLayer, layer))
        self.precision = precision
        self.layer = layer
        self.mean_pooling = m.extras.pooling == "mean"
        self.pooler: nn.Linear = m.pooler
        self.classifier: nn.Linear = m.classifier
        self.head_dtype = dtype

    def mask(self, lengths: torch.Tensor, positions: torch.Tensor) -> StepMask:
        return StepMask.of(lengths, positions, mean_pooling=self.mean_pooling, dtype=self.hidden_dtype)

    def probs(self, hidden: torch.Tensor, mask: StepMask) -> torch.Tensor:
        """The exit head: hidden ``[B, T, H]`` -> probabilities ``[B, K]`` float32."""
        if mask.tokens is not None and mask.inv_count is not None:
            summed = torch.bmm(mask.tokens, hidden).squeeze(1)  # [B, H] sum over real tokens
            first = (summed if summed.dtype == torch.float32 else summed.float()) * mask.inv_count
        else:
            first = hidden[:, 0]  # [B, H]  the [CLS] position
        if first.dtype != self.head_dtype:
            first = first.to(self.head_dtype)
        logits = self.classifier(torch.tanh(self.pooler(first)))  # [B, K]
        return torch.softmax(logits, -1, dtype=torch.float32)  # [B, K]

    def __call__(self, hidden: torch.Tensor, mask: StepMask) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer application and the head: (hidden ``[B, T, H]``, probs ``[B, K]`` float32)."""
        out = self.layer(hidden, mask)
        return out, self.probs(out, mask)

    @torch.inference_mode()
    def all_depths(self, hidden: torch.Tensor, lengths: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Probabilities at every depth ``[L, B, K]`` from the embedded ``hidden`` (evaluation)."""
        mask = self.mask(lengths, torch.arange(hidden.shape[1], device=hidden.device))
        x, out = hidden.to(self.hidden_dtype), []
        for _ in range(num_layers):
            x, p = self(x, mask)
            out.append(p)
        return torch.stack(out)
