"""Reading and validating user data: demonstrations, raw text, and the files they come in.

Files are JSON Lines, JSON (a list of records), Parquet, plain text, or a `datasets` hub name where a
network exists. Every record is checked before any training starts; a bad one raises `DataError` naming
the file, line and field, so a run never stops halfway through because of its data. Under
`data.on_invalid: skip` (`InvalidRecords`) bad records are left out and counted instead.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatrlhf.chat import ROLES, render
from chatrlhf.errors import UserError


class DataError(UserError):
    """A data file or record the user must fix; the message starts with `file:line:`."""


T = TypeVar("T")
ON_INVALID = ("stop", "skip")
SHOWN_REASONS = 3  # printed per file; run.json keeps up to KEPT_REASONS
KEPT_REASONS = 100


@dataclass
class InvalidRecords:
    """`data.on_invalid`: a record that fails validation stops the run (`stop`) or is left out (`skip`).

    Every loader checks its records through `keep`, so one policy covers every format. Under `skip` the
    records left out are counted, the first few reasons printed per file, and `summary()` goes to run.json.
    """

    policy: str = "stop"
    reasons: list[str] = field(default_factory=list)  # "file:line: field ..." of each record left out
    _reported: int = field(default=0, init=False, repr=False)  # reasons printed by an earlier `keep`

    def __post_init__(self):
        if self.policy not in ON_INVALID:
            raise UserError(f"data.on_invalid: {self.policy!r} is not one of {', '.join(ON_INVALID)}")

    def reject(self, error: DataError) -> None:
        """A record failed: stop with its error, or leave it out and remember why."""
        if self.policy == "stop":
            raise error
        self.reasons.append(str(error))

    def keep(self, source: str, records: Sequence[Record], parse: Callable[[Record], T]) -> list[T]:
        """`parse(record)` of every record of `source` that passes it. Under `skip`, one that raises
        `DataError` is left out; a file with nothing left but invalid records still stops."""
        kept = []
        for record in records:
            try:
                kept.append(parse(record))
            except DataError as e:
                self.reject(e)
        # this file's, lines `read_records` refused included, in file order
        left_out = sorted(self.reasons[self._reported :], key=lambda reason: _line_number(reason, source))
        self.reasons[self._reported :] = left_out
        self._reported = len(self.reasons)
        if left_out and not kept:
            raise DataError(
                f"{source}: all {len(left_out)} records are invalid, nothing is left to use "
                f"(data.on_invalid: skip); the first: {left_out[0]}"
            )
        if left_out:
            shown = "".join(f"\n  {reason}" for reason in left_out[:SHOWN_REASONS])
            more = (
                f"\n  ... and {len(left_out) - SHOWN_REASONS} more" if len(left_out) > SHOWN_REASONS else ""
            )
            print(
                f"warning: {source}: {len(left_out)} invalid record(s) left out (data.on_invalid: skip):"
                f"{shown}{more}",
                file=sys.stderr,
            )
        return kept

    def summary(self) -> dict[str, Any]:
        """For run.json: the policy, how many records were left out and (the first KEPT_REASONS) why."""
        return {
            "on_invalid": self.policy,
            "left_out": len(self.reasons),
            "reasons": self.reasons[:KEPT_REASONS],
        }


def _line_number(reason: str, source: str) -> int:
    """The line (or row) a "file:line: ..." reason names, for sorting."""
    place = reason[len(source) + 1 :].removeprefix("row ")
    digits = place[: len(place) - len(place.lstrip("0123456789"))]
    return int(digits) if digits else 0


@dataclass
class Record:
    where: str  # "file:line" (or "file:row N"), for messages
    data: dict[str, Any]


@dataclass
class Conversation:
    where: str
    messages: list[dict[str, str]]
    extra: dict[str, Any] = field(
        default_factory=dict
    )  # the record's other fields (a judge's `reference`, ...)


@dataclass
class Sample:
    """One tokenized training row: ids, which tokens carry loss, and position ids (reset per packed sample)."""

    input_ids: list[int]  # (T,)
    loss_mask: list[int]  # (T,) 1 where the token is a target
    position_ids: list[int]  # (T,)


# --------------------------------------------------------------------------------------------------
# files


def read_records(source: str, invalid: InvalidRecords | None = None) -> list[Record]:
    """All records of a data file (or hub dataset), each with where it came from. A broken JSON Lines line
    goes to `invalid` (which stops, or leaves it out); a broken file of another kind always stops."""
    path = Path(source).expanduser()
    if not path.exists():
        return _read_hub(source)
    if path.is_dir():
        raise DataError(f"{source}: is a folder, expected a .jsonl, .json, .parquet or .txt file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Record(f"{source}:1", {"text": _read_text(path)})]
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".json":
        return _read_json(path)
    return list(_read_jsonl(path, invalid or InvalidRecords()))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        data = path.read_bytes()
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def _read_jsonl(path: Path, invalid: InvalidRecords) -> Iterator[Record]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                record = _jsonl_record(raw, f"{path}:{number}")
            except DataError as e:
                invalid.reject(e)
                continue
            if record is not None:
                yield record


def _jsonl_record(raw: bytes, where: str) -> Record | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start} of the line)") from None
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: broken JSON: {e.msg} (column {e.colno})") from None
    return Record(where, _as_object(data, where))


def _read_json(path: Path) -> list[Record]:
    text = _read_text(path)
    decoder = json.JSONDecoder()
    try:
        data = decoder.decode(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: broken JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):
        return [Record(f"{path}:1", data)]
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a list of records")
    # walk the array once more to learn on which line each record starts
    records, index = [], text.index("[") + 1
    for item in data:
        while text[index] in " \t\r\n,":
            index += 1
        _, end = decoder.raw_decode(text, index)
        where = f"{path}:{text.count(chr(10), 0, index) + 1}"
        records.append(Record(where, _as_object(item, where)))
        index = end
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    return [Record(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]


def _read_hub(name: str) -> list[Record]:
    if name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".json", ".parquet", ".txt")):
        raise DataError(f"{name}: file not found")
    try:
        import datasets

        rows = datasets.load_dataset(name, split="train")
    except Exception as e:  # no network, unknown dataset: both are the user's to fix
        raise DataError(f"{name}: not a file, and loading it as a hub dataset failed: {e}") from None
    return [Record(f"{name}:row {i + 1}", dict(row)) for i, row in enumerate(rows)]


def _as_object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------------------
# record formats


def check_messages(
    messages: Any, where: str, field: str = "messages", last_role: str | None = "assistant"
) -> list[dict]:
    """Validate a chat: known roles, non-empty text, system only first, a user turn before any answer."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field `{field}` must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        at = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: field `{at}` must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field `{at}.role` is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: field `{at}.content` is empty or not text")
        if role == "system" and i > 0:
            raise DataError(f"{where}: field `{at}.role`: a system message may only come first")
        if role == "assistant" and not any(m["role"] == "user" for m in out):
            raise DataError(f"{where}: field `{at}.role`: an assistant turn needs a user turn before it")
        out.append({"role": role, "content": content})
    if last_role and out[-1]["role"] != last_role:
        raise DataError(
            f"{where}: field `{field}[{len(out) - 1}].role`: the conversation must end in a {last_role} turn"
        )
    return out


