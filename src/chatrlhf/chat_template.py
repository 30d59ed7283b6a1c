"""The one conversation renderer: messages -> token ids + assistant-token mask, via the chat template.

SFT, the reward model, PPO, sampling and serving all call `render`, so the format a model is trained on
is the format it is served with. The assistant mask is found by rendering growing prefixes of the
conversation: the text the template adds for assistant turn i (after the generation prompt of turn i,
up to and including its end-of-turn token) is that turn's span, whatever the template's markup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatrlhf.errors import UserError

ROLES = ("system", "user", "assistant")
PAD_TOKEN = "<|pad|>"


@dataclass
class Rendered:
    input_ids: list[int]  # (T,)
    assistant_mask: list[int]  # (T,) 1 on assistant tokens, each turn's end-of-turn token included


def with_system_prompt(messages: Sequence[dict], system_prompt: str) -> list[dict]:
    """Prepend a system turn when one is configured and the conversation has none."""
    messages = [dict(m) for m in messages]
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render(
    tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False, system_prompt: str = ""
) -> Rendered:
    """Render a conversation into ids and a mask that is 1 exactly on the assistant turns' tokens.

    With `add_generation_prompt`, the ids end with the template's opening of a new assistant turn
    (the prompt a model answers); the mask then covers only earlier assistant turns.
    """
    messages = with_system_prompt(messages, system_prompt)
    text = _template(tokenizer, messages, add_generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_template(tokenizer, messages[:i], True)) if i else 0
        upto = _template(tokenizer, messages[: i + 1], False)
        if not text.startswith(upto):
            raise UserError(
                "the tokenizer's chat template renders earlier turns differently once later turns follow, "
                "so assistant tokens cannot be located; use a template that keeps the history verbatim"
            )
        spans.append((start, _end_of_turn(tokenizer, text, start, len(upto))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= tok_start < e for s, e in spans)) for tok_start, _ in enc["offset_mapping"]]
    return Rendered(list(enc["input_ids"]), mask)


def prompt_ids(tokenizer, messages: Sequence[dict], system_prompt: str = "") -> list[int]:
    """Ids of a conversation ending in a user turn, followed by the assistant generation prompt."""
    return render(tokenizer, messages, add_generation_prompt=True, system_prompt=system_prompt).input_ids


def ensure_pad_token(tokenizer) -> int:
    """Give the tokenizer a pad token distinct from EOS; returns how many tokens were added to the vocab.

    A pad equal to EOS makes "not pad" masks hide EOS, so a model trained that way never learns to stop.
    An existing unused special token (unk) is reused when there is one, else `<|pad|>` is added.
    """
    eos, bos, pad = tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return 0
    unk = tokenizer.unk_token_id
    if unk is not None and unk not in (eos, bos):
        tokenizer.pad_token = tokenizer.unk_token
        return 0
    return tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def _template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _end_of_turn(tokenizer, text: str, start: int, end: int) -> int:
    """End of an assistant span: just after its end-of-turn token, so the newline the template adds
    between turns (never generated) is not trained on."""
    eos = tokenizer.eos_token
    if eos:
        at = text.find(eos, start, end)
        if at >= 0:
            return at + len(eos)
    return start + len(text[start:end].rstrip())


def sequence_ids(tokenizer, prompt: list[dict], response: str, system_prompt: str = "") -> list[int]:
    """Prompt + answer rendered by the shared renderer, cut after the answer's end-of-turn token."""
    return answer_ids(tokenizer, prompt, response, system_prompt)[0]


def answer_ids(
    tokenizer, prompt: list[dict], response: str, system_prompt: str = ""
) -> tuple[list[int], int]:
    """`sequence_ids` and the index of the answer's first token in it (what a model is scored on)."""
    rendered = render(
        tokenizer, prompt + [{"role": "assistant", "content": response}], system_prompt=system_prompt
    )
    mask = rendered.assistant_mask
    last = max(i for i, m in enumerate(mask) if m)
    start = last
    while start > 0 and mask[start - 1]:  # earlier assistant turns of the prompt are marked too
        start -= 1
    return rendered.input_ids[: last + 1], start
