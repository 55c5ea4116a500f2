"""Small runs for tests and benchmarks (as flash-linear-attention keeps ``utils/_testing.py``): a
SwitchCIT run (by default a tiny random Llama with the SmolLM2 tokenizer; random LoRA adapters; a switch
trained on a few prompts per task) and a uvicorn server on loopback in a background thread."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

TASK_TEMPLATES = {
    "haiku": ["Write a haiku about {}.", "Compose a short haiku on {}.", "A haiku, please, about {}."],
    "simplify": ["Simplify: the {} was ameliorated notwithstanding.", "Rewrite in plain words: {} is abstruse.",
                 "Make this easier: the {} necessitates remediation."],
    "factcheck": ["True or false: {} cures the flu?", "Fact check, yes or no: {} was approved?",
                  "Is it true that {} prevents colds?"],
}
TASKS = list(TASK_TEMPLATES)
TOPICS = ["rain", "autumn", "the sea", "a garden", "coffee", "winter", "mountains", "a vaccine", "the moon", "bread"]


def task_prompts(task: str, topics: list[str]) -> list[str]:
    return [template.format(topic) for topic in topics for template in TASK_TEMPLATES[task]]


TRAINED_TOPICS = TOPICS[:6]  # the switch is trained on these; the others are held out


def tiny_llama_base(folder: Path) -> Path:
    """A random 2-layer Llama (hidden 64) with SmolLM2-Instruct's tokenizer, chat template and special
    token ids, saved to ``folder``."""
    import transformers

    from switchcit.pretrained import smollm2_135m_instruct

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,  # SmolLM2-Instruct's: <|im_start|>, <|im_end|>
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_run(root: Path, base_folder: Path | None = None, rank: int = 4) -> Path:
    """A run folder (``root/run``) over ``base_folder`` (default: :func:`tiny_llama_base`) with one
    random LoRA adapter per task (B nonzero, so each changes the outputs) and a switch trained on the
    tasks' prompts over ``TRAINED_TOPICS``, with the base model as encoder."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from switchcit.runs import write_run_manifest
    from switchcit.switch import Switch

    base_folder = base_folder or tiny_llama_base(root / "base")
    run = root / "run" / "switchcit"
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    torch.manual_seed(0)  # the same adapters in every build
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    peft_model = get_peft_model(base, lora, adapter_name=TASKS[0])
    for task in TASKS[1:]:
        peft_model.add_adapter(task, lora)
    peft_model.save_pretrained(run / "adapters")  # one subfolder per adapter

    encoder = transformers.AutoModelForCausalLM.from_pretrained(base_folder)
    prompts = [p for task in TASKS for p in task_prompts(task, TRAINED_TOPICS)]
    labels = [task for task in TASKS for _ in task_prompts(task, TRAINED_TOPICS)]
    switch = Switch.train(prompts, labels, encoder=encoder, layer=0)  # the adapters cover every layer
    switch.save(run / "switch")
    write_run_manifest(run, base_folder, {task: run / "adapters" / task for task in TASKS}, run / "switch",
                       switch.layer)
    return root / "run"


@contextlib.contextmanager
def serving(app, draining: bool = True) -> Iterator[tuple[str, object]]:
    """Run ``app`` on 127.0.0.1 (a free port) in a background thread; yields ``(base_url, server)``
    and shuts the server down on exit. ``draining``: switchcit's server (the app has a batcher),
    else plain uvicorn."""
    import uvicorn

    from switchcit.serving.app import make_server

    options = {"host": "127.0.0.1", "port": 0, "log_level": "warning"}
    server = make_server(app, **options) if draining else uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
