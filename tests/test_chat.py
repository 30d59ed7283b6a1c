"""The conversation renderer: assistant masks token by token, pad distinct from EOS."""

from __future__ import annotations

import copy

import pytest

from chatrlhf.chat_template import ensure_pad_token, prompt_ids, render

CHAT = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, on the Tiber."},
    {"role": "user", "content": "Thanks! One more: Spain?"},
    {"role": "assistant", "content": "Madrid."},
]

# A second template with different markup (Zephyr style: role headers, `</s>`-like end token set below).
ZEPHYR = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _runs(mask):
    """Contiguous runs of 1s as (start, end) index pairs."""
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        if not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _tokenizers(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = ZEPHYR
    return {"smollm2": tokenizer, "zephyr-style": other}


@pytest.mark.parametrize("name", ["smollm2", "zephyr-style"])
def test_assistant_mask_covers_exactly_the_assistant_turns(tokenizer, name):
    tok = _tokenizers(tokenizer)[name]
    rendered = render(tok, CHAT)
    assert rendered.input_ids == tok.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    runs = _runs(rendered.assistant_mask)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for (start, end), content in zip(runs, answers):
        # each span is the answer plus its end-of-turn token, nothing of the template around it
        assert tok.decode(rendered.input_ids[start:end]) == content + tok.eos_token
        assert tok.decode(rendered.input_ids[start - 1 : start]).endswith("\n")
    unmasked = tok.decode([t for t, m in zip(rendered.input_ids, rendered.assistant_mask) if not m])
    for message in CHAT:
        assert (message["content"] in unmasked) == (message["role"] != "assistant")


def test_generation_prompt_and_system_prompt(tokenizer):
    ids = prompt_ids(tokenizer, CHAT[:2])
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with_default = tokenizer.decode(prompt_ids(tokenizer, CHAT[1:2]))
    assert "You are a helpful AI assistant named SmolLM" in with_default  # the template's own default
    configured = tokenizer.decode(prompt_ids(tokenizer, CHAT[1:2], system_prompt="Be terse."))
    assert "Be terse." in configured and "SmolLM" not in configured
    assert not any(render(tokenizer, CHAT[:2], add_generation_prompt=True).assistant_mask)


def test_pad_is_distinct_from_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_token_added_when_only_eos_exists(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    tok.unk_token = tok.eos_token
    before = len(tok)
    assert ensure_pad_token(tok) == 1
    assert len(tok) == before + 1 and tok.pad_token_id not in (tok.eos_token_id, None)
