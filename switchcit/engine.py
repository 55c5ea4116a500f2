"""The generation engine: iteration-level (continuous) batching over a preallocated slot KV cache.

Every :meth:`Engine.step` admits waiting requests into free slots, then runs **one forward** over a
flattened batch of tokens ``[1, T]`` (:class:`~switchcit.ops.attention.SlotBatch`, as vLLM's steps):
one decode token of every live sequence, then the prompt tokens of the admitted ones, adapters mixed
per token, the switch routing the ``auto`` prompts inside it; each admitted prompt gets its first
token from that forward. A sequence that finishes (a stop token, its ``max_tokens``, an abort) leaves
at once: the last live slot moves into its place, so live sequences always fill slots ``0…n−1`` and
each step's attention reads views of the cache, never copies of it.

The cache (:class:`SlotCache`) is allocated once: per layer ``[max_num_seqs, kv_heads, max_model_len,
head_dim]`` keys and values; slot ``i`` holds its sequence's tokens at positions ``0…length−1``. Each
token of a step attends to its own slot up to its own position, so sequences of any lengths share it.

Routing: each live slot keeps its adapter id in a device tensor; a step gives the model's
:class:`~switchcit.modules.RoutingContext` one id per token, whose pre-hook builds the step's plan on
the device. Sampling is per sequence (temperature, top-k, top-p) with the sequence's own generator, so
a seeded request draws the same tokens whatever else shares its steps; greedy is ``temperature = 0``.

The engine works on token ids. Text — detokenising, stop strings, streaming — is the caller's
(:mod:`switchcit.serving.app`); :meth:`SwitchModel.generate_ids <switchcit.pipeline.SwitchModel.generate_ids>`
runs it synchronously to completion. A step that raises runs again in parts — the live sequences'
decode, then each prompt alone — so a faulty request fails alone (finish reason ``"error"``, the
exception in ``request.error``). Thread safety: :meth:`add`, :meth:`abort` and :meth:`call` may be
called from any thread; everything else runs on the thread that calls :meth:`step` (the server's
engine thread).
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
from switchcit.ops.attention import SlotBatch
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
    """A transformers ``Cache`` over preallocated slots (see the module docstring). Before each
    forward the engine says where the step's tokens go (:meth:`begin_step`); :meth:`update` writes
    them there and returns the whole cache, which :func:`switchcit.ops.attention.slot_attention` reads.

    Stored ``[slots, kv_heads, positions, head_dim]``, as attention reads it: ``[n, kv_heads, length,
    head_dim]`` views whose rows are contiguous, which matrix products take without a copy. One head of
    one token is one row of the flat ``[slots × kv_heads × positions, head_dim]`` view, so writing a
    step's tokens is one ``index_copy_``."""

    def __init__(self, config, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        heads, head_dim = kv_shape(config)
        shape = (num_slots, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self._targets: torch.Tensor | None = None
        self._prefix: tuple[PrefixCache, torch.Tensor, Callable[[], torch.Tensor]] | None = None

    def begin_step(self, slots: torch.Tensor, positions: torch.Tensor,
                   prefix: tuple[PrefixCache, torch.Tensor, Callable[[], torch.Tensor]] | None = None) -> None:
        """The next forward's token ``t`` goes to slot ``slots[t]`` at position ``positions[t]``. With
        ``prefix = (cache, prefix_slots, entries)``, those slots also get the prefix's keys and values
        at positions ``0…P−1``, of entry ``entries()`` (read at each layer: the adapter a routed prompt
        gets is known from the switch's layer on)."""
        heads = self.keys[0].shape[1]
        rows = (slots[:, None] * heads + torch.arange(heads, device=slots.device)) * self.max_len + positions[:, None]
        self._targets = rows.reshape(-1)  # [T × kv_heads]: token-major, as the states' rows below
        self._prefix = prefix

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return (self._write(layer_idx, 0, self.keys[layer_idx], key_states),
                self._write(layer_idx, 1, self.values[layer_idx], value_states))

    def _write(self, layer: int, kind: int, cache: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        rows = states[0].transpose(0, 1).reshape(-1, cache.shape[-1])  # [1, KVH, T, D] → [T × KVH, D]
        cache.view(-1, cache.shape[-1]).index_copy_(0, self._targets, rows)
        if self._prefix is not None:
            prefix, slots, entries = self._prefix
            cache[:, :, : prefix.length].index_copy_(0, slots, prefix.states[kind][layer].index_select(0, entries()))
        return cache

    def move(self, source: int, target: int, length: int) -> None:
        """Slot ``source``'s first ``length`` positions into slot ``target``."""
        for cache in itertools.chain(self.keys, self.values):
            cache[target, :, :length] = cache[source, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError("the engine passes position ids and a 4-D mask to every forward")


@dataclass
class PrefixCache:
    """Keys and values of a prompt prefix that many prompts share (a chat template's head: its default
    system prompt and the user turn's opening), one entry per adapter id + 1 (entry 0: the base
    model): ``states[0 | 1][layer]`` ``[entries, kv_heads, length, head_dim]``, keys and values."""

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
        return cls(tuple(tokens), ([layer.keys for layer in past.layers], [layer.values for layer in past.layers]))



def starts_with(request: EngineRequest, prefix: Sequence[int]) -> bool:
    """Whether ``request``'s prompt starts with ``prefix`` (not empty), has tokens after it, and none
    of the switch's span (what it reads) inside it."""
    ids, span = request.prompt_ids, request.span or (0, len(request.prompt_ids))
    return 0 < len(prefix) < len(ids) and span[0] >= len(prefix) and tuple(ids[: len(prefix)]) == tuple(prefix)


class Engine:
    """Continuous batching for a :class:`~switchcit.pipeline.SwitchModel` (see the module docstring).

    ``max_num_seqs``: live sequences (cache slots); ``max_model_len``: prompt + answer tokens of one
    sequence; ``max_num_batched_tokens``: prompt tokens one step takes (the first waiting request is
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
        """Queue ``request`` (it fits ``max_model_len`` and its adapter id is the model's: checked here,
        before any model work, so that steps never read ids back from the device)."""
        total = len(request.prompt_ids) + request.params.max_tokens
        if not request.prompt_ids or total > self.max_model_len:
            raise ValueError(f"the prompt ({len(request.prompt_ids)} tokens) and max_tokens "
                             f"({request.params.max_tokens}) exceed this engine's {self.max_model_len} tokens")
        if not NO_ADAPTER <= request.adapter < self.model.context.num_adapters:
            raise ValueError(f"adapter id {request.adapter} is outside [-1, {self.model.context.num_adapters})")
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

    def step(self) -> None:
        """Pending calls, then admission, then one forward: a decode token of every live sequence and
        the prompts of the admitted ones (their first token comes from it)."""
        with torch.no_grad():
            self._run_calls()  # model changes (adapters, the switch): not under inference mode
        with torch.inference_mode():  # less bookkeeping per op than no_grad: ~5 % of a CPU decode step
            self._drop_aborted()
            admitted = self._admit()
            if self.running or admitted:
                self._forward_isolating_failures(admitted)
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

    def _forward_isolating_failures(self, admitted: list[EngineRequest]) -> None:
        """A step that raises runs again in parts — the live sequences' decode, then each prompt alone —
        so that a faulty request fails alone; if the decode raises, every live sequence fails."""
        try:
            self._forward(admitted)
            return
        except Exception as error:  # noqa: BLE001 — the requests get it
            if len(admitted) + bool(self.running) == 1:
                self._fail([*self.running, *admitted], error)
                return
        if self.running:
            try:
                self._forward([])
            except Exception as error:  # noqa: BLE001 — no live request can be blamed: they all fail
                self._fail(list(self.running), error)
        for request in admitted:
            try:
                self._forward([request], decode=False)
            except Exception as error:  # noqa: BLE001
                self._fail([request], error)

    def _fail(self, requests: list[EngineRequest], error: BaseException) -> None:
        self._remove([r for r in requests if r in self.running])
        for request in requests:
            request.error = error
            request.emit([], FINISH_ERROR, NO_ADAPTER)

    def _forward(self, admitted: list[EngineRequest], decode: bool = True) -> None:
        """One forward (:class:`~switchcit.ops.attention.SlotBatch`): a decode token of every live
        sequence (unless not ``decode``), then the prompts of ``admitted`` into the next free slots — of
        those that start with ``prefix_ids``, the part after it (its keys and values are copied, not
        computed). The engine's state changes only once the forward has returned."""
        model, device = self.model, self.device
        decoding = list(self.running) if decode else []
        count, first = len(decoding), len(self.running)  # decode tokens: slots 0…count−1; prompts: first…
        prefix = self._prefix_cache(admitted)
        starts = [prefix.length if prefix is not None and starts_with(r, prefix.tokens) else 0 for r in admitted]
        computed = [(start, len(r.prompt_ids)) for r, start in zip(admitted, starts)]  # each prompt's positions
        adapters, routed = self._adapters_before_forward(admitted)
        input_ids, token_adapters = [], []
        for request, adapter, (start, end) in zip(admitted, adapters, computed):
            input_ids += request.prompt_ids[start:]
            token_adapters += [adapter] * (end - start)
        batch = SlotBatch.build(self.lengths[:count], computed, first, self.dtype, device)
        offsets = list(itertools.accumulate((end - start for start, end in computed), initial=count))  # first tokens
        last_tokens = torch.tensor([*range(count), *(offset - 1 for offset in offsets[1:])], device=device)
        prefixed = [i for i, start in enumerate(starts) if start]
        prefix_copy = None
        if prefixed:
            first_tokens = torch.tensor([offsets[i] for i in prefixed], device=device)
            prefix_copy = (prefix, torch.tensor([first + i for i in prefixed], device=device),
                           lambda: model.context.sequence_ids.index_select(0, first_tokens) + 1)  # entry 0: base
        self.cache.begin_step(batch.slots, batch.positions, prefix_copy)
        content = self._switch_content(admitted, starts, batch.prompts.width) if any(routed) else None
        token_adapters = torch.cat([self._adapters[:count].long(), torch.tensor(token_adapters, dtype=torch.long,
                                                                                     device=device)])
        input_ids = torch.cat([self._last_tokens[:count], torch.tensor(input_ids, dtype=torch.long, device=device)])
        logits = model.routed_forward(input_ids[None], batch.token_mask, content, token_adapters,
                                      torch.tensor(routed, device=device) if content is not None else None,
                                      position_ids=batch.positions[None], per_token=True, checked=True,
                                      rows=batch.prompts,
                                      past_key_values=self.cache, use_cache=True, logits_to_keep=last_tokens,
                                      slot_batch=batch)[0]
        used = model.context.sequence_ids.index_select(0, last_tokens).to(torch.int32)
        tokens = self._sample(logits, decoding + admitted)
        # the forward is done: the step's state changes
        self.lengths[:count] = [length + 1 for length in self.lengths[:count]]
        self._adapters[first : first + len(admitted)] = used[count:]
        self.running += admitted
        self.lengths += [len(r.prompt_ids) for r in admitted]
        self._emit(decoding + admitted, 0 if decoding else first, tokens, used.tolist())

    def _prefix_cache(self, admitted: list[EngineRequest]) -> PrefixCache | None:
        """The prefix's keys and values, computed at the first step that admits a prompt starting with it."""
        if self._prefix is None and any(starts_with(r, self.prefix_ids) for r in admitted):
            self._prefix = PrefixCache.compute(self.model, self.prefix_ids)
        return self._prefix

    def _adapters_before_forward(self, admitted: list[EngineRequest]) -> tuple[list[int], list[bool]]:
        """Each prompt's adapter id and whether the switch picks it inside the forward. A bank with
        adapters below the switch's layer cannot: an encoder pass over the routed prompts picks first."""
        adapters, routed = [r.adapter for r in admitted], [r.routed for r in admitted]
        if any(routed):
            self.model._require_switch()
            if not self.model.one_pass:
                chosen = iter(self._route(r for r in admitted if r.routed))
                adapters = [next(chosen) if is_routed else a for a, is_routed in zip(adapters, routed)]
                return adapters, [False] * len(routed)
        return adapters, routed

    def _route(self, requests) -> list[int]:
        """The switch's adapter id for each of ``requests``, from an encoder pass (left-padded prompts)."""
        requests = list(requests)
        input_ids, mask = pad([r.prompt_ids for r in requests], self.model.tokenizer.pad_token_id, device=self.device)
        spans = [r.span or (0, len(r.prompt_ids)) for r in requests]
        content = content_mask([len(r.prompt_ids) for r in requests], spans, input_ids.shape[1], device=self.device)
        return self.model.route_ids(input_ids, mask, content).tolist()

    def _switch_content(self, admitted: list[EngineRequest], starts: list[int], width: int) -> torch.Tensor:
        """``[k, W]``: the cells of the prompts' rows that the switch reads (their spans; a row starts at
        position ``starts[i]``)."""
        content = torch.zeros(len(admitted), width, dtype=torch.bool)
        for row, (request, start) in enumerate(zip(admitted, starts)):
            begin, end = request.span or (0, len(request.prompt_ids))
            content[row, begin - start : end - start] = True
        return content.to(self.device)

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
