"""The generation engine: iteration-level (continuous) batching over a preallocated slot KV cache.

Every :meth:`Engine.step` first admits waiting requests into free slots — one prefill forward for all
of them, adapters mixed, the switch routing the ``auto`` ones inside it — then runs one decode forward
for every live sequence. A sequence that finishes (a stop token, its ``max_tokens``, an abort) leaves
at once: the last live slot moves into its place, so live sequences always fill slots ``0…n−1`` and
each step's attention reads views of the cache, never copies of it.

The cache (:class:`SlotCache`) is allocated once: per layer ``[max_num_seqs, max_model_len, kv_heads,
head_dim]`` keys and values; slot ``i`` holds its sequence's tokens at positions ``0…length−1``. Each
forward gets an explicit 4-D attention mask (prefill: causal and the left padding; decode: each row
its own length), so rows of any lengths share a step.

Routing: each live slot keeps its adapter id in a device tensor; a decode step assigns them to the
model's :class:`~switchcit.modules.RoutingContext`, whose pre-hook builds the step's plan on the
device. Sampling is per sequence (temperature, top-k, top-p) with the sequence's own generator, so a
seeded request draws the same tokens whatever else shares its steps; greedy is ``temperature = 0``.

The engine works on token ids. Text — detokenising, stop strings, streaming — is the caller's
(:mod:`switchcit.serving.app`); :meth:`SwitchModel.generate_ids <switchcit.pipeline.SwitchModel.generate_ids>`
runs it synchronously to completion. A prefill that raises is run again request by request, so a
faulty request fails alone (finish reason ``"error"``, the exception in ``request.error``).
Thread safety: :meth:`add`, :meth:`abort` and :meth:`call` may be called from any thread; everything
else runs on the thread that calls :meth:`step` (the server's engine thread).
"""
from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from switchcit.modules import NO_ADAPTER
from switchcit.prompts import content_mask, pad

__all__ = ["Engine", "EngineRequest", "SamplingParams", "SlotCache", "kv_bytes_per_token"]

