"""The continuous-batching engine: one shared-layer application over every busy slot per step.

``Engine.step()``: admit waiting requests into free slots (``SlotScheduler``) and embed them;
run the shared layer ONCE over all busy slots, whatever depth each is at, and the exit head
(``StepCompute``, engine/step.py: the fused layer in ``engine.layer_precision``); apply the exit
policy; return the samples that exited as ``Prediction``s and free their slots.

State lives on the device between steps: hidden states ``[S, T_max, H]``, token lengths (the
step's mask is built from them once per step), depths, the ``ExitState`` and the trace
``[S, L + 1, 3]`` (pred, top prob, entropy at column = depth). Per step the host reads the busy
rows' exit reasons (``DeviceLink.read``, the one wait), then, on steps with exits, those rows'
probabilities and traces; while the device runs, it stages the next admissions' token ids. Each
step runs on the busy rows cut to the longest busy text (docs/engine.md).

Modes (same code path): ``continuous`` refills any free slot every step (the product);
``compaction`` admits only into an empty table and frees rows as they exit (FastBERT-style);
``naive`` admits only into an empty table and runs every row until the last one exits.

Threading: ``add``, ``step``, ``stats`` belong to one thread (the worker's). ``set_policy`` may be
called from any thread; it takes effect at the start of the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from elbert_stream.config import EngineSettings, ExitSettings, Settings
from elbert_stream.engine.model import ElbertModel, load_tokenizer, resolve_device, resolve_dtype
from elbert_stream.engine.policy import REASON_NAMES, ExitPolicy, ExitState
from elbert_stream.engine.scheduler import Admission, SlotScheduler
from elbert_stream.engine.step import StepCompute, StepMask
from elbert_stream.engine.transfer import DeviceLink, pack_admissions
from elbert_stream.errors import BadMessage, ConfigError, EngineFailure
from elbert_stream.types import DepthTrace, EngineStats, Prediction, Request

log = logging.getLogger(__name__)

BatchMode = Literal["continuous", "compaction", "naive"]
BATCH_MODES: tuple[str, ...] = ("continuous", "compaction", "naive")


@dataclass(slots=True)
class _Exit:
    """One row's result as read from the device, before its slot is freed."""

    slot: int
    depth: int
    reason: int
    data: list[float]  # probs [K] then trace [L*3] flattened


