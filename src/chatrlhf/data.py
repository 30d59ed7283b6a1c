"""Demonstrations, raw text and prompts: the records of `records.py` read as what they hold, and tokenized.

Every record is checked before any training starts; a bad one raises `DataError` naming the file, line and
field (or, under `data.on_invalid: skip`, is left out and counted).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from chatrlhf.chat_template import render
from chatrlhf.oasst import tree_demonstrations
from chatrlhf.records import (
    Conversation,
    DataError,
    InvalidRecords,
    Record,
    check_messages,
    parse_file,
    read_records,
    text_field,
)


@dataclass
class Sample:
    """One tokenized training row: ids, which tokens carry loss, and position ids (reset per packed sample)."""

    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 where the token is a target
    position_ids: list[int]  # (T,)


# --------------------------------------------------------------------------------------------------
# record formats


def demonstration(record: Record) -> Conversation:
    """A demonstration record as a conversation: `{"messages"}` or `{"prompt", "completion"}`."""
    data, where = record.data, record.where
    if "messages" in data:
        return Conversation(where, check_messages(data["messages"], where))
    if "prompt" in data and "completion" in data:
        prompt = data["prompt"]
        if isinstance(prompt, list):
            messages = check_messages(prompt, where, "prompt", last_role="user")
        else:
            messages = [{"role": "user", "content": text_field(data, "prompt", where)}]
        completion = data["completion"]
        if isinstance(completion, list):
            messages += check_messages(completion, where, "completion", last_role=None)
        else:
            messages.append({"role": "assistant", "content": text_field(data, "completion", where)})
        return Conversation(where, check_messages(messages, where))
    raise DataError(f"{where}: expected field `messages`, or fields `prompt` and `completion`")


def load_demonstrations(
    source: str, fmt: str = "auto", invalid: InvalidRecords | None = None
) -> list[Conversation]:
    """Demonstrations from a file: chats, prompt/completion pairs, or OpenAssistant trees."""
    if fmt not in ("auto", "messages", "prompt_completion", "oasst"):
        raise DataError(
            f"data.format: {fmt!r} is not a demonstrations format (messages, prompt_completion, oasst)"
        )
    return parse_file(source, fmt, invalid, demonstration, tree_demonstrations)


def _text_record(record: Record) -> Record:
    text_field(record.data, "text", record.where)
    return record


def load_texts(source: str, invalid: InvalidRecords | None = None) -> list[Record]:
    """Raw text records `{"text": str}` (or a .txt file) for causal-LM training."""
    invalid = invalid or InvalidRecords()
    records = invalid.keep(source, read_records(source, invalid), _text_record)
    if not records:
        raise DataError(f"{source}: no records")
    return records


# --------------------------------------------------------------------------------------------------
# tokenization


def tokenize_conversations(
    conversations: Sequence[Conversation],
    tokenizer,
    max_length: int,
    truncation: bool,
    system_prompt: str = "",
) -> list[Sample]:
    """Render each conversation; the loss mask is the assistant mask. Too long: error or cut."""
    samples, dropped = [], []
    for conv in conversations:
        rendered = render(tokenizer, conv.messages, system_prompt=system_prompt)
        ids, mask = rendered.input_ids, rendered.assistant_mask
        if len(ids) > max_length:
            if not truncation:
                raise DataError(
                    f"{conv.where}: field `messages`: {len(ids)} tokens, more than data.max_length={max_length} "
                    f"(raise data.max_length or set data.truncation: true)"
                )
            ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask):
            dropped.append(conv.where)  # truncation cut every assistant token: nothing to learn here
            continue
        samples.append(Sample(ids, mask, list(range(len(ids)))))
    if dropped:
        print(
            f"warning: {len(dropped)} sample(s) dropped, no assistant token within data.max_length "
            f"(first: {dropped[0]})",
            file=sys.stderr,
        )
    if not samples:
        raise DataError(
            f"{conversations[0].where}: no sample keeps an assistant token within data.max_length"
        )
    return samples


def tokenize_texts(records: Sequence[Record], tokenizer) -> list[list[int]]:
    """Token ids of each text, closed by EOS so packed documents stay apart."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [tokenizer(r.data["text"], add_special_tokens=False)["input_ids"] + eos for r in records]


def pack(samples: Sequence[Sample], max_length: int) -> list[Sample]:
    """Greedily pack whole samples into rows of at most max_length tokens, in order.

    Position ids restart at each sample; with no attention mask, transformers then attends only
    within each sample (a block-diagonal causal mask), so packing changes no sample's loss.
    """
    rows: list[Sample] = []
    current = Sample([], [], [])
    for s in samples:
        if current.input_ids and len(current.input_ids) + len(s.input_ids) > max_length:
            rows.append(current)
            current = Sample([], [], [])
        current.input_ids += s.input_ids
        current.loss_mask += s.loss_mask
        current.position_ids += s.position_ids
    if current.input_ids:
        rows.append(current)
    return rows


def chunk_stream(documents: Sequence[list[int]], max_length: int) -> list[Sample]:
    """Concatenate token streams and cut them into rows of max_length (pretraining packing).

    Every token is a target; position ids restart at each document so documents do not attend to
    each other.
    """
    ids: list[int] = []
    positions: list[int] = []
    for doc in documents:
        ids += doc
        positions += range(len(doc))
    return [
        Sample(ids[i : i + max_length], [1] * len(ids[i : i + max_length]), positions[i : i + max_length])
        for i in range(0, len(ids), max_length)
    ]


def prompt_record(record: Record) -> Conversation:
    """A prompt record as a conversation ending in a user turn; its other fields travel as `extra`."""
    data, where = record.data, record.where
    if "messages" in data:
        messages = check_messages(data["messages"], where, last_role="user")
    elif isinstance(data.get("prompt"), list):
        messages = check_messages(data["prompt"], where, "prompt", last_role="user")
    elif "prompt" in data:
        messages = [{"role": "user", "content": text_field(data, "prompt", where)}]
    else:
        raise DataError(f"{where}: expected field `prompt` (text or messages) or `messages`")
    extra = {k: v for k, v in data.items() if k not in ("prompt", "messages")}
    if "instruction_id_list" in data:  # IFEval-format: the judges check them with lm-eval's checkers
        from chatrlhf.ifeval.checkers import read_instructions

        ids, kwargs = read_instructions(where, messages[-1]["content"], data)
        extra["instruction_id_list"], extra["kwargs"] = ids, kwargs
    return Conversation(where, messages, extra)


def load_prompts(source: str, invalid: InvalidRecords | None = None) -> list[Conversation]:
    """Prompts for sampling and PPO: `{"prompt": str | messages}` or `{"messages": [...]}` ending in a user turn."""
    invalid = invalid or InvalidRecords()
    conversations = invalid.keep(source, read_records(source, invalid), prompt_record)
    if not conversations:
        raise DataError(f"{source}: no prompts")
    return conversations
