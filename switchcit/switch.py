"""The switch: instruction → task classifier that picks the adapter (SwitchCIT).

Work in progress (issue 6): the classifier, persistence and ``add_task`` work; the confidence gate
for unknown instructions is not calibrated yet, and the fused GPU kernel is still to come.

A small MLP (features → 200 → tasks, ReLU) over features of a frozen language model, trained on a
tiny retained sample of each task's instructions. New tasks retrain it on what it retained plus the
new task's sample, so old tasks' full data is never needed again. A prompt whose best task is not
confident enough — low softmax probability, or far from every retained prompt of that task — goes to
the base model (``None``) instead of a wrong adapter.

Feature sources (``feature=``):

* ``"last_token"`` (default, the paper's): the encoder's last-layer hidden state at the prompt's last
  token; ``"mean"``: its mean over the prompt's tokens;
* ``"layer:K"``: the same, last token, at hidden layer K (a cheaper, earlier read-out);
* ``"embeddings"``: the mean of the encoder's input embeddings (no transformer pass at all).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["Switch", "SwitchModel", "encode_features", "pool_features", "route_reference"]

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


def route_reference(
    hidden: torch.Tensor, attention_mask: torch.Tensor, feature_mean: torch.Tensor, feature_scale: torch.Tensor,
    mlp: nn.Module, task_to_adapter: torch.Tensor, min_probability: float, pool: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch spec of the fused kernel (``switchcit.kernels.fused_switch_route``):
    ``(adapter id per sequence [B], per token [B, S])``, −1 where the best task's probability is
    below ``min_probability``."""
    features = pool_features(hidden.float(), attention_mask, pool)
    probability, task = torch.softmax(mlp((features - feature_mean) / feature_scale), dim=1).max(1)
    ids = torch.where(probability >= min_probability, task_to_adapter.long()[task], -1).to(torch.int32)
    return ids, ids[:, None].expand(hidden.shape[0], hidden.shape[1])


