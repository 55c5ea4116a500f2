"""The switch: instruction → task classifier that picks the adapter (SwitchCIT).

A small MLP (features → 200 → tasks, ReLU; the paper's) over features of a frozen language model,
trained on a tiny retained sample of each task's instructions. New tasks retrain it on what it
retained plus the new task's sample, so old tasks' full data is never needed again.

The MLP always names *some* task, so an instruction of a task never seen would get a wrong adapter.
A gate sends it to the base model (``None``) instead: the prompt's Mahalanobis distance to the
chosen task's retained prompts (class mean, shared covariance shrunk toward a scaled identity, kept
as a low-rank correction) must stay within ``gate_margin`` × the largest distance seen on held-out
folds of the retained sample itself — calibrated without any example of an unknown task. The gate
reads the mean of the prompt's input embeddings, whatever the classifier reads: on the real tasks,
last-token hidden states of unseen-task prompts sit *closer* to the task means than many in-task
prompts do, while embedding means separate them (``benchmarks/results/switch-accuracy.md``). With
a single retained prompt per task there is nothing to hold out, and the gate stays open.

Feature sources (``feature=``):

* ``"last_token"`` (default, the paper's): the encoder's last-layer hidden state at the prompt's last
  token; ``"mean"``: its mean over the prompt's tokens;
* ``"layer:K"``: the same, last token, at hidden layer K (a cheaper, earlier read-out);
* ``"embeddings"``: the mean of the encoder's input embeddings (no transformer pass at all).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

__all__ = ["Switch", "SwitchHead", "SwitchModel", "chat_text", "classify_reference", "encode_features", "pool_features", "route_reference"]

SWITCH_WEIGHTS = "switch.safetensors"
SWITCH_CONFIG = "switch.json"


def pool_features(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """``hidden [B, S, D]`` → ``[B, D]``: the last attended token (left or right padding) or the mean
    over attended tokens. The reference of the fused kernel's pooling."""
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).amax(1)  # the last position whose mask is 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class SwitchHead:
    """What routing needs of a trained switch, as plain float32 tensors (the fused kernel's inputs):
    the classifier (feature normalisation, MLP ``w1 [H, D]``, ``w2 [tasks, H]``) and the gate (its
    own feature normalisation, class means, low-rank inverse covariance, threshold)."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    gate_feature_mean: torch.Tensor
    gate_feature_scale: torch.Tensor
    class_means: torch.Tensor  # [tasks, D], normalised gate features
    gate_components: torch.Tensor  # [K, D], rows pre-scaled so distance = gate_scale·(|d|² − |C d|²)
    gate_scale: float
    max_distance: float  # inf: gate open
    min_probability: float

    def to(self, device) -> SwitchHead:
        return replace(self, **{f.name: getattr(self, f.name).to(device, torch.float32)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def gate_distance(normalised: torch.Tensor, task: torch.Tensor, class_means: torch.Tensor,
                  gate_components: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """Squared Mahalanobis distance of each row to its task's class mean (shrunk covariance)."""
    offset = normalised - class_means[task]
    return gate_scale * (offset.pow(2).sum(1) - (offset @ gate_components.T).pow(2).sum(1))


def classify_reference(features: torch.Tensor, gate_features: torch.Tensor, head: SwitchHead) -> torch.Tensor:
    """Task index per row of pooled features ``[B, D]`` (classifier and gate inputs), −1 where the
    gate says "unknown task"."""
    normalised = (features.float() - head.feature_mean) / head.feature_scale
    layer1 = torch.relu(normalised @ head.w1.T + head.b1)
    probability, task = torch.softmax(layer1 @ head.w2.T + head.b2, dim=1).max(1)
    gate_normalised = (gate_features.float() - head.gate_feature_mean) / head.gate_feature_scale
    distance = gate_distance(gate_normalised, task, head.class_means, head.gate_components, head.gate_scale)
    return torch.where((probability >= head.min_probability) & (distance <= head.max_distance), task, -1)