class Engine:
    """Continuous batching over early-exit depths for one ``ElbertModel``."""

    def __init__(self, model: ElbertModel, policy: ExitPolicy, settings: EngineSettings, *, max_length: int,
                 tokenizer: PreTrainedTokenizerBase | None = None, mode: BatchMode = "continuous",
                 compile: bool = False) -> None:
        if mode not in BATCH_MODES:
            raise ConfigError(f"unknown engine mode {mode!r}; choose one of {BATCH_MODES}")
        if not 1 <= max_length <= model.max_positions:
            raise ConfigError(f"max_length must be in [1, {model.max_positions}] (model max positions), "
                              f"got {max_length}")
        self._check_policy(policy, model)
        self.model = model.eval()
        self.max_length = max_length
        self.mode: BatchMode = mode
        self._tokenizer = tokenizer
        self._policy = policy
        self._pending: ExitPolicy | None = None
        self._lock = threading.Lock()
        self._sched = SlotScheduler(settings.max_slots, settings.max_batch_tokens, settings.max_queue,
                                    admit_when_empty=mode != "continuous")
        self._device = model.device
        self._pad_multiple = 8 if self._device.type == "cuda" else 1
        self._row_chunk = settings.cpu_row_chunk if self._device.type == "cpu" else 0
        self._compute = StepCompute(model, settings.layer_precision)
        self._link = DeviceLink(self._device)
        self._alloc(settings.max_slots)
        self._stats = EngineStats(mode=mode, max_slots=settings.max_slots,
                                  exit_depth_counts=[0] * model.num_layers)
        self._failure: Exception | None = None
        self._held: list[_Exit] = []  # naive mode: exited rows waiting for their batch
        self._staged: dict[int, np.ndarray] = {}  # id(waiting request) -> its ids (``_prestage``)
        self._compile = compile
        self._layer_head = self._eager_layer_head
        self._decide = self._policy_fn(policy)
        if compile:
            if self._device.type != "cuda":
                log.warning("torch.compile requested on %s; it pays off on CUDA only", self._device)
            self._layer_head = torch.compile(self._eager_layer_head, dynamic=True)

    def _policy_fn(self, policy: ExitPolicy) -> Any:
        """``policy.decide``, compiled (one fused graph, ~25 fewer kernel launches) when asked.

        A new policy recompiles once, on the first step after ``set_policy``.
        """
        return torch.compile(policy.decide, dynamic=True) if self._compile else policy.decide

    @staticmethod
    def _check_policy(policy: ExitPolicy, model: ElbertModel) -> None:
        if policy.num_layers != model.num_layers:
            raise ConfigError(f"policy is for {policy.num_layers} layers, the model has {model.num_layers}")

    def _alloc(self, num_slots: int) -> None:
        """Preallocate the device state (inference tensors) and its host mirrors."""
        m, dev = self.model, self._device
        with torch.inference_mode():
            self._hidden = torch.zeros(num_slots, self.max_length, m.hidden_size,
                                       dtype=self._compute.hidden_dtype, device=dev)
            self._len_dev = torch.zeros(num_slots, dtype=torch.long, device=dev)  # [S] tokens per slot
            self._depth_dev = torch.zeros(num_slots, dtype=torch.long, device=dev)  # [S] layers done
            self._state = ExitState.empty(num_slots, dev)  # [S] each
            self._trace = torch.zeros(num_slots, m.num_layers + 1, 3, device=dev)  # [S, L+1, 3] col = depth
            self._positions = torch.arange(self.max_length, device=dev)  # [T_max]
            self._slot_ids = torch.arange(num_slots, device=dev)  # [S]
        self._len = np.zeros(num_slots, dtype=np.int64)  # host mirrors: never read back from the device
        self._depth = np.zeros(num_slots, dtype=np.int64)
        self._busy = np.zeros(num_slots, dtype=bool)
        self._done = np.zeros(num_slots, dtype=bool)  # naive mode: exited but still computed

    # ---- construction from settings ---------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings, *, mode: BatchMode | None = None) -> Engine:
        """Load model (None path = shipped), tokenizer, device, dtype and exit policy from settings."""
        device = resolve_device(settings.model.device)
        dtype = resolve_dtype(settings.model.dtype, device)
        model = ElbertModel.from_pretrained(settings.model.path, device=device, dtype=dtype)
        tokenizer = load_tokenizer(settings.model.path)
        policy = ExitPolicy.for_model(settings.exit, model.num_layers, model.extras.exit)
        log.info("engine: model %s v%s on %s/%s, policy %s, mode %s", model.extras.name,
                 model.extras.version, device, dtype, policy.describe(), mode)
        return cls(model, policy, settings.engine, max_length=settings.model.max_length, tokenizer=tokenizer,
                   mode=mode or settings.engine.mode, compile=settings.model.compile)

    # ---- public API -------------------------------------------------------------------------------
    @property
    def policy(self) -> ExitPolicy:
        with self._lock:
            return self._pending or self._policy

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def model_name(self) -> str:
        return str(self.model.extras.name)

    @property
    def model_version(self) -> str:
        return str(self.model.extras.version)

    def set_exit_settings(self, exit_settings: ExitSettings) -> None:
        """``set_policy`` for user settings: ``None`` thresholds take the model's saved defaults.
        Raises ConfigError for settings the model cannot take."""
        self.set_policy(ExitPolicy.for_model(exit_settings, self.model.num_layers, self.model.extras.exit))

    def set_policy(self, policy: ExitPolicy) -> None:
        """Swap the exit policy (thread-safe); applies from the next step, slots keep their state."""
        self._check_policy(policy, self.model)
        with self._lock:
            self._pending = policy

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to ``max_length``."""
        if not texts:
            return []
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(None)
        enc = self._tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def add(self, request: Request) -> bool:
        """Queue a request; False when the waiting queue is full (apply backpressure, retry later).

        Raises ``BadMessage`` (a per-message outcome) for empty, over-long or out-of-vocabulary ids.
        """
        self._validate(request)
        if not self._sched.add(request):
            self._stats.num_rejected += 1
            return False
        return True

    def has_work(self) -> bool:
        return self._sched.has_work()

    def stats(self) -> EngineStats:
        """A snapshot (copy) of the counters and the slot table's depth histogram."""
        live = self._busy & ~self._done
        counts = np.bincount(self._depth[live], minlength=self.model.num_layers)[: self.model.num_layers]
        return replace(
            self._stats, num_busy=self._sched.num_busy, num_waiting=self._sched.num_waiting,
            num_busy_tokens=self._sched.busy_tokens, exit_depth_counts=list(self._stats.exit_depth_counts),
            busy_depth_counts=[int(c) for c in counts], policy=self.policy.describe(),
        )

    def step(self) -> list[Prediction]:
        """Admit, run the shared layer once over every busy slot, return the samples that exited.

        Raises ``EngineFailure`` if the device work fails (e.g. out of memory); the slot state is
        then undefined, so every later step raises too and the replica must be replaced.
        """
        if self._failure is not None:
            raise EngineFailure(f"engine failed earlier: {self._failure!r}")
        t0 = time.perf_counter()
        with self._lock:
            if self._pending is not None:
                self._policy, self._pending = self._pending, None
                self._decide = self._policy_fn(self._policy)
        try:
            with torch.inference_mode():
                admitted = self._sched.schedule()
                if admitted:
                    self._admit(admitted)
                busy = np.flatnonzero(self._busy)  # [B] slot numbers
                if busy.size == 0:
                    return []
                exits = self._run_busy(busy)
        except Exception as e:
            self._failure = e
            log.exception("engine step failed")
            raise EngineFailure(f"engine step failed: {e!r}") from e
        out = self._release(exits)
        self._stats.num_steps += 1
        self._stats.step_time_s += time.perf_counter() - t0
        return out

    def run_all(self, requests: list[Request],
                on_bad: Callable[[Request, BadMessage], None] | None = None) -> list[Prediction]:
        """Add every request (stepping while the queue is full) and step until all finished. A request
        ``add`` refuses raises its ``BadMessage``, or goes to ``on_bad`` (and the rest run on)."""
        out: list[Prediction] = []
        for request in requests:
            try:
                while not self.add(request):
                    out.extend(self.step())
            except BadMessage as e:
                if on_bad is None:
                    raise
                on_bad(request, e)
        while self.has_work():
            out.extend(self.step())
        return out

    # ---- the hot path -----------------------------------------------------------------------------
    def _validate(self, request: Request) -> None:
        ids = request.input_ids
        if not ids:
            raise BadMessage("empty", f"request {request.request_id!r} has no token ids")
        if len(ids) > self.max_length:
            raise BadMessage("too_long", f"request {request.request_id!r} has {len(ids)} token ids, "
                                         f"max_length is {self.max_length}; tokenize with truncation")
        vocab = int(self.model.config.vocab_size)
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadMessage("bad_token_id", f"request {request.request_id!r} has token id {bad} "
                                             f"outside the vocabulary [0, {vocab})")

    def _admit(self, admitted: list[Admission]) -> None:
        """Embed newly admitted requests into their slots and reset those slots' state (device work
        queued with one upload; no wait)."""
        n = len(admitted)
        rows = [self._staged.pop(id(a.request), None) for a in admitted]
        packed, lens = pack_admissions([a.slot for a in admitted],
                                       [r if r is not None else a.request.input_ids
                                        for r, a in zip(rows, admitted, strict=True)],
                                       int(self.model.config.pad_token_id or 0))
        width = int(lens.max())
        dev_packed = self._link.upload(packed)  # [2A + A*Tn]
        slots, lens_t = dev_packed[:n], dev_packed[n:2 * n]  # [A], [A]
        ids_t = dev_packed[2 * n:].view(n, width)  # [A, Tn]
        mask = self._positions[None, :width] < lens_t[:, None]  # [A, Tn] bool
        self._hidden[slots, :width] = self.model.embed(ids_t, mask).to(self._hidden.dtype)  # [A, Tn, H]
        self._len_dev[slots] = lens_t
        self._depth_dev[slots] = 0
        self._state.reset(slots)
        slots_np = packed[:n].copy()
        self._len[slots_np] = lens
        self._depth[slots_np] = 0
        self._busy[slots_np] = True
        self._done[slots_np] = False
        self._stats.num_admitted += n

    def _prestage(self) -> None:
        """Token ids of the requests next in line as int64 arrays, ready for ``_admit`` (host work
        placed where the device is busy; on CPU it only moves the cost)."""
        staged = self._staged
        for request in self._sched.peek(self._sched.max_slots):
            if id(request) not in staged:
                staged[id(request)] = np.asarray(request.input_ids, dtype=np.int64)

    def _eager_layer_head(self, x: torch.Tensor, mask: StepMask) -> torch.Tensor:
        """One shared-layer application to hidden ``x`` ``[B, T, H]`` IN PLACE; returns the exit
        head's probabilities ``[B, K]`` fp32.

        On CPU the rows go through in chunks of ``cpu_row_chunk``: the same shared-layer application
        (rows are independent), with matmuls that stay in cache (docs/engine.md, "CPU")."""
        c = self._row_chunk
        if c and x.shape[0] > c:
            return torch.cat([self._layer_head_rows(x[i:i + c], mask.rows(i, i + c))
                              for i in range(0, x.shape[0], c)])
        return self._layer_head_rows(x, mask)

    def _layer_head_rows(self, x: torch.Tensor, mask: StepMask) -> torch.Tensor:
        out, probs = self._compute(x, mask)  # [B, T, H], [B, K]
        x.copy_(out)
        return probs

    def _step_length(self, busy: np.ndarray) -> int:
        """The longest busy text, rounded up to the pad multiple (CUDA: 8), capped at max_length."""
        longest = int(self._len[busy].max())
        m = self._pad_multiple
        return min(self.max_length, -(-longest // m) * m)

    def _run_busy(self, busy: np.ndarray) -> list[_Exit]:
        """One layer application over the busy rows; returns the rows that exited this step."""
        t = self._step_length(busy)
        idx, probs, reason_dev = self._advance(busy, t)  # queued on the device
        self._depth[busy] += 1
        self._count_step(busy, t)
        self._prestage()  # host work for the next admissions while the device runs this step
        reason = self._link.read(reason_dev)  # [B]  the one per-step device->host read
        pos = np.flatnonzero((reason != 0) & ~self._done[busy])  # exited rows, as positions within busy
        if pos.size == 0:
            return []
        pos_t = self._link.upload(pos)  # [E]
        rows = idx[pos_t]  # [E] slot numbers
        data = torch.cat([probs[pos_t], self._trace[rows, 1:].flatten(1)], 1)  # [E, K + 3L]
        host = self._link.read(data)
        return [_Exit(int(busy[p]), int(self._depth[busy[p]]), int(reason[p]), d)
                for p, d in zip(pos, host.tolist(), strict=True)]

    def _advance(self, busy: np.ndarray, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Device work of a step: mask, layer, head, policy, state and trace update. No host sync.

        Returns (slot index ``[B]``, probs ``[B, K]`` fp32, exit reason codes ``[B]``).
        """
        b = int(busy.size)
        prefix = int(busy[-1]) == b - 1  # busy slots are 0..B-1 (lowest free slot is taken first)
        idx = self._slot_ids[:b] if prefix else self._link.upload(busy)
        rows: slice | torch.Tensor = slice(0, b) if prefix else idx  # views, not gathers, for a prefix
        mask = self._compute.mask(self._len_dev[rows], self._positions[:t])  # once per step, shared
        x = self._hidden[:b, :t] if prefix else self._hidden[idx, :t]  # [B, T, H] view or gathered copy
        probs = self._layer_head(x, mask)  # [B, K]; x updated in place
        if prefix:
            depth = self._depth_dev[:b].add_(1)  # [B] view
        else:
            self._hidden[idx, :t] = x
            depth = self._depth_dev[idx] + 1  # [B]
            self._depth_dev[idx] = depth
        dec = self._decide(probs, depth, self._state.rows(rows))
        self._state.assign(rows, dec.state)
        self._trace[idx, depth] = torch.stack([dec.pred, dec.top, dec.entropy], -1)  # [B, 3] fp32
        return idx, probs, dec.reason

    def _count_step(self, busy: np.ndarray, t: int) -> None:
        s = self._stats
        s.num_layer_rows += int(busy.size)
        s.num_tokens += int(self._len[busy].sum())
        s.num_padded_tokens += int(busy.size) * t

    def _release(self, exits: list[_Exit]) -> list[Prediction]:
        """Free exited slots (naive mode: only once the whole batch exited) and build Predictions."""
        for e in exits:
            self._stats.exit_depth_counts[e.depth - 1] += 1
        if self.mode == "naive":
            self._held.extend(exits)
            self._done[np.array([e.slot for e in exits], dtype=np.int64)] = True
            if not self._done[self._busy].all():
                return []
            exits, self._held = self._held, []
        if not exits:
            return []
        requests = self._sched.free([e.slot for e in exits])
        self._busy[np.array([e.slot for e in exits], dtype=np.int64)] = False
        self._stats.num_finished += len(exits)
        return [self._prediction(e, r) for e, r in zip(exits, requests, strict=True)]

    def _prediction(self, e: _Exit, request: Request) -> Prediction:
        k = self.model.num_labels
        trace = [DepthTrace(depth=d + 1, label_index=int(e.data[k + 3 * d]), top_prob=e.data[k + 3 * d + 1],
                            entropy=e.data[k + 3 * d + 2]) for d in range(e.depth)]
        label_index = trace[-1].label_index
        admitted = request.admitted_s if request.admitted_s is not None else request.arrival_s
        finished = request.finished_s if request.finished_s is not None else admitted
        return Prediction(
            request_id=request.request_id, label=self.model.label_names[label_index], label_index=label_index,
            probabilities=e.data[:k], exit_depth=e.depth, exit_reason=REASON_NAMES[e.reason], trace=trace,
            queue_s=admitted - request.arrival_s, compute_s=finished - admitted, meta=request.meta,
        )
