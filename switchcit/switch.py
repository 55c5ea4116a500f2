"""The switch: instruction → task classifier that picks the adapter (SwitchCIT).

A small MLP (features → 200 → tasks, ReLU; the paper's) over a frozen language model's hidden states,
trained on a tiny retained sample of each task's instructions. A new task retrains it on what it
retained plus the new task's sample, so old tasks' full data is never needed again.

Features: the mean, over the prompt's own tokens (read in its chat template, the template's tokens left
out of the mean), of the input of decoder layer ``layer`` = K (K = 0: the input embeddings). The pipeline
(:mod:`switchcit.pipeline`) reads them inside the routed forward itself — layers 0…K−1 run the base
model, the switch routes, layers K…L−1 run the adapters — so routing costs no extra pass; here (training,
:meth:`Switch.route`) the encoder pass stops at layer K (early exit).

The MLP always names *some* task, so an instruction of a task never seen would get a wrong adapter.
A gate sends it to the base model instead: the prompt's Mahalanobis distance to the chosen task's
retained prompts (class mean, shared covariance shrunk toward a scaled identity, kept as a low-rank
correction) must stay within ``gate_margin`` × the largest distance seen on held-out folds of the
retained sample itself — calibrated without any example of an unknown task. The gate reads the mean of
the input embeddings, whatever the layer. With a single retained prompt per task there is nothing to
hold out, and the gate stays open.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from switchcit.ops import SwitchHead
from switchcit.ops.naive import classify_reference, gate_distance
from switchcit.prompts import content_mask, pad, prompt_tokens

__all__ = ["DEFAULT_LAYER", "Switch", "check_layer", "decoder_layers", "encode_features", "encode_layers",
           "load_encoder", "model_signature"]

DEFAULT_LAYER = 2  # chosen by measurement: benchmarks/results/switch-layer.md
SWITCH_WEIGHTS = "switch.safetensors"
SWITCH_CONFIG = "switch.json"


def fit_gate(normalised: torch.Tensor, labels: torch.Tensor, num_tasks: int, shrinkage: float = 0.3,
             max_components: int = 128) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Class means and the shrunk shared covariance's inverse as ``(means, components, scale)``:
    Σ = (1−α)·S + α·τ·I with S the within-task scatter, τ its mean variance, so
    Σ⁻¹ = 1/(ατ) · (I − Σₖ wₖ vₖvₖᵀ) over S's top eigenvectors vₖ (wₖ = 1 − ατ/((1−α)λₖ + ατ))."""
    dim = normalised.shape[1]
    counts = torch.bincount(labels, minlength=num_tasks).clamp(min=1).to(normalised)
    means = torch.zeros(num_tasks, dim).index_add_(0, labels, normalised) / counts[:, None]
    residual = normalised - means[labels]
    variance = float(residual.pow(2).sum()) / (len(normalised) * dim)
    shrunk = shrinkage * (variance if variance > 0 else 1.0)  # one prompt per task: unit variance (normalised)
    _, singular, directions = torch.linalg.svd(residual, full_matrices=False)
    eigenvalues = singular[:max_components].pow(2) / len(normalised)
    weights = 1 - shrunk / ((1 - shrinkage) * eigenvalues + shrunk)
    return means, weights.sqrt()[:, None] * directions[:max_components], 1.0 / shrunk


def calibrate_max_distance(normalised: torch.Tensor, labels: torch.Tensor, num_tasks: int, folds: int = 5,
                           seed: int = 0) -> float:
    """The largest distance of a retained prompt to its own task, fitted without it (``folds``-fold);
    ``inf`` (gate open) when no task has two retained prompts."""
    fold = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) % folds
    largest = float("-inf")
    for k in range(folds):
        held_out, rest = fold == k, fold != k
        known = torch.bincount(labels[rest], minlength=num_tasks) > 0
        check = held_out & known[labels]
        if not check.any():
            continue
        gate = fit_gate(normalised[rest], labels[rest], num_tasks)
        largest = max(largest, float(gate_distance(normalised[check], labels[check], *gate).max()))
    return largest if largest > float("-inf") else float("inf")