def _text_field(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field `{key}` is missing, empty or not text")
    return value


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
            messages = [{"role": "user", "content": _text_field(data, "prompt", where)}]
        completion = data["completion"]
        if isinstance(completion, list):
            messages += check_messages(completion, where, "completion", last_role=None)
        else:
            messages.append({"role": "assistant", "content": _text_field(data, "completion", where)})
        return Conversation(where, check_messages(messages, where))
    raise DataError(f"{where}: expected field `messages`, or fields `prompt` and `completion`")


def load_demonstrations(
    source: str, fmt: str = "auto", invalid: InvalidRecords | None = None
) -> list[Conversation]:
    """Demonstrations from a file: chats, prompt/completion pairs, or OpenAssistant trees."""
    invalid = invalid or InvalidRecords()
    if fmt not in ("auto", "messages", "prompt_completion", "oasst"):
        raise DataError(
            f"data.format: {fmt!r} is not a demonstrations format (messages, prompt_completion, oasst)"
        )
    records = read_records(source, invalid)
    if fmt == "oasst" or (fmt == "auto" and records and "message_tree_id" in records[0].data):
        from chatrlhf.oasst import tree_demonstrations

        return tree_demonstrations(source, records, invalid)
    conversations = invalid.keep(source, records, demonstration)
    if not conversations:
        raise DataError(f"{source}: no records")
    return conversations


def _text_record(record: Record) -> Record:
    _text_field(record.data, "text", record.where)
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
        messages = [{"role": "user", "content": _text_field(data, "prompt", where)}]
    else:
        raise DataError(f"{where}: expected field `prompt` (text or messages) or `messages`")
    extra = {k: v for k, v in data.items() if k not in ("prompt", "messages")}
    return Conversation(where, messages, extra)


def load_prompts(source: str, invalid: InvalidRecords | None = None) -> list[Conversation]:
    """Prompts for sampling and PPO: `{"prompt": str | messages}` or `{"messages": [...]}` ending in a user turn."""
    invalid = invalid or InvalidRecords()
    conversations = invalid.keep(source, read_records(source, invalid), prompt_record)
    if not conversations:
        raise DataError(f"{source}: no prompts")
    return conversations