def route_reference(hidden: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor, head: SwitchHead,
                    task_to_adapter: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch spec of the fused kernel (``switchcit.kernels.fused_switch_route``): pool
    ``hidden`` (``pool``: last/mean) for the classifier and ``embeddings`` (mean) for the gate →
    ``(adapter id per sequence [B], per token [B, S])``, −1 for the base model."""
    task = classify_reference(pool_features(hidden.float(), attention_mask, pool),
                              pool_features(embeddings.float(), attention_mask, "mean"), head)
    ids = torch.where(task >= 0, task_to_adapter.long()[task.clamp(min=0)], -1).to(torch.int32)
    return ids, ids[:, None].expand(hidden.shape[0], hidden.shape[1])


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

    def __init__(self, tasks: Sequence[str], feature_dim: int, gate_dim: int, hidden: int = 200, feature: str = "last_token"):
        self.tasks = list(tasks)
        self.feature = _check_feature(feature)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(self.tasks))).eval()
        self.feature_mean = torch.zeros(feature_dim)
        self.feature_scale = torch.ones(feature_dim)
        self.gate_feature_mean = torch.zeros(gate_dim)
        self.gate_feature_scale = torch.ones(gate_dim)
        self.class_means = torch.zeros(len(self.tasks), gate_dim)
        self.gate_components = torch.zeros(0, gate_dim)
        self.gate_scale = 1.0
        self.max_distance = math.inf
        self.min_probability = 0.0
        self.gate_margin = 1.25
        self.retained: dict[str, list[str]] = {}
        self.encoder = None
        self.tokenizer = None

    _TENSORS = ("feature_mean", "feature_scale", "gate_feature_mean", "gate_feature_scale", "class_means", "gate_components")
    GATE_FEATURE = "embeddings"

    # ---------------------------------------------------------------- training

    @classmethod
    def train(
        cls, prompts: Sequence[str], task_labels: Sequence[str], encoder=None, tokenizer=None, *,
        feature: str = "last_token", **fit_options,
    ) -> Switch:
        """Train a switch on the retained prompts (one task label each). ``encoder``: a transformers
        model or a folder to load one from (and its tokenizer); ``fit_options``: see :meth:`fit`."""
        if len(prompts) != len(task_labels) or not prompts:
            raise ValueError(f"need as many task labels as prompts (got {len(prompts)} and {len(task_labels)}), at least one")
        _check_feature(feature)
        encoder, tokenizer = load_encoder(encoder, tokenizer)
        features = encode_features(list(prompts), encoder, tokenizer, (feature, cls.GATE_FEATURE))
        switch = cls.fit(features[feature], features[cls.GATE_FEATURE], task_labels, feature=feature, **fit_options)
        switch.encoder, switch.tokenizer = encoder, tokenizer
        for prompt, task in zip(prompts, task_labels):
            switch.retained.setdefault(task, []).append(prompt)
        return switch

    @classmethod
    def fit(cls, features: torch.Tensor, gate_features: torch.Tensor, task_labels: Sequence[str], *,
            feature: str = "last_token", hidden: int = 200, epochs: int = 20, lr: float = 1e-3, batch_size: int = 32,
            gate_margin: float = 1.25, seed: int = 0) -> Switch:
        """A switch from already pooled features ``[N, D]`` (classifier and gate inputs; no encoder
        attached): the MLP as in the paper (AdamW, cross-entropy), then the gate."""
        tasks = list(dict.fromkeys(task_labels))
        labels = torch.tensor([tasks.index(t) for t in task_labels])
        switch = cls(tasks, features.shape[1], gate_features.shape[1], hidden=hidden, feature=feature)
        switch.feature_mean, switch.feature_scale, inputs = _standardise(features)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the MLP's initialisation
        switch.mlp = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, len(tasks)))
        optimizer = torch.optim.AdamW(switch.mlp.parameters(), lr=lr)
        with torch.enable_grad():  # also when called under no_grad
            for _ in range(epochs):
                order = torch.randperm(len(inputs), generator=gen)
                for start in range(0, len(inputs), batch_size):
                    batch = order[start : start + batch_size]
                    loss = nn.functional.cross_entropy(switch.mlp(inputs[batch]), labels[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        switch.mlp.eval()
        switch.gate_feature_mean, switch.gate_feature_scale, gate_inputs = _standardise(gate_features)
        switch.class_means, switch.gate_components, switch.gate_scale = fit_gate(gate_inputs, labels, len(tasks))
        switch.gate_margin = gate_margin
        switch.max_distance = gate_margin * calibrate_max_distance(gate_inputs, labels, len(tasks), seed=seed)
        return switch

    def add_task(self, name: str, prompts: Sequence[str], **train_options) -> Switch:
        """A new task from its retained sample; retrains on everything retained so far. Returns the
        new switch (same encoder), this one unchanged."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already known")
        if not prompts:
            raise ValueError(f"task {name!r} has no prompts")
        all_prompts = [p for task in self.tasks for p in self.retained[task]] + list(prompts)
        labels = [task for task in self.tasks for _ in self.retained[task]] + [name] * len(prompts)
        options = {"feature": self.feature, "hidden": self.mlp[0].out_features, "gate_margin": self.gate_margin} | train_options
        return Switch.train(all_prompts, labels, self.encoder, self.tokenizer, **options)

    # ---------------------------------------------------------------- routing

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

    @torch.no_grad()
    def route_hidden(self, hidden: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor,
                     task_to_adapter: torch.Tensor, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ids ``(per sequence int32 [B], per token int32 [B, S])`` from the encoder's
        ``hidden`` states (the layer of ``self.feature``) and input ``embeddings`` ``[B, S, D]``, all on
        the device, no host sync. ``task_to_adapter [tasks]``: each task's id in the adapter bank
        (−1: none). ``backend``: ``"triton"`` (the fused kernel; automatic on CUDA) or ``"torch"``."""
        batch, seq_len, dim = hidden.shape
        if embeddings.shape != hidden.shape or attention_mask.shape != (batch, seq_len):
            raise ValueError(f"hidden {tuple(hidden.shape)}, embeddings {tuple(embeddings.shape)} and attention mask "
                             f"{tuple(attention_mask.shape)} must be [B, S, D], [B, S, D] and [B, S]")
        if dim != self.mlp[0].in_features or dim != self.class_means.shape[1]:
            raise ValueError(f"the switch reads {self.mlp[0].in_features}-d features, got {dim}-d hidden states")
        if task_to_adapter.shape != (len(self.tasks),):
            raise ValueError(f"task_to_adapter needs one id per task ({len(self.tasks)}), got {tuple(task_to_adapter.shape)}")
        head = self.head(hidden.device)
        task_to_adapter = task_to_adapter.to(hidden.device, torch.int32)
        pool = "mean" if self.feature in ("mean", "embeddings") else "last"
        if _switch_backend(backend, hidden) == "torch":
            return route_reference(hidden, embeddings, attention_mask, head, task_to_adapter, pool)
        from switchcit.kernels import fused_switch_route

        return fused_switch_route(
            hidden, embeddings, attention_mask, head.feature_mean, head.feature_scale, head.w1.contiguous(), head.b1,
            head.w2.contiguous(), head.b2, head.gate_feature_mean, head.gate_feature_scale, head.class_means,
            head.gate_components, head.gate_scale, head.max_distance, head.min_probability, task_to_adapter, pool == "last",
        )

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The task of each prompt, or ``None`` (base model) when unsure."""
        if self.encoder is None:
            raise ValueError("this switch has no encoder: pass encoder= to Switch.load")
        features = encode_features(list(prompts), self.encoder, self.tokenizer, (self.feature, self.GATE_FEATURE))
        task = self.classify(features[self.feature], features[self.GATE_FEATURE])
        return [self.tasks[i] if i >= 0 else None for i in task.tolist()]

    # ---------------------------------------------------------------- persistence

    def save(self, folder: str | Path) -> Path:
        """Weights (safetensors) + config and retained prompts (JSON); the encoder is not saved."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"mlp.{k}": v for k, v in self.mlp.state_dict().items()} | {k: getattr(self, k) for k in self._TENSORS}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(folder / SWITCH_WEIGHTS))
        encoder_path = getattr(getattr(self.encoder, "config", None), "_name_or_path", None)
        config = {
            "tasks": self.tasks, "feature": self.feature, "feature_dim": self.mlp[0].in_features,
            "gate_dim": self.class_means.shape[1],
            "hidden": self.mlp[0].out_features, "min_probability": self.min_probability, "gate_scale": self.gate_scale,
            "max_distance": None if math.isinf(self.max_distance) else self.max_distance,
            "gate_margin": None if math.isinf(self.gate_margin) else self.gate_margin,
            "retained": self.retained, "encoder": encoder_path,
        }
        (folder / SWITCH_CONFIG).write_text(json.dumps(config, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder=None, tokenizer=None) -> Switch:
        """Load a saved switch; ``encoder`` defaults to the folder recorded at save time."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / SWITCH_CONFIG).read_text())
        switch = cls(config["tasks"], config["feature_dim"], config["gate_dim"], hidden=config["hidden"], feature=config["feature"])
        state = load_file(str(folder / SWITCH_WEIGHTS))
        switch.mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        for name in cls._TENSORS:
            setattr(switch, name, state[name])
        switch.min_probability, switch.gate_scale = config["min_probability"], config["gate_scale"]
        switch.max_distance, switch.gate_margin = (math.inf if config[k] is None else config[k] for k in ("max_distance", "gate_margin"))
        switch.retained = config["retained"]
        if encoder is not None or config.get("encoder"):
            switch.encoder, switch.tokenizer = load_encoder(encoder or config["encoder"], tokenizer)
        return switch


def _switch_backend(backend: str | None, hidden: torch.Tensor) -> str:
    from switchcit.ops import _HAS_TRITON, select_backend

    name = backend or os.environ.get("SWITCHCIT_BACKEND") or "auto"
    if name == "auto":
        return "triton" if hidden.is_cuda and _HAS_TRITON else "torch"
    if name not in ("torch", "triton"):
        raise ValueError(f"the switch runs on backend 'torch' or 'triton', got {name!r}")
    return select_backend(name, hidden)


def _standardise(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-dimension mean and scale of ``features`` (scale 1 for a single row) and the standardised rows."""
    features = features.float()
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(mean)
    return mean, scale, (features - mean) / scale


def _check_feature(feature: str) -> str:
    if feature in ("last_token", "mean", "embeddings") or (feature.startswith("layer:") and feature[6:].isdigit()):
        return feature
    raise ValueError(f"unknown feature {feature!r}: last_token, mean, embeddings or layer:K")


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


@torch.no_grad()
def encode_features(prompts: Sequence[str], encoder, tokenizer, features: Sequence[str] = ("last_token",),
                    batch_size: int = 32, max_length: int = 512) -> dict[str, torch.Tensor]:
    """Pooled float32 features ``{feature: [len(prompts), D]}`` of the frozen encoder, every feature
    source from one pass. Prompts are batched by length (less padding), results in input order."""
    for feature in features:
        _check_feature(feature)
    device = next(encoder.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    needs_transformer = any(f != "embeddings" for f in features)
    chunks: dict[str, list[torch.Tensor]] = {f: [] for f in features}
    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start : start + batch_size]]
        inputs = tokenizer(batch, return_tensors="pt", padding=True, padding_side="right", truncation=True,
                           max_length=max_length).to(device)
        mask = inputs["attention_mask"]
        hidden = encoder(**inputs, output_hidden_states=True).hidden_states if needs_transformer else None
        for feature in features:
            if feature == "embeddings":
                pooled = pool_features(encoder.get_input_embeddings()(inputs["input_ids"]), mask, "mean")
            else:
                layer = int(feature[6:]) if feature.startswith("layer:") else -1
                pooled = pool_features(hidden[layer], mask, "mean" if feature == "mean" else "last")
            chunks[feature].append(pooled.float().cpu())
    inverse = torch.argsort(torch.tensor(order, dtype=torch.long))
    return {f: torch.cat(c)[inverse] if c else torch.zeros(0, encoder.config.hidden_size) for f, c in chunks.items()}


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: a user turn in its chat template, when it has one."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt


class SwitchModel:
    """Base model + adapter bank + switch: routes every prompt to its task's adapter and generates the
    whole mixed batch together (prompt → switch → routing plan → adapter-bank layers → output).

    ``model`` carries an adapter bank (:func:`switchcit.load_adapters`); the switch's encoder may be
    the base model itself — it then reads features with every token routed to the base.
    """

    def __init__(self, model: nn.Module, tokenizer, switch: Switch | None = None):
        from switchcit.hf import routing_context

        self.model, self.tokenizer, self.switch = model.eval(), tokenizer, switch
        self.context = routing_context(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, base: str | Path, adapters: dict[str, str | Path], switch: str | Path | None = None) -> SwitchModel:
        """Base model folder + PEFT adapter folders ``{"task": path}`` + an optional saved switch
        (whose encoder becomes the base model itself)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from switchcit.hf import load_adapters

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = load_adapters(AutoModelForCausalLM.from_pretrained(base), adapters)
        loaded = Switch.load(switch, encoder=model, tokenizer=tokenizer) if switch is not None else None
        return cls(model, tokenizer, loaded)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> SwitchModel:
        """Everything a finished run left for serving (``RUN_DIR`` or ``RUN_DIR/switchcit``; see
        :mod:`switchcit.runs`)."""
        from switchcit.runs import read_run

        run = read_run(run_dir)
        return cls.from_pretrained(run.base, run.adapters, run.switch)

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The switch's task for each prompt (``None``: base model)."""
        if self.switch is not None and self.switch.encoder not in (None, self.model):
            return [task if task in self._bank_tasks() else None for task in self.switch.route(prompts)]
        inputs = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="right", truncation=True,
                                max_length=512)
        device = next(self.model.parameters()).device
        sequence_ids, _ = self.route_ids(inputs["input_ids"].to(device), inputs["attention_mask"].to(device))
        task_of_adapter = {self.context.id_of(task): task for task in self._bank_tasks()}
        return [task_of_adapter.get(i) for i in sequence_ids.tolist()]

    @torch.no_grad()
    def route_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ids per sequence and per token for tokenised prompts, computed on the device without a
        host sync: the base model's features (every token routed to the base) → the switch (fused
        kernel on CUDA). Tasks without an adapter in the bank route to the base model."""
        if self.switch is None:
            raise ValueError("this SwitchModel has no switch: pass tasks= to generate")
        embeddings = self.model.get_input_embeddings()(input_ids)
        hidden = embeddings
        if self.switch.feature != "embeddings":
            self.context.route(None)
            states = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
            hidden = states[int(self.switch.feature[6:]) if self.switch.feature.startswith("layer:") else -1]
        return self.switch.route_hidden(hidden, embeddings, attention_mask, self._task_to_adapter(input_ids.device))

    def _bank_tasks(self) -> list[str]:
        return [task for task in self.switch.tasks if task in self.context.names]

    def _task_to_adapter(self, device) -> torch.Tensor:
        bank = set(self._bank_tasks())
        ids = [self.context.id_of(task) if task in bank else -1 for task in self.switch.tasks]
        return torch.tensor(ids, dtype=torch.int32, device=device)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], tasks: Sequence[str | None] | None = None, *,
                 max_new_tokens: int = 64, chat: bool = True) -> tuple[list[str], list[str | None]]:
        """Generate (greedy) for all prompts in one mixed batch; returns ``(texts, task per prompt)``.
        Tasks the bank has no adapter for, and ``None``, use the base model."""
        prompts = list(prompts)
        tasks = self.route(prompts) if tasks is None else list(tasks)
        if len(tasks) != len(prompts):
            raise ValueError(f"{len(tasks)} tasks for {len(prompts)} prompts")
        known = {n for n in self.context.names if n is not None}
        texts = [chat_text(self.tokenizer, p) for p in prompts] if chat else prompts
        prompt_ids = self.tokenizer(texts, add_special_tokens=not (chat and self.tokenizer.chat_template))["input_ids"]
        stops = self.stop_token_ids()
        new_tokens = self.generate_ids(prompt_ids, [t if t in known else None for t in tasks],
                                       [max_new_tokens] * len(prompts), stops)
        return [self.tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True) for row in new_tokens], tasks

    @torch.no_grad()
    def generate_ids(self, prompt_ids: Sequence[Sequence[int]], adapters: Sequence[str | None],
                     max_new_tokens: Sequence[int], stop_ids: Sequence[int]) -> list[list[int]]:
        """Greedy-generate every prompt (token ids) with its adapter (``None``: base model) in one mixed
        batch with a KV cache; returns each prompt's new tokens, at most its own ``max_new_tokens``,
        ending at its first stop token if it reached one — what the prompt gets when generated alone."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        # Left padding: every sequence's new tokens start at column `width`.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
        limits = torch.tensor(list(max_new_tokens), device=device)

        class OwnLimit(StoppingCriteria):
            """A sequence is done at its own max_new_tokens: generate stops once all are done."""

            def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
                return input_ids.shape[1] - width >= limits

        self.context.route(list(adapters), device=device)
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=int(limits.max()), do_sample=False,
            pad_token_id=pad, eos_token_id=list(stop_ids), stopping_criteria=StoppingCriteriaList([OwnLimit()]),
        )
        stops = set(stop_ids)
        new_tokens = []
        for row, limit in zip(output[:, width:].tolist(), max_new_tokens):
            row = row[:limit]
            end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
            new_tokens.append(row[:end])
        return new_tokens

    def stop_token_ids(self) -> list[int]:
        """The tokens that end an answer: the generation config's EOS (chat models: end of turn)."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos)
