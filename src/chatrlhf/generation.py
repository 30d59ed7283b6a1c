"""Text generation shared by sampling, evaluation, chat and serving: left-padded batches, KV cache, stop at EOS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chatrlhf.chat import prompt_ids


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: Sequence[list[int]], sampling: SamplingConfig) -> list[list[int]]:
    """Continue each prompt (token ids) until EOS or max_new_tokens; returns the new ids, EOS excluded."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = {"do_sample": sampling.temperature > 0, "max_new_tokens": sampling.max_new_tokens}
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    out = model.generate(
        input_ids=ids,
        attention_mask=attention,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    answers = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append([t for t in row if t != pad])
    return answers


def answer(
    model, tokenizer, conversations: Sequence[list[dict]], sampling: SamplingConfig, system_prompt: str = ""
) -> list[str]:
    """The assistant's reply to each conversation (ending in a user turn), as text."""
    prompts = [prompt_ids(tokenizer, c, system_prompt) for c in conversations]
    return [
        tokenizer.decode(a, skip_special_tokens=True)
        for a in generate_ids(model, tokenizer, prompts, sampling)
    ]