FINISH_STOP, FINISH_LENGTH, FINISH_ABORT, FINISH_ERROR = "stop", "length", "abort", "error"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: every token
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < -1:
            raise ValueError(f"invalid sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(eq=False)
class EngineRequest:
    """One prompt, one answer. ``adapter``: an adapter id (−1: base model); ``routed``: the switch picks
    (over ``span``, the prompt's own tokens). ``emit(tokens, finish_reason, adapter)`` is called on the
    engine thread with each step's new tokens (``finish_reason`` ``None`` until the last call; the
    adapter id that generates them)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[list[int], str | None, int], None]
    adapter: int = NO_ADAPTER
    routed: bool = False
    span: tuple[int, int] | None = None
    output: list[int] = field(default_factory=list)
    aborted: bool = False
    error: BaseException | None = None
    generator: torch.Generator | None = None


def kv_shape(config) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a transformers config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in every layer."""
    heads, head_dim = kv_shape(config)
    return 2 * config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8


class SlotCache(Cache):
    """A transformers ``Cache`` over preallocated slots (see the module docstring). The engine says
    before each forward where its rows go: :meth:`prefill_into` or :meth:`decode_at`.

    Stored ``[slots, positions, kv_heads, head_dim]``: one token of one slot is one contiguous row of
    the flat ``[slots × positions, kv_heads × head_dim]`` view, so writing a step's tokens is one
    ``index_copy_``; attention reads ``[n, kv_heads, length, head_dim]`` views of it."""

    def __init__(self, config, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        shape = (num_slots, max_len, *kv_shape(config))
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self._write: Callable | None = None

    def prefill_into(self, slots: torch.Tensor, pads: list[int], width: int, prefix: PrefixCache | None = None,
                     entries: Callable[[], torch.Tensor] | None = None) -> None:
        """The next forward is a prefill of left-padded rows (``pads[i]`` pad tokens of ``width``):
        row ``i``'s tokens go to slot ``slots[i]`` at positions ``0…width−pads[i]−1``. With ``prefix``,
        every row's prompt starts with its tokens and the rows hold only what follows: row ``i`` takes
        the prefix's keys and values of entry ``entries()[i]`` (read at each layer: the adapter a
        routed row gets is known from the switch's layer on) and its own tokens go after them."""
        device = slots.device
        skip = 0 if prefix is None else prefix.length
        rows = torch.cat([torch.full((width - p,), i) for i, p in enumerate(pads)]).to(device)
        source = torch.cat([torch.arange(p, width) for p in pads]).to(device)
        target = slots[rows] * self.max_len + skip + source - torch.tensor(pads, device=device)[rows]

        def write(layer: int, kind: int, cache: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            cache.view(-1, *cache.shape[2:]).index_copy_(0, target, states.transpose(1, 2)[rows, source])
            if prefix is None:
                return states  # a prefill attends to its own tokens only
            past = prefix.states[kind][layer].index_select(0, entries())  # [rows, P, kv_heads, head_dim]
            cache[slots, :skip] = past
            return torch.cat([past.transpose(1, 2), states], dim=2)

        self._write = write

    def decode_at(self, positions: torch.Tensor, kv_length: int) -> None:
        """The next forward is a decode step of slots ``0…n−1``: row ``i``'s token goes to position
        ``positions[i]``; attention reads positions ``0…kv_length−1`` of those slots."""
        count = len(positions)
        target = torch.arange(count, device=positions.device) * self.max_len + positions

        def write(layer: int, kind: int, cache: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            cache.view(-1, *cache.shape[2:]).index_copy_(0, target, states[:, :, 0])
            return cache[:count, :kv_length].transpose(1, 2)

        self._write = write

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return (self._write(layer_idx, 0, self.keys[layer_idx], key_states),
                self._write(layer_idx, 1, self.values[layer_idx], value_states))

    def move(self, source: int, target: int, length: int) -> None:
        """Slot ``source``'s first ``length`` positions into slot ``target``."""
        for cache in itertools.chain(self.keys, self.values):
            cache[target, :length] = cache[source, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("the engine passes position ids and a 4-D mask to every forward")


@dataclass
class PrefixCache:
    """Keys and values of a prompt prefix that many prompts share (a chat template's head: its default
    system prompt and the user turn's opening), one entry per adapter id + 1 (entry 0: the base
    model): ``states[0 | 1][layer]`` ``[entries, length, kv_heads, head_dim]``, keys and values."""

    tokens: tuple[int, ...]
    states: tuple[list[torch.Tensor], list[torch.Tensor]]

    @property
    def length(self) -> int:
        return len(self.tokens)

    @classmethod
    def compute(cls, model, tokens: Sequence[int]) -> PrefixCache:
        """One forward of ``tokens`` under every adapter of ``model``'s bank and the base model."""
        from transformers import DynamicCache

        entries = model.context.num_adapters + 1
        device = next(model.network.parameters()).device
        input_ids = torch.tensor([list(tokens)] * entries, device=device)
        model.context.assign(torch.arange(-1, entries - 1, device=device))
        past = DynamicCache()
        model.network(input_ids=input_ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        model.context.assign(None)
        layers = [(layer.keys, layer.values) for layer in past.layers]
        return cls(tuple(tokens), ([k.transpose(1, 2).contiguous() for k, _ in layers],
                                   [v.transpose(1, 2).contiguous() for _, v in layers]))



def starts_with(request: EngineRequest, prefix: Sequence[int]) -> bool:
    """Whether ``request``'s prompt starts with ``prefix`` (not empty), has tokens after it, and none
    of the switch's span (what it reads) inside it."""
    ids, span = request.prompt_ids, request.span or (0, len(request.prompt_ids))
    return 0 < len(prefix) < len(ids) and span[0] >= len(prefix) and tuple(ids[: len(prefix)]) == tuple(prefix)


class Engine:
    """Continuous batching for a :class:`~switchcit.pipeline.SwitchModel` (see the module docstring).

    ``max_num_seqs``: live sequences (cache slots); ``max_model_len``: prompt + answer tokens of one
    sequence; ``max_num_batched_tokens``: prompt tokens one prefill takes (the first waiting request is
    always admitted); ``stop_ids``: the tokens that end an answer (default: the model's);
    ``prefix_ids``: a prefix many prompts start with (a chat template's head, see
    :func:`switchcit.prompts.template_head`), prefilled once per adapter and copied into the slots of
    the prompts that start with it; computed again after any :meth:`call` (which may change the model)."""

    def __init__(self, model, *, max_num_seqs: int = 16, max_model_len: int = 2048,
                 max_num_batched_tokens: int = 4096, stop_ids: list[int] | None = None,
                 prefix_ids: Sequence[int] = ()):
        if min(max_num_seqs, max_model_len, max_num_batched_tokens) < 1:
            raise ValueError("max_num_seqs, max_model_len and max_num_batched_tokens must be at least 1")
        self.model = model
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        network = model.network
        parameter = next(network.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache = SlotCache(network.config, max_num_seqs, max_model_len, self.dtype, self.device)
        self.stop_ids = model.stop_token_ids() if stop_ids is None else list(stop_ids)
        self.running: list[EngineRequest] = []  # slot i holds running[i]
        self.lengths: list[int] = []  # tokens in each live slot's cache
        self._adapters = torch.full((max_num_seqs,), NO_ADAPTER, dtype=torch.int32, device=self.device)
        self._last_tokens = torch.zeros(max_num_seqs, dtype=torch.long, device=self.device)
        self._waiting: deque[EngineRequest] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._lock = threading.Lock()
        self.wakeup = threading.Event()
        self._seeds = itertools.count(torch.initial_seed() % (1 << 62))
        self.prefix_ids = tuple(prefix_ids)  # prompts that start with it skip its prefill (PrefixCache)
        self._prefix: PrefixCache | None = None  # computed at the first prefill that uses it

    # ------------------------------------------------------------------ any thread

    def add(self, request: EngineRequest) -> None:
        """Queue ``request`` (it fits ``max_model_len``: checked here, before any model work)."""
        total = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids or total > self.max_model_len:
            raise ValueError(f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens "
                             f"({request.params.max_tokens}) exceed this engine's {self.max_model_len} tokens")
        seed = request.params.seed if request.params.seed is not None else next(self._seeds)
        request.generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._lock:
            self._waiting.append(request)
        self.wakeup.set()

    def abort(self, request: EngineRequest) -> None:
        """Stop ``request``: it leaves at the next step (its slot freed), emitting finish ``"abort"``."""
        request.aborted = True
        self.wakeup.set()

    def call(self, function: Callable[[], object]) -> Future:
        """Run ``function`` on the engine thread between two steps (model changes: adapters, switch)."""
        future: Future = Future()
        with self._lock:
            self._calls.append((function, future))
        self.wakeup.set()
        return future

    @property
    def waiting(self) -> list[EngineRequest]:
        with self._lock:
            return list(self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self._waiting or self._calls)

    # ------------------------------------------------------------------ engine thread

    @torch.no_grad()
    def step(self) -> None:
        """Pending calls, then admission + one prefill, then one decode step of every live sequence."""
        self._run_calls()
        self._drop_aborted()
        admitted = self._admit()
        with_prefix = [r for r in admitted if starts_with(r, self.prefix_ids)]
        for group, use_prefix in ((with_prefix, True), ([r for r in admitted if r not in with_prefix], False)):
            if group:
                self._prefill_isolating_failures(group, use_prefix)
        if self.running:  # the admitted ones too: their second token comes in this step
            try:
                self._decode()
            except Exception as error:  # noqa: BLE001 — no request can be blamed: every live one fails
                self._fail(list(self.running), error)
        self._drop_aborted()

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def _run_calls(self) -> None:
        while self._calls:
            self._prefix = None  # the call may change adapters: their prefix states with them
            with self._lock:
                function, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function())
                except BaseException as error:  # noqa: BLE001 — the caller gets it
                    future.set_exception(error)

    def _admit(self) -> list[EngineRequest]:
        admitted, tokens = [], 0
        with self._lock:
            while self._waiting and len(self.running) + len(admitted) < self.max_num_seqs:
                request = self._waiting[0]
                if request.aborted:
                    self._waiting.popleft()
                    request.emit([], FINISH_ABORT, NO_ADAPTER)
                    continue
                if admitted and tokens + len(request.prompt_ids) > self.max_num_batched_tokens:
                    break
                admitted.append(self._waiting.popleft())
                tokens += len(request.prompt_ids)
        return admitted

    def _prefill_isolating_failures(self, admitted: list[EngineRequest], use_prefix: bool) -> None:
        try:
            self._prefill(admitted, use_prefix)
        except Exception as error:  # noqa: BLE001 — the requests get it
            if len(admitted) == 1:
                self._fail(admitted, error)
                return
            for request in admitted:
                self._prefill_isolating_failures([request], use_prefix)

    def _fail(self, requests: list[EngineRequest], error: BaseException) -> None:
        self._remove([r for r in requests if r in self.running])
        for request in requests:
            request.error = error
            request.emit([], FINISH_ERROR, NO_ADAPTER)

    def _prefill(self, admitted: list[EngineRequest], use_prefix: bool) -> None:
        """One forward over the prompts of ``admitted`` (``use_prefix``: they all start with
        ``prefix_ids``, whose keys and values are copied, not computed: the forward is over the rest)."""
        model, device = self.model, self.device
        prefix = None
        if use_prefix:
            if self._prefix is None:
                self._prefix = PrefixCache.compute(model, self.prefix_ids)
            prefix = self._prefix
        skip = 0 if prefix is None else prefix.length
        rows = [r.prompt_ids[skip:] for r in admitted]
        input_ids, mask2d = pad(rows, model.tokenizer.pad_token_id, device=device)
        width = input_ids.shape[1]
        spans = [(start - skip, end - skip) for start, end in (r.span or (0, len(r.prompt_ids)) for r in admitted)]
        content = content_mask([len(row) for row in rows], spans, width, device=device)
        explicit = torch.tensor([r.adapter for r in admitted], dtype=torch.int64, device=device)
        routed = torch.tensor([r.routed for r in admitted], device=device)
        if any(r.routed for r in admitted):
            model._require_switch()
            if not model.one_pass:  # adapters below the switch layer: an encoder pass routes first
                explicit = torch.where(routed, model.route_ids(input_ids, mask2d, content), explicit)
                routed = None
        else:
            routed = None
        first = len(self.running)
        slots = torch.arange(first, first + len(admitted), device=device)
        self.cache.prefill_into(slots, [width - len(row) for row in rows], width, prefix,
                                lambda: model.context.sequence_ids + 1)  # entry 0: the base model
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = causal[None, None] & mask2d.bool()[:, None, None, :]
        if skip:  # every row's tokens see the whole prefix
            allowed = torch.cat([allowed.new_ones(len(rows), 1, width, skip), allowed], dim=-1)
        positions = skip + (mask2d.cumsum(-1) - 1).clamp(min=0)
        logits = model.routed_forward(input_ids, self._additive(allowed), content, explicit, routed,
                                      position_ids=positions, past_key_values=self.cache, use_cache=True,
                                      logits_to_keep=1)[:, -1]
        used = model.context.sequence_ids.to(torch.int32)
        self._adapters[first : first + len(admitted)] = used
        self.running += admitted
        self.lengths += [len(r.prompt_ids) for r in admitted]
        self._emit(admitted, first, self._sample(logits, admitted), used.tolist())

    def _decode(self) -> None:
        count = len(self.running)
        positions = torch.tensor(self.lengths, device=self.device)
        kv_length = max(self.lengths) + 1
        allowed = torch.arange(kv_length, device=self.device)[None] <= positions[:, None]
        self.cache.decode_at(positions, kv_length)
        self.model.context.assign(self._adapters[:count], checked=True)  # no host read per step
        logits = self.model.network(input_ids=self._last_tokens[:count, None],
                                    attention_mask=self._additive(allowed[:, None, None, :]),
                                    position_ids=positions[:, None], past_key_values=self.cache, use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
        self.lengths = [length + 1 for length in self.lengths]
        self._emit(list(self.running), 0, self._sample(logits, self.running), self._adapters[:count].tolist())

    def _emit(self, requests: list[EngineRequest], first: int, tokens: torch.Tensor, adapters: list[int]) -> None:
        """Record each request's new token; finished ones leave."""
        self._last_tokens[first : first + len(requests)] = tokens
        finished = []
        for request, token, adapter in zip(requests, tokens.tolist(), adapters):
            request.output.append(token)
            reason = None
            if token in self.stop_ids:
                reason = FINISH_STOP
            elif len(request.output) >= request.params.max_tokens:
                reason = FINISH_LENGTH
            request.emit([token], reason, adapter)
            if reason is not None:
                finished.append(request)
        self._remove(finished)

    def _drop_aborted(self) -> None:
        aborted = [r for r in self.running if r.aborted]
        for request in aborted:
            request.emit([], FINISH_ABORT, int(self._adapters[self.running.index(request)]))
        self._remove(aborted)

    def _remove(self, requests: list[EngineRequest]) -> None:
        """Free the slots of ``requests``: the last live slot moves into each hole."""
        for slot in sorted((self.running.index(r) for r in requests), reverse=True):
            last = len(self.running) - 1
            if slot != last:
                self.cache.move(last, slot, self.lengths[last])
                self._adapters[slot] = self._adapters[last]
                self._last_tokens[slot] = self._last_tokens[last]
                self.running[slot], self.lengths[slot] = self.running[last], self.lengths[last]
            self.running.pop()
            self.lengths.pop()
        if not self.running:
            self.model.context.assign(None)

    def _sample(self, logits: torch.Tensor, requests: list[EngineRequest]) -> torch.Tensor:
        """One token per row: argmax for greedy requests, else a draw from the request's generator."""
        tokens = logits.argmax(-1)
        for row, request in enumerate(requests):
            if not request.params.greedy:
                tokens[row] = sample_token(logits[row], request.params, request.generator)
        return tokens

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean attention mask as the additive float mask every attention implementation takes."""
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
            ~allowed, torch.finfo(self.dtype).min)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token from ``logits [V]``: temperature, then top-k, then top-p (nucleus), then a draw."""
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1:
        ordered, order = scores.sort(descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(0, order[drop], -math.inf)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
