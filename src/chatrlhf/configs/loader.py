"""Reading a config: YAML files and `--dotted.key value` overrides into the stage's dataclass.

A config file is YAML whose keys mirror the dataclass fields (nested dataclasses are nested mappings);
any field can be overridden on the command line with its dotted name, e.g. `--max_steps 20` or
`--data.train demos.jsonl`. Unknown keys, values of the wrong type and values outside a key's choices are
errors naming the file, line, key and the config they are not part of.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from chatrlhf.configs.choices import Choice
from chatrlhf.errors import UserError


class ConfigError(UserError):
    """A config file or command-line override the user must fix."""


def help_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a one-line help text (shown by `--help`)."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


# --------------------------------------------------------------------------------------------------
# loading and overriding


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """Build a `cls` config from an optional YAML file and `--dotted.key value` overrides."""
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path:
        raw, lines = _read_yaml(Path(path))
    given: dict[str, Any] = {}
    for key, value in _parse_overrides(overrides or []):
        # a key given twice collects its values: `--response A --response B`
        given[key] = (
            [*(given[key] if isinstance(given[key], list) else [given[key]]), value]
            if key in given
            else value
        )
    for key, value in given.items():
        _set_dotted(raw, key, value)
    return from_dict(cls, raw, source=path or "command line", lines=lines)


def from_dict(
    cls: type, raw: dict[str, Any], source: str = "config", lines: dict[str, int] | None = None
) -> Any:
    """Build a (nested) dataclass from a mapping, checking every key and value type."""
    return _build(cls, raw, prefix="", source=source, lines=lines or {}, base=cls())


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    from chatrlhf.runs import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def field_help(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any]]:
    """(dotted name, help, default) of every leaf field, for `--help`; a closed choice's help lists its
    values. A nested section shows the defaults its parent gives it (PPO's `sampling.temperature` is 1)."""
    rows = []
    hints = typing.get_type_hints(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        name, default, help = prefix + f.name, getattr(defaults, f.name), f.metadata.get("help", "")
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(field_help(hints[f.name], name + ".", default))
            continue
        choice = _choice_of(hints[f.name])
        if choice is not None:
            help = f"{help} ({' | '.join(choice.values())})"
            default = [str(d) for d in default] if isinstance(default, list) else default
            default = str(default) if isinstance(default, Choice) else default
        rows.append((name, help, default))
    return rows


def _choice_of(typ: Any) -> type[Choice] | None:
    """The Choice enum a field's type is, holds (list[...]) or may be (... | None)."""
    for t in (typ, *typing.get_args(typ)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: a config file must be a mapping of keys to values")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return data, lines


def _key_lines(node: Any, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            name = prefix + str(key_node.value)
            out[name] = key_node.start_mark.line + 1
            _key_lines(value_node, name + ".", out)


def _parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            i += 1
            text = args[i]
        else:
            text = "true"  # a bare flag switches a boolean on
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int], base: Any = None) -> Any:
    """`cls` from the mapping `raw`; keys not given keep `base`'s values (a section keeps the defaults its
    parent gives it: `--sampling.max_new_tokens 6` leaves `sample`'s temperature 1)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if raw in (None, False) or raw == "off":
        raw = {}  # `lora: off` and friends: the section at its defaults
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{_where(source, lines, prefix.rstrip('.'))}: `{prefix.rstrip('.')}` must be a mapping"
        )
    kwargs = {}
    for key, value in raw.items():
        name = prefix + str(key)
        if key not in fields:
            known = ", ".join(sorted(fields))
            section = f" in `{prefix.rstrip('.')}`" if prefix else ""
            raise ConfigError(
                f"{_where(source, lines, name)}: unknown key `{name}`: this command's config has no such key, "
                f"so it would never read it (known{section}: {known})"
            )
        if dataclasses.is_dataclass(hints[key]):
            section = getattr(base, key) if base is not None else None
            kwargs[key] = _build(hints[key], value, name + ".", source, lines, section)
        else:
            kwargs[key] = _coerce(value, hints[key], name, source, lines)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(value: Any, typ: Any, name: str, source: str, lines: dict[str, int]) -> Any:
    where = _where(source, lines, name)
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, name + ".", source, lines)
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value in (None, "") else _coerce(value, args[0], name, source, lines)
    if origin is list:
        (item,) = typing.get_args(typ)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]  # `--key "[a, b]"` gives a list too
        return [_coerce(v, item, name, source, lines) for v in items]
    if isinstance(typ, type) and issubclass(typ, Choice):
        if (
            isinstance(value, (str, int, float))
            and not isinstance(value, bool)
            and str(value) in typ.values()
        ):
            return typ(str(value))
        raise ConfigError(f"{where}: `{name}` must be one of {' | '.join(typ.values())}, got {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "on", "1"):
            return True
        if str(value).lower() in ("false", "no", "off", "0"):
            return False
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value))  # YAML 1.1 reads `2e-5` as a string
        except ValueError:
            pass
    elif typ is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{where}: `{name}` must be {typ.__name__}, got {value!r}")


def _where(source: str, lines: dict[str, int], name: str) -> str:
    line = lines.get(name)
    return f"{source}:{line}" if line else source