class Switch:
    """Task classifier over frozen-encoder features; see the module docstring.

    Not an ``nn.Module``: ``Switch.train(...)`` builds a trained switch (the user contract), which
    would clash with ``nn.Module.train(mode)``. The classifier itself is ``self.mlp``.
    """

    def __init__(self, tasks: Sequence[str], feature_dim: int, hidden: int = 200, feature: str = "last_token"):
        self.tasks = list(tasks)
        self.feature = _check_feature(feature)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, len(self.tasks))).eval()
        self.feature_mean = torch.zeros(feature_dim)
        self.feature_scale = torch.ones(feature_dim)
        self.retained_features = torch.zeros(0, feature_dim)  # normalised, for the gate
        self.retained_labels = torch.zeros(0, dtype=torch.int64)
        self.min_probability = 0.5
        self.min_similarity = -1.0
        self.retained: dict[str, list[str]] = {}
        self.encoder = None
        self.tokenizer = None

    _TENSORS = ("feature_mean", "feature_scale", "retained_features", "retained_labels")

    # ---------------------------------------------------------------- training

    @classmethod
    def train(
        cls, prompts: Sequence[str], task_labels: Sequence[str], encoder=None, tokenizer=None, *,
        feature: str = "last_token", hidden: int = 200, epochs: int = 20, lr: float = 1e-3,
        batch_size: int = 32, seed: int = 0,
    ) -> "Switch":
        """Train a switch on the retained prompts (one task label each). ``encoder``: a transformers
        model or a folder to load one from (and its tokenizer)."""
        if len(prompts) != len(task_labels) or not prompts:
            raise ValueError(f"need as many task labels as prompts (got {len(prompts)} and {len(task_labels)}), at least one")
        _check_feature(feature)
        encoder, tokenizer = _load_encoder(encoder, tokenizer)
        tasks = list(dict.fromkeys(task_labels))
        features = _encode(list(prompts), encoder, tokenizer, feature)
        switch = cls(tasks, features.shape[1], hidden=hidden, feature=feature)
        switch.encoder, switch.tokenizer = encoder, tokenizer
        for prompt, task in zip(prompts, task_labels):
            switch.retained.setdefault(task, []).append(prompt)
        switch._fit(features, torch.tensor([tasks.index(t) for t in task_labels]), epochs, lr, batch_size, seed)
        return switch

    def add_task(self, name: str, prompts: Sequence[str], **train_options) -> "Switch":
        """A new task from its retained sample; retrains on everything retained so far. Returns the
        new switch (same encoder), this one unchanged."""
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already known")
        if not prompts:
            raise ValueError(f"task {name!r} has no prompts")
        all_prompts = [p for task in self.tasks for p in self.retained[task]] + list(prompts)
        labels = [task for task in self.tasks for _ in self.retained[task]] + [name] * len(prompts)
        options = {"feature": self.feature, "hidden": self.mlp[0].out_features} | train_options
        return Switch.train(all_prompts, labels, self.encoder, self.tokenizer, **options)

    def _fit(self, features: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int):
        self.feature_mean = features.mean(0)
        self.feature_scale = features.std(0, unbiased=False).clamp(min=1e-6) if len(features) > 1 else torch.ones_like(self.feature_mean)
        inputs = self.normalise(features)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        optimizer = torch.optim.AdamW(self.mlp.parameters(), lr=lr)
        self.mlp.train()
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=gen)
            for start in range(0, len(inputs), batch_size):
                batch = order[start : start + batch_size]
                loss = nn.functional.cross_entropy(self.mlp(inputs[batch]), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.mlp.eval()
        self.retained_features = nn.functional.normalize(inputs, dim=1)
        self.retained_labels = labels.clone()
        self.min_similarity = self._calibrate_similarity()

    def _calibrate_similarity(self) -> float:
        """Similarity floor for the gate: well below how close each retained prompt is to its nearest
        other retained prompt of the same task (leave-one-out), so in-task prompts pass."""
        feats, labels = self.retained_features, self.retained_labels
        similarity = feats @ feats.T
        similarity.fill_diagonal_(-2.0)
        same_task = labels[:, None] == labels[None, :]
        nearest = similarity.masked_fill(~same_task, -2.0).amax(1)
        nearest = nearest[nearest > -2.0]  # tasks with a single retained prompt have no neighbour
        if nearest.numel() == 0:
            return -1.0
        return float(nearest.min()) - 0.5 * float(1 - nearest.min())

    # ---------------------------------------------------------------- routing

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_scale

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Task index per row of raw features ``[B, D]``, −1 where the gate says "unknown"."""
        inputs = self.normalise(features.to(self.feature_mean))
        probability, task = torch.softmax(self.mlp(inputs), dim=1).max(1)
        similarity = self._similarity_to_task(nn.functional.normalize(inputs, dim=1), task)
        confident = (probability >= self.min_probability) & (similarity >= self.min_similarity)
        return torch.where(confident, task, -1)

    def _similarity_to_task(self, normalised: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        similarity = normalised @ self.retained_features.T  # [B, retained]
        same = self.retained_labels[None, :] == task[:, None]
        return similarity.masked_fill(~same, -2.0).amax(1)

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The task of each prompt, or ``None`` (base model) when unsure."""
        if self.encoder is None:
            raise ValueError("this switch has no encoder: pass encoder= to Switch.load")
        task = self.classify(_encode(list(prompts), self.encoder, self.tokenizer, self.feature))
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
            "hidden": self.mlp[0].out_features, "min_probability": self.min_probability,
            "min_similarity": self.min_similarity, "retained": self.retained, "encoder": encoder_path,
        }
        (folder / SWITCH_CONFIG).write_text(json.dumps(config, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder=None, tokenizer=None) -> "Switch":
        """Load a saved switch; ``encoder`` defaults to the folder recorded at save time."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / SWITCH_CONFIG).read_text())
        switch = cls(config["tasks"], config["feature_dim"], hidden=config["hidden"], feature=config["feature"])
        state = load_file(str(folder / SWITCH_WEIGHTS))
        switch.mlp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mlp.")})
        for name in cls._TENSORS:
            setattr(switch, name, state[name])
        switch.min_probability, switch.min_similarity = config["min_probability"], config["min_similarity"]
        switch.retained = config["retained"]
        if encoder is not None or config.get("encoder"):
            switch.encoder, switch.tokenizer = _load_encoder(encoder or config["encoder"], tokenizer)
        return switch


def _check_feature(feature: str) -> str:
    if feature in ("last_token", "mean", "embeddings") or (feature.startswith("layer:") and feature[6:].isdigit()):
        return feature
    raise ValueError(f"unknown feature {feature!r}: last_token, mean, embeddings or layer:K")


def _load_encoder(encoder, tokenizer):
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
        inputs = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
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


def _encode(prompts: list[str], encoder, tokenizer, feature: str) -> torch.Tensor:
    return encode_features(prompts, encoder, tokenizer, (feature,))[feature]


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
    def from_pretrained(cls, base: str | Path, adapters: dict[str, str | Path], switch: str | Path | None = None) -> "SwitchModel":
        """Base model folder + PEFT adapter folders ``{"task": path}`` + an optional saved switch
        (whose encoder becomes the base model itself)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from switchcit.hf import load_adapters

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = load_adapters(AutoModelForCausalLM.from_pretrained(base), adapters)
        loaded = Switch.load(switch, encoder=model, tokenizer=tokenizer) if switch is not None else None
        return cls(model, tokenizer, loaded)

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "SwitchModel":
        """Everything a finished run left for serving (``RUN_DIR`` or ``RUN_DIR/switchcit``; see
        :mod:`switchcit.runs`)."""
        from switchcit.runs import read_run

        run = read_run(run_dir)
        return cls.from_pretrained(run.base, run.adapters, run.switch)

    def route(self, prompts: Sequence[str]) -> list[str | None]:
        """The switch's task for each prompt (``None``: base model)."""
        if self.switch is None:
            raise ValueError("this SwitchModel has no switch: pass tasks= to generate")
        self.context.route(None)  # features come from the base model, whatever the encoder is
        return self.switch.route(prompts)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], tasks: Sequence[str | None] | None = None, *,
                 max_new_tokens: int = 64, chat: bool = True, **generate_kwargs) -> tuple[list[str], list[str | None]]:
        """Generate for all prompts in one mixed batch; returns ``(texts, task per prompt)``. Tasks the
        bank has no adapter for, and ``None``, use the base model."""
        prompts = list(prompts)
        tasks = self.route(prompts) if tasks is None else list(tasks)
        if len(tasks) != len(prompts):
            raise ValueError(f"{len(tasks)} tasks for {len(prompts)} prompts")
        known = set(n for n in self.context.names if n is not None)
        self.context.route([t if t in known else None for t in tasks], device=next(self.model.parameters()).device)
        texts = [self._chat(p) for p in prompts] if chat and self.tokenizer.chat_template else prompts
        self.tokenizer.padding_side = "left"  # new tokens follow every prompt directly
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True).to(next(self.model.parameters()).device)
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True), tasks

    def _chat(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
