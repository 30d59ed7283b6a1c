"""Reading and validating user data files, whatever they hold: the records, where each came from, and what
happens to an invalid one.

Files are JSON Lines, JSON (a list of records), Parquet, plain text, or a `datasets` hub name where a
network exists. Every record is checked before any training starts; a bad one raises `DataError` naming
the file, line and field, so a run never stops halfway through because of its data. Under
`data.on_invalid: skip` (`InvalidRecords`) bad records are left out and counted instead. What the records
mean is read on top of this: demonstrations, text and prompts in `data.py`, preferences in `preferences.py`,
OpenAssistant trees in `oasst.py`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from chatrlhf.chat_template import ROLES
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


def parse_file(
    source: str,
    fmt: str,
    invalid: InvalidRecords | None,
    parse: Callable[[Record], T],
    parse_trees: Callable[[str, list[Record], InvalidRecords], list[T]],
) -> list[T]:
    """Every record of `source` through `parse`; OpenAssistant trees (`fmt` oasst, or auto and the first
    record has a `message_tree_id`) through `parse_trees` instead. No record left stops with an error."""
    invalid = invalid or InvalidRecords()
    records = read_records(source, invalid)
    if fmt == "oasst" or (fmt == "auto" and records and "message_tree_id" in records[0].data):
        return parse_trees(source, records, invalid)
    parsed = invalid.keep(source, records, parse)
    if not parsed:
        raise DataError(f"{source}: no records")
    return parsed


# --------------------------------------------------------------------------------------------------
# fields


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


def text_field(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field `{key}` is missing, empty or not text")
    return value