class Switch:
    """Task classifier over frozen-encoder features; see the module docstring.

    Not an ``nn.Module``: ``Switch.train(...)`` builds a trained switch (the user contract), which
    would clash with ``nn.Module.train(mode)``. The classifier itself is ``self.mlp``.
    """

    _TENSORS = ("feature_mean", "feature_scale", "gate_feature_mean", "gate_feature_scale", "class_means",
                "gate_components")

    def __init__(self, tasks: Sequence[str], feature_dim: int, hidden: int = 200, layer: int = DEFAULT_LAYER):
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"the switch layer must be an integer >= 0, got {layer!r}")
        self.tasks = list(tasks)
        self.layer = layer
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(self.tasks))).eval()
        self.feature_mean = torch.zeros(feature_dim)
        self.feature_scale = torch.ones(feature_dim)
        self.gate_feature_mean = torch.zeros(feature_dim)
        self.gate_feature_scale = torch.ones(feature_dim)
        self.class_means = torch.zeros(len(self.tasks), feature_dim)
        self.gate_components = torch.zeros(0, feature_dim)
        self.gate_scale = 1.0
        self.max_distance = math.inf
        self.min_probability = 0.0
        self.gate_margin = 1.25
        self.fit_options: dict = {}
        self.epochs_trained = 0
        self.retained: dict[str, list[str]] = {}
        self.base_model: dict | None = None  # model_signature() of the encoder it was trained on
        self.encoder = None
        self.tokenizer = None

    # ---------------------------------------------------------------- training

    @classmethod
    def train(cls, prompts: Sequence[str], task_labels: Sequence[str], encoder=None, tokenizer=None, *,
              layer: int = DEFAULT_LAYER, **fit_options) -> Switch:
        """Train a switch on the retained prompts (one task label each) from the input of decoder layer
        ``layer`` of ``encoder`` (a transformers model, or a folder to load one and its tokenizer from).
        ``fit_options``: see :meth:`fit`."""
        if len(prompts) != len(task_labels) or not prompts:
            raise ValueError(f"need as many task labels as prompts (got {len(prompts)} and {len(task_labels)}), "
                             f"at least one")
        encoder, tokenizer = load_encoder(encoder, tokenizer)
        check_layer(layer, encoder)
        features, gate_features = encode_features(list(prompts), encoder, tokenizer, layer)
        switch = cls.fit(features, gate_features, task_labels, layer=layer, **fit_options)
        return switch._attach(encoder, tokenizer, prompts, task_labels)

    def _attach(self, encoder, tokenizer, prompts: Sequence[str], task_labels: Sequence[str]) -> Switch:
        self.encoder, self.tokenizer, self.base_model = encoder, tokenizer, model_signature(encoder)
        for prompt, task in zip(prompts, task_labels):
            self.retained.setdefault(task, []).append(prompt)
        return self

    @classmethod
    def fit(cls, features: torch.Tensor, gate_features: torch.Tensor, task_labels: Sequence[str], *,
            layer: int = DEFAULT_LAYER, hidden: int = 200, lr: float = 1e-3, batch_size: int = 32,
            max_epochs: int = 2000, patience: int = 20, min_loss: float = 1e-3, gate_margin: float = 1.25,
            seed: int = 0) -> Switch:
        """A switch from already pooled features ``[N, D]`` (classifier and gate inputs; no encoder
        attached): the MLP as in the paper (AdamW, cross-entropy) trained to convergence — until the
        training loss falls below ``min_loss`` or has not improved by 1 % for ``patience`` epochs
        (``max_epochs`` only bounds a pathological case) — then the gate."""
        tasks = list(dict.fromkeys(task_labels))
        labels = torch.tensor([tasks.index(t) for t in task_labels])
        switch = cls(tasks, features.shape[1], hidden=hidden, layer=layer)
        switch.fit_options = {"hidden": hidden, "lr": lr, "batch_size": batch_size, "max_epochs": max_epochs,
                              "patience": patience, "min_loss": min_loss, "gate_margin": gate_margin, "seed": seed}
        switch.feature_mean, switch.feature_scale, inputs = _standardise(features)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the MLP's initialisation
        switch.mlp = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, len(tasks)))
        optimizer = torch.optim.AdamW(switch.mlp.parameters(), lr=lr)
        best, since_best = math.inf, 0
        with torch.enable_grad():  # also when called under no_grad
            for epoch in range(1, max_epochs + 1):
                order = torch.randperm(len(inputs), generator=gen)
                for start in range(0, len(inputs), batch_size):
                    batch = order[start : start + batch_size]
                    loss = nn.functional.cross_entropy(switch.mlp(inputs[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    loss = float(nn.functional.cross_entropy(switch.mlp(inputs), labels))
                best, since_best = (loss, 0) if loss < 0.99 * best else (best, since_best + 1)
                switch.epochs_trained = epoch
                if loss < min_loss or since_best >= patience:
                    break
        switch.mlp.eval()
        switch.gate_feature_mean, switch.gate_feature_scale, gate_inputs = _standardise(gate_features)
        switch.class_means, switch.gate_components, switch.gate_scale = fit_gate(gate_inputs, labels, len(tasks))
        switch.gate_margin = gate_margin
        switch.max_distance = gate_margin * calibrate_max_distance(gate_inputs, labels, len(tasks), seed=seed)
        return switch

    def add_task(self, name: str, prompts: Sequence[str], **fit_options) -> Switch:
        """Learn a new task from its retained sample: retrains this switch on everything retained so far
        (same encoder, layer and options unless given). Returns this switch, so calls chain."""
        all_prompts, labels = self.with_task(name, prompts)
        trained = Switch.train(all_prompts, labels, self.encoder, self.tokenizer, layer=self.layer,
                               **(self.fit_options | fit_options))
        self.__dict__.update(trained.__dict__)
        return self

    def with_task(self, name: str, prompts: Sequence[str]) -> tuple[list[str], list[str]]:
        """Everything retained plus task ``name``'s prompts, and their task labels: what a switch that
        learns ``name`` trains on."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already known")
        if not prompts:
            raise ValueError(f"task {name!r} has no prompts")
        all_prompts = [p for task in self.tasks for p in self.retained[task]] + list(prompts)
        labels = [task for task in self.tasks for _ in self.retained[task]] + [name] * len(prompts)
        return all_prompts, labels

    def trained_on(self, prompts: Sequence[str], task_labels: Sequence[str], features: torch.Tensor,
                   gate_features: torch.Tensor) -> Switch:
        """A new switch with this one's encoder, layer and options, fitted to already encoded ``prompts``
        (the server encodes them between two generation steps, then fits off its engine thread)."""
        trained = Switch.fit(features, gate_features, task_labels, layer=self.layer, **self.fit_options)
        return trained._attach(self.encoder, self.tokenizer, prompts, task_labels)

    # ---------------------------------------------------------------- routing

    @property
    def pool(self) -> str:
        return "mean"

    def head(self, device=None) -> SwitchHead:
        """The trained classifier and gate as plain float32 tensors (on ``device``)."""
        (w1, b1), (w2, b2) = ((layer.weight.detach(), layer.bias.detach()) for layer in (self.mlp[0], self.mlp[2]))
        return SwitchHead(self.feature_mean, self.feature_scale, w1, b1, w2, b2, self.gate_feature_mean,
                          self.gate_feature_scale, self.class_means, self.gate_components, self.gate_scale,
                          self.max_distance, self.min_probability).to(device or self.feature_mean.device)

    @torch.no_grad()
    def classify(self, features: torch.Tensor, gate_features: torch.Tensor) -> torch.Tensor:
        """Task index per row of raw pooled features ``[B, D]``, −1 where the gate says "unknown"."""
        return classify_reference(features, gate_features, self.head(features.device))

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The task of each prompt, or ``None`` (base model) when unsure."""
        if self.encoder is None:
            raise ValueError("this switch has no encoder: pass encoder= to Switch.load")
        task = self.classify(*encode_features(list(prompts), self.encoder, self.tokenizer, self.layer))
        return [self.tasks[i] if i >= 0 else None for i in task.tolist()]

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` (or its transformers config) is not the base model this switch was trained
        on, or has no layer K."""
        check_layer(self.layer, model)
        signature = model_signature(model)
        if self.base_model is not None and signature != self.base_model:
            raise ValueError(f"the switch was trained on another base model ({self.base_model}), not {signature}")

    # ---------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> Path:
        """Weights (safetensors) + config and retained prompts (JSON); the encoder is not saved."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = ({f"mlp.{k}": v for k, v in self.mlp.state_dict().items()}
                   | {k: getattr(self, k) for k in self._TENSORS})
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / SWITCH_WEIGHTS))
        encoder_path = getattr(getattr(self.encoder, "config", None), "_name_or_path", None)
        config = {
            "tasks": self.tasks, "layer": self.layer, "feature_dim": self.mlp[0].in_features,
            "hidden": self.mlp[0].out_features, "min_probability": self.min_probability, "gate_scale": self.gate_scale,
            "max_distance": None if math.isinf(self.max_distance) else self.max_distance,
            "gate_margin": self.gate_margin, "fit_options": self.fit_options, "epochs_trained": self.epochs_trained,
            "base_model": self.base_model, "retained": self.retained, "encoder": encoder_path,
        }
        (folder / SWITCH_CONFIG).write_text(json.dumps(config, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder=None, tokenizer=None) -> Switch:
        """Load a saved switch; ``encoder`` defaults to the folder recorded at save time (and must be
        the base model it was trained on)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / SWITCH_CONFIG).is_file():
            raise FileNotFoundError(f"{folder} is not a saved switch: {SWITCH_CONFIG} is missing")
        config = json.loads((folder / SWITCH_CONFIG).read_text())
        switch = cls(config["tasks"], config["feature_dim"], hidden=config["hidden"], layer=config["layer"])
        state = load_file(str(folder / SWITCH_WEIGHTS))
        switch.mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        for name in cls._TENSORS:
            setattr(switch, name, state[name])
        switch.min_probability, switch.gate_scale = config["min_probability"], config["gate_scale"]
        switch.max_distance = math.inf if config["max_distance"] is None else config["max_distance"]
        switch.gate_margin, switch.fit_options = config["gate_margin"], config["fit_options"]
        switch.epochs_trained, switch.base_model = config["epochs_trained"], config["base_model"]
        switch.retained = config["retained"]
        if encoder is not None or config.get("encoder"):
            switch.encoder, switch.tokenizer = load_encoder(encoder or config["encoder"], tokenizer)
            switch.check_model(switch.encoder)
        return switch


def _standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-dimension mean and scale of ``features`` (scale 1 for a single row) and the standardised rows."""
    features = features.float()
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(mean)
    return mean, scale, (features - mean) / scale


def model_signature(model) -> dict:
    """What identifies a base model to a switch: its architecture's sizes (``model``: a model or its config)."""
    config = getattr(model, "config", model)
    return {key: getattr(config, key, None)
            for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "max_position_embeddings")}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers model (also inside a PeftModel): the first module list with
    ``config.num_hidden_layers`` entries."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"found no list of {count} decoder layers in {type(model).__name__}")


def check_layer(layer: int, model) -> None:
    count = getattr(model, "config", model).num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        raise ValueError(f"switch layer {layer!r} is outside [0, {count}) for this {count}-layer model")


def load_encoder(encoder, tokenizer=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if encoder is None:
        raise ValueError("a switch needs an encoder: a transformers model or a folder to load one from")
    if isinstance(encoder, (str, Path)):
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(encoder)
        encoder = AutoModelForCausalLM.from_pretrained(encoder)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(encoder.config._name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return encoder.eval(), tokenizer


class _ReachedLayer(Exception):
    """Raised by the early-exit hook: the encoder pass has what it needs."""


def encode_features(prompts: Sequence[str], encoder, tokenizer, layer: int,
                    **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, gate_features)``, float32 ``[len(prompts), D]``: the mean of decoder layer ``layer``'s
    input and of the input embeddings over each prompt's own tokens; the pass stops at layer ``layer``."""
    check_layer(layer, encoder)
    pooled = encode_layers(prompts, encoder, tokenizer, sorted({0, layer}), **options)
    return pooled[layer], pooled[0]


@torch.no_grad()
def encode_layers(prompts: Sequence[str], encoder, tokenizer, layers: Sequence[int],
                  batch_size: int = 32) -> dict[int, torch.Tensor]:
    """``{layer: [len(prompts), D]}``: each decoder layer's input, mean-pooled over each prompt's own
    tokens (read in its chat template), from one pass that stops at the highest of ``layers``. Prompts are
    batched by length (less padding), results in input order."""
    from switchcit.ops.naive import pool_features

    for layer in layers:
        check_layer(layer, encoder)
    modules = decoder_layers(encoder)
    device = next(encoder.parameters()).device
    rows, spans = zip(*(prompt_tokens(tokenizer, p) for p in prompts)) if prompts else ((), ())
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    last = max(layers)
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            captured[index] = args[0] if args else kwargs["hidden_states"]
            if index == last:
                raise _ReachedLayer

        return hook

    hooks = [modules[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(set(layers))]
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, mask = pad([rows[i] for i in batch], tokenizer.pad_token_id, side="right", device=device)
            content = content_mask([len(rows[i]) for i in batch], [spans[i] for i in batch], input_ids.shape[1],
                                   side="right", device=device)
            try:
                encoder(input_ids=input_ids, attention_mask=mask, use_cache=False)
            except _ReachedLayer:
                pass
            for layer in layers:
                pooled[layer].append(pool_features(captured[layer].float(), content, "mean").cpu())
    finally:
        for hook in hooks:
            hook.remove()
    inverse = torch.argsort(torch.tensor(order, dtype=torch.long))
    dim = encoder.config.hidden_size
    return {layer: torch.cat(chunks)[inverse] if chunks else torch.zeros(0, dim) for layer, chunks in pooled.items()}
