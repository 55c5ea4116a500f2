"""How a prompt looks to the model: one place for the chat template and tokenisation, shared by
training, the switch, the pipeline and the server.

A prompt's tokens come with the span of its own content (the user's words, without the chat
template around them): the switch pools its features over that span only, so the template's fixed
tokens do not dilute them.
"""
from __future__ import annotations

import torch

__all__ = ["chat_messages_text", "chat_text", "content_mask", "is_text", "pad", "prompt_tokens", "split_tokens",
           "template_head"]

Span = tuple[int, int]


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: a user turn in its chat template, when it has one."""
    return chat_messages_text(tokenizer, [{"role": "user", "content": prompt}]) if tokenizer.chat_template else prompt


def chat_messages_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """A conversation in the tokenizer's chat template, ready for the assistant's turn."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def is_text(value: str) -> bool:
    """Whether ``value`` is valid Unicode: JSON's escapes can spell lone surrogates, which tokenizers refuse."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def prompt_tokens(tokenizer, prompt: str, chat: bool = True) -> tuple[list[int], Span]:
    """The token ids the model reads for ``prompt`` (in its chat template, which brings its own special
    tokens) and the span of the prompt's own tokens."""
    if chat and tokenizer.chat_template:
        return split_tokens(tokenizer, chat_text(tokenizer, prompt), prompt)
    ids = tokenizer(prompt)["input_ids"]
    return ids, (0, len(ids))


def template_head(tokenizer) -> list[int]:
    """The tokens every one-turn chat prompt starts with: the chat template before the user's words
    (e.g. a default system prompt); ``[]`` without a chat template."""
    if not tokenizer.chat_template:
        return []
    ids, (start, _) = prompt_tokens(tokenizer, "x")
    return ids[:start]


def split_tokens(tokenizer, text: str, content: str) -> tuple[list[int], Span]:
    """``text`` tokenised as (before ``content``, ``content``, after it) — its last occurrence — and
    the span of ``content``'s tokens; the whole text when ``content`` is not in it."""
    at = text.rfind(content.strip()) if content.strip() else -1
    if at < 0:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids, (0, len(ids))
    end = at + len(content.strip())
    parts = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (text[:at], text[at:end], text[end:])]
    return parts[0] + parts[1] + parts[2], (len(parts[0]), len(parts[0]) + len(parts[1]))


def pad(rows, pad_id: int, side: str = "left", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max len]`` from token id lists."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids.to(device), mask.to(device)


def content_mask(lengths, spans, width: int, side: str = "left", device=None) -> torch.Tensor:
    """``[B, width]`` mask of each padded row's content span (what the switch pools over)."""
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for i, (length, (start, end)) in enumerate(zip(lengths, spans)):
        offset = width - length if side == "left" else 0
        mask[i, offset + start : offset + max(end, start + 1)] = 1
    return mask.to(device)
