"""The one path from prompt to output: prompt → switch → routing plan → adapter-bank layers → output.

:class:`SwitchModel` owns it. Evaluation (``switchcit train``, ``switchcit eval``), ``make demo`` and
``switchcit serve`` all generate through :meth:`SwitchModel.generate_ids`.

A routed prefill is one forward. Decoder layers 0…K−1 run the base model for every token (a run's
adapters sit on layers ≥ K only); a pre-hook on layer K hands that layer's input to the switch
(:func:`switchcit.ops.switch_route`: the fused Triton kernel on CUDA, the reference on CPU), which
returns an adapter id per sequence and per token on the device; the routing context builds the plan
from them once, and layers K…L−1 run with the adapters. No host sync between the switch and the
adapters. Decode steps reuse the sequences' ids (the context's pre-hook on the input embeddings builds
each step's plan before any layer). A bank with adapters below layer K cannot route in one pass: its
prompts first go through an encoder pass that stops at layer K.

Inside, adapters are int ids (−1: the base model); names appear only in :meth:`generate`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from switchcit.modules import NO_ADAPTER, MultiLoraLinear, accelerate_linear
from switchcit.ops import switch_route
from switchcit.ops.attention import PromptRows, accelerate_attention
from switchcit.ops.decoder import accelerate_decoder
from switchcit.prompts import content_mask, pad, prompt_tokens, template_head
from switchcit.switch import Switch, decoder_layers

__all__ = ["SwitchModel", "lowest_adapted_layer"]


class SwitchModel:
    """Base model + adapter bank + switch. ``model`` carries a routing context: an adapter bank
    (:func:`switchcit.load_adapters`) or an accelerated PEFT model (:func:`switchcit.accelerate`)."""

    def __init__(self, model: nn.Module, tokenizer, switch: Switch | None = None):
        from switchcit.adapters import routing_context

        # Decode steps on CPU: the linear layers' GEMMs through the C++ kernel (grad mode stays F.linear).
        self.model, self.tokenizer = accelerate_linear(model.eval()), tokenizer
        # Decode steps: grouped-query attention, and a Llama layer's norms and rotary as one C++ call each.
        self.network = accelerate_decoder(accelerate_attention(_transformers_model(model)))
        self.context = routing_context(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._routing: dict | None = None  # set for the length of a routed prefill
        self._embeddings: torch.Tensor | None = None
        self._hooks = []
        self.switch = switch

    @property
    def switch(self) -> Switch | None:
        return self._switch

    @switch.setter
    def switch(self, switch: Switch | None) -> None:
        """A (new) switch: its layer gets the routing hook, the layer of another switch loses it."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._switch, self._switch_cache = [], switch, (None, None)
        if switch is not None:
            switch.check_model(self.network)
            layers = decoder_layers(self.network)
            self._hooks = [layers[0].register_forward_pre_hook(self._keep_embeddings, with_kwargs=True),
                           layers[switch.layer].register_forward_pre_hook(self._route_at_switch_layer,
                                                                          with_kwargs=True)]

    @classmethod
    def from_pretrained(cls, base: str | Path, adapters: dict[str, str | Path], switch: str | Path | None = None,
                        switch_layer: int | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> SwitchModel:
        """Base model folder + PEFT adapter folders ``{"task": path}`` + an optional saved switch (whose
        encoder becomes the base model itself). ``switch_layer``: the layer the run's adapters start at
        (checked against the switch and the adapters before the model loads). ``device``: default cuda
        when available, else cpu; ``dtype``: of the weights, the adapters' and the KV cache."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from switchcit.adapters import adapter_layers, load_adapters
        from switchcit.pretrained import resolve_model

        base = resolve_model(base)
        loaded = Switch.load(switch) if switch is not None else None
        if loaded is not None:
            loaded.check_model(AutoConfig.from_pretrained(base))  # before the weights load
        if loaded is not None and switch_layer is not None and loaded.layer != switch_layer:
            raise ValueError(f"the run's switch reads layer {loaded.layer}, its adapters start at layer {switch_layer}")
        for task, folder in adapters.items():
            below = sorted(i for i in adapter_layers(folder) if switch_layer is not None and i < switch_layer)
            if below:
                raise ValueError(f"adapter {task!r} has weights in layers {below}, below the run's switch layer "
                                 f"{switch_layer}")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = load_adapters(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapters).to(device)
        if loaded is not None:
            loaded.encoder, loaded.tokenizer = model, tokenizer
        return cls(model, tokenizer, loaded)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> SwitchModel:
        """Everything a finished run left for serving (``RUN_DIR`` or ``RUN_DIR/switchcit``; see
        :mod:`switchcit.runs`), on ``device`` in ``dtype``."""
        from switchcit.runs import read_run

        run = read_run(run_dir)
        return cls.from_pretrained(run.base, run.adapters, run.switch, run.switch_layer, device, dtype)

    # ------------------------------------------------------------------ routing

    @property
    def one_pass(self) -> bool:
        """Whether the switch can route inside the forward: no adapter below its layer."""
        return self.switch is not None and lowest_adapted_layer(self.network) >= self.switch.layer

    def task_to_adapter(self, device=None) -> torch.Tensor:
        """Each switch task's adapter id (−1: the bank has no adapter for it)."""
        names = self.context.names
        return torch.tensor([names.index(t) if t in names else NO_ADAPTER for t in self.switch.tasks],
                            dtype=torch.int32, device=device)

    @torch.no_grad()
    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Adapter id per sequence (int32, −1: base model) of tokenised, left-padded prompts (``content``:
        the mask of each prompt's own tokens), on the device, from an encoder pass that stops at the
        switch's layer (every token on the base model)."""
        self._require_switch()
        self.context.assign(torch.full((len(input_ids),), NO_ADAPTER, device=input_ids.device))  # base only
        self._routing = {"content": content, "routed": None, "explicit": None, "rows": None}
        try:
            self.network(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=_positions(attention_mask), use_cache=False)
        except _Routed:
            pass
        finally:
            routing, self._routing = self._routing, None
        return routing["sequence_ids"]

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The adapter the switch picks for each prompt (``None``: base model)."""
        rows, spans = zip(*(prompt_tokens(self.tokenizer, p) for p in prompts))
        input_ids, mask = pad(rows, self.tokenizer.pad_token_id, device=self._device)
        content = content_mask([len(r) for r in rows], spans, input_ids.shape[1], device=self._device)
        return self.adapter_names(self.route_ids(input_ids, mask, content))

    def _switch_tensors(self, device: torch.device):
        """The switch's head and task → adapter ids on ``device``, copied there once (not inside a
        forward that may be captured) and again only when the switch or the adapters change."""
        key = (id(self.switch.mlp), device, tuple(self.context.names))  # add_task trains a new mlp
        if self._switch_cache[0] != key:
            self._switch_cache = (key, (self.switch.head(device), self.task_to_adapter(device)))
        return self._switch_cache[1]

    def adapter_names(self, ids: torch.Tensor) -> list[str | None]:
        """Ids → names, the edge where they leave the library (``None``: base model)."""
        return [None if i < 0 else self.context.names[i] for i in ids.tolist()]

    def _keep_embeddings(self, layer, args, kwargs) -> None:
        if self._routing is not None:
            self._embeddings = args[0] if args else kwargs["hidden_states"]

    def _route_at_switch_layer(self, layer, args, kwargs) -> None:
        routing = self._routing
        if routing is None:
            return
        hidden, embeddings, rows = args[0] if args else kwargs["hidden_states"], self._embeddings, routing["rows"]
        if rows is not None:  # a flattened step: the switch reads its prompts as rows
            hidden, embeddings = rows.gather(hidden[0]), rows.gather(embeddings[0])
        sequence_ids, token_ids = switch_route(hidden, embeddings, routing["content"],
                                               *self._switch_tensors(hidden.device), self.switch.pool)
        self._embeddings = None
        if routing["routed"] is None:  # an encoder pass: stop here
            routing["sequence_ids"] = sequence_ids
            raise _Routed
        keep, explicit = routing["routed"], routing["explicit"].to(torch.int32)  # named adapters stay
        if rows is not None:
            token_ids = rows.scatter(torch.where(keep[:, None], token_ids, rows.gather(explicit)), explicit)
            sequence_ids = token_ids  # one id per token
        else:
            sequence_ids = torch.where(keep, sequence_ids, explicit)
            token_ids = torch.where(keep[:, None], token_ids, explicit[:, None])
        self.context.route_tokens(token_ids, sequence_ids, validate=False)  # the switch's table holds valid ids

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], adapters: Sequence[str | None] | None = None, *,
                 max_new_tokens: int = 64, chat: bool = True,
                 batch_size: int = 16) -> tuple[list[str], list[str | None]]:
        """Greedy answers for ``prompts`` and the adapter each went to (``None``: base model).
        ``adapters``: a name (or ``None``) per prompt; by default the switch picks. All prompts go through
        one engine with ``batch_size`` slots (continuous batching: a finished answer's slot takes the
        next prompt); answers in input order."""
        prompts = list(prompts)
        if adapters is not None and len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        explicit = None if adapters is None else self.context.ids_of(adapters)
        rows, spans = zip(*(prompt_tokens(self.tokenizer, p, chat) for p in prompts)) if prompts else ((), ())
        stops = self.stop_token_ids()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # prompts of similar length join together
        new_tokens, routed = self.generate_ids([rows[i] for i in order], [max_new_tokens] * len(rows), stops,
                                               None if explicit is None else explicit[order],
                                               spans=[spans[i] for i in order], max_num_seqs=batch_size)
        texts, chosen = [""] * len(rows), [None] * len(rows)
        for i, tokens, adapter in zip(order, new_tokens, self.adapter_names(routed)):
            texts[i] = self.tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True).strip()
            chosen[i] = adapter
        return texts, chosen

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: Sequence[int], stop_ids: Sequence[int],
                     adapter_ids: torch.Tensor | None = None, routed: torch.Tensor | None = None,
                     spans: Sequence[tuple[int, int]] | None = None,
                     max_num_seqs: int | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy-generate every prompt (token ids) in one mixed batch (:class:`switchcit.engine.Engine`,
        every prompt in one slot of its KV cache, one prefill for all); returns each
        prompt's new tokens — at most its own ``max_new_tokens``, ending at its first stop token if it
        reached one: what the prompt gets when generated alone — and the adapter id each used.

        ``adapter_ids [B]``: each prompt's adapter (−1: base model); ``None``: the switch picks for
        all. ``routed [B]`` (bool): the switch picks for these prompts, the others keep their id.
        ``spans``: each prompt's own tokens ``(start, end)``, what the switch reads (default: all).
        ``max_num_seqs``: sequences generated together (default: all; fewer → continuous batching)."""
        from switchcit.engine import Engine, EngineRequest, SamplingParams

        batch, device = len(prompt_ids), self._device
        if batch == 0:
            return [], torch.zeros(0, dtype=torch.int32, device=device)
        explicit = [NO_ADAPTER] * batch if adapter_ids is None else adapter_ids.tolist()
        routed = [adapter_ids is None] * batch if routed is None else routed.tolist()
        spans = [(0, len(row)) for row in prompt_ids] if spans is None else spans
        used = [NO_ADAPTER] * batch

        def keep_adapter(index: int):
            def emit(tokens, finish_reason, adapter):
                used[index] = adapter
            return emit

        requests = [EngineRequest(list(row), SamplingParams(max_tokens=limit), keep_adapter(i), adapter, is_routed,
                                  span) for i, (row, limit, adapter, is_routed, span)
                    in enumerate(zip(prompt_ids, max_new_tokens, explicit, routed, spans))]
        slots = min(batch, max_num_seqs or batch)
        longest_prompts = sorted((len(row) for row in prompt_ids), reverse=True)[:slots]
        engine = Engine(self, max_num_seqs=slots, max_model_len=max(len(r.prompt_ids) + r.params.max_tokens
                                                                    for r in requests),
                        max_num_batched_tokens=sum(longest_prompts), stop_ids=stop_ids,
                        prefix_ids=template_head(self.tokenizer))
        for request in requests:
            engine.add(request)
        engine.run_until_done()
        failed = next((r.error for r in requests if r.error is not None), None)
        if failed is not None:
            raise failed
        return [r.output for r in requests], torch.tensor(used, dtype=torch.int32, device=device)

    def routed_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, content: torch.Tensor | None,
                       adapter_ids: torch.Tensor, routed: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, per_token: bool = False, checked: bool = False,
                       rows: PromptRows | None = None, **model_kwargs) -> torch.Tensor:
        """The logits of one forward, routed: ``adapter_ids`` (−1: base model), the switch's choice where
        ``routed [B]`` is true (read at its layer inside this forward; ``content``: each prompt's own
        tokens). No host sync, so it can be captured in a CUDA graph; the adapters it used stay assigned
        for the forwards that follow.

        A left-padded batch ``[B, S]``: one adapter id per sequence, ``content [B, S]``; ``position_ids``
        by default from ``attention_mask``'s left padding (give them with a 4-D mask). A flattened step
        ``[1, T]`` (the engine's), ``per_token``: ``adapter_ids [T]`` has one id per token; ``rows`` lays out
        its prompts, ``routed [k]`` and ``content [k, W]`` are per prompt and per cell of its row.
        ``checked``: ``adapter_ids`` are the caller's own valid ids, not read back (no host sync on CUDA)."""
        self.context.assign(adapter_ids, checked=checked, tokens=per_token)
        if routed is not None:
            self._routing = {"content": content, "routed": routed, "explicit": adapter_ids, "rows": rows}
        try:
            if position_ids is None:
                position_ids = _positions(attention_mask)
            return self.network(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                **model_kwargs).logits
        finally:
            self._routing = None

    def stop_token_ids(self) -> list[int]:
        """The tokens that end an answer: the generation config's EOS (chat models: end of turn)."""
        eos = self.network.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _require_switch(self) -> None:
        if self.switch is None:
            raise ValueError("this SwitchModel has no switch: name each prompt's adapter")


class _Routed(Exception):
    """Raised at the switch layer of an encoder pass: the ids are known, the rest is not needed."""


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (its LoRA layers in place), or ``model`` itself."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.base_model.model if isinstance(model, PeftModel) else model


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each sequence counts from 0 at its first token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def lowest_adapted_layer(model: nn.Module) -> int:
    """The lowest decoder layer index with an adapter weight (a bank layer or a PEFT LoRA layer); the
    number of layers when there is none."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        for module in layer.modules():
            bank = isinstance(module, MultiLoraLinear) and module.lora_a.shape[1] > 0  # shapes: no device read
            if bank or getattr(module, "lora_A", None):
                return index
    return len(layers)
