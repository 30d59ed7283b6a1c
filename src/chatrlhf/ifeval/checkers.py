"""lm-eval's IFEval checkers, loaded without the rest of lm-eval, and the records they read.

IFEval (Zhou et al. 2023) gives each prompt a list of verifiable instructions (`instruction_id_list`) and their
arguments (`kwargs`). The scoring here is lm-eval's own: its `test_instruction_following_strict` and `_loose`
functions from `lm_eval/tasks/ifeval/utils.py` run on every answer. Importing `lm_eval.tasks` pulls in its task
manager and `datasets`, so the four files the checkers need are loaded by path under their own module names.

Two checkers (sentence counting, and capital-word counting through nltk's word tokenizer) need nltk's `punkt_tab`
data, which nltk downloads at import and this machine cannot fetch. Where it comes from, in this order: an nltk
data folder that already has it; the copy of nltk's punkt_tab that the `llama-index-core` wheel ships (`make
venv` installs that wheel without its dependencies, for the data alone); else an untrained Punkt (its rules
without English abbreviations), which `punkt_source()` names and the benchmark's output reports with the number
of prompts it touches. Language detection (langdetect) is seeded, so a score repeats.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from chatrlhf.errors import UserError
from chatrlhf.records import DataError, InvalidRecords, Record, read_records

# the instructions whose checkers read punkt_tab
PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
_PACKAGE = "lm_eval.tasks.ifeval"
_TRIAL_ANSWER = "A short answer.\n\nIt has two paragraphs."
_punkt: list[str] = []  # the source found, once per process


@dataclass
class IFEvalItem:
    """One IFEval-format record: a prompt and the instructions its answer is checked against."""

    where: str  # "file:line", for messages
    key: str
    prompt: str
    instruction_ids: list[str]
    kwargs: list[dict]  # one per instruction, falsy values left out as lm-eval leaves them
    extra: dict = field(default_factory=dict)  # the record's other fields


@dataclass
class Verdict:
    """Which instructions an answer follows, read strictly and loosely (lm-eval's two readings)."""

    strict: list[bool]
    loose: list[bool]


def punkt_source() -> str:
    """Where nltk's punkt_tab came from ("nltk data", "llama-index-core", or "untrained Punkt")."""
    _ensure_punkt()
    return _punkt[0]


def _ensure_punkt() -> None:
    if _punkt:
        return
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        _punkt.append("nltk data")
        return
    except LookupError:
        pass
    spec = importlib.util.find_spec("llama_index")
    for folder in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        cache = Path(folder) / "core" / "_static" / "nltk_cache"
        if (cache / "tokenizers" / "punkt_tab" / "english").is_dir():
            nltk.data.path.insert(0, str(cache))
            _punkt.append("llama-index-core")
            return
    from chatrlhf.models import cache_dir

    # Punkt with no learned parameters: the same rules, no abbreviation or collocation lists
    root = cache_dir() / "nltk_untrained"
    english = root / "tokenizers" / "punkt_tab" / "english"
    english.mkdir(parents=True, exist_ok=True)
    for name in _PUNKT_FILES:
        (english / name).touch()
    nltk.data.path.insert(0, str(root))
    _punkt.append("untrained Punkt")


def _lm_eval_module(name: str) -> types.ModuleType:
    """`lm_eval.tasks.ifeval.<name>`, executing none of lm-eval's package `__init__`s but the top one's."""
    full = f"{_PACKAGE}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("IFEval scoring needs lm-eval's checkers: pip install 'lm-eval[ifeval]==0.4.13'")
    folder = Path(spec.submodule_search_locations[0]) / "tasks" / "ifeval"
    _ensure_punkt()
    import langdetect

    langdetect.DetectorFactory.seed = 0  # its detector samples at random; seeded, a score repeats
    package = sys.modules.get(_PACKAGE)
    if package is None:  # a namespace package in lm-eval: no __init__ to run
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[_PACKAGE] = package
    for part in ("instructions_util", "instructions", "instructions_registry", "utils"):
        part_name = f"{_PACKAGE}.{part}"
        if part_name not in sys.modules:
            part_spec = importlib.util.spec_from_file_location(part_name, folder / f"{part}.py")
            module = importlib.util.module_from_spec(part_spec)
            sys.modules[part_name] = module
            part_spec.loader.exec_module(module)
            setattr(package, part, module)
    return sys.modules[full]


def instruction_names() -> list[str]:
    """Every instruction id the checkers know, e.g. "punctuation:no_comma"."""
    return sorted(_lm_eval_module("instructions_registry").INSTRUCTION_DICT)


def follows(instruction: str, kwargs: dict, prompt: str, answer: str) -> bool:
    """lm-eval's strict verdict on one instruction: does `answer` follow it?"""
    utils = _lm_eval_module("utils")
    example = utils.InputExample(key=0, instruction_id_list=[instruction], prompt=prompt, kwargs=[kwargs])
    return utils.test_instruction_following_strict(example, answer).follow_all_instructions


@dataclass
class InstructionConstraint:
    """One IFEval instruction of a prompt record, as the rule judge reads constraints: met when lm-eval's
    strict reading says the answer follows it; no partial credit."""

    kind: str  # the instruction id, e.g. "punctuation:no_comma"
    kwargs: dict
    prompt: str

    def met(self, answer: str) -> bool:
        return follows(self.kind, self.kwargs, self.prompt, answer)

    def credit(self, answer: str) -> float:
        return float(self.met(answer))

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "prompt_to_repeat")
        return f"{self.kind} ({args})" if args else self.kind


def instruction_constraints(prompt: str, meta: dict) -> list[InstructionConstraint]:
    """The IFEval instructions a record carries (`instruction_id_list` + `kwargs`, checked when it was read)."""
    kwargs = meta.get("kwargs") or [{} for _ in meta["instruction_id_list"]]
    return [
        InstructionConstraint(name, {k: v for k, v in given.items() if v}, prompt)
        for name, given in zip(meta["instruction_id_list"], kwargs)
    ]


def check(item: IFEvalItem, answer: str) -> Verdict:
    """lm-eval's strict and loose verdicts on `answer`, one per instruction of `item`."""
    utils = _lm_eval_module("utils")
    example = utils.InputExample(
        key=item.key, instruction_id_list=item.instruction_ids, prompt=item.prompt, kwargs=item.kwargs
    )
    strict = utils.test_instruction_following_strict(example, answer)
    loose = utils.test_instruction_following_loose(example, answer)
    return Verdict(list(strict.follow_instruction_list), list(loose.follow_instruction_list))


def parse_item(record: Record) -> IFEvalItem:
    """An IFEval-format record (`prompt` text, `instruction_id_list`, `kwargs`), checked by `read_instructions`."""
    where, data = record.where, record.data
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field 'prompt': expected non-empty text, got {prompt!r:.60}")
    ids, kwargs = read_instructions(where, prompt, data)
    key = str(data.get("key", where))
    extra = {k: v for k, v in data.items() if k not in ("key", "prompt", "instruction_id_list", "kwargs")}
    return IFEvalItem(where, key, prompt, ids, kwargs, extra)


def read_instructions(where: str, prompt: str, data: dict) -> tuple[list[str], list[dict]]:
    """A record's `instruction_id_list` and `kwargs` checked the way the checkers will read them: every
    instruction known, every argument its checker reads given, and the checker run once on a trial answer.
    The kwargs come back with empty values left out, as lm-eval leaves them out."""
    ids = data.get("instruction_id_list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: field 'instruction_id_list': expected a non-empty list of instruction ids")
    kwargs = data.get("kwargs", [{} for _ in ids])
    if (
        not isinstance(kwargs, list)
        or len(kwargs) != len(ids)
        or not all(isinstance(k, dict) for k in kwargs)
    ):
        raise DataError(
            f"{where}: field 'kwargs': expected a list of {len(ids)} objects, one per instruction "
            f"of instruction_id_list"
        )
    registry = _lm_eval_module("instructions_registry").INSTRUCTION_DICT
    kept = []
    for i, (name, given) in enumerate(zip(ids, kwargs)):
        if name not in registry:
            raise DataError(
                f"{where}: field 'instruction_id_list[{i}]': unknown instruction {name!r}; known: "
                + ", ".join(sorted(registry))
            )
        args = {k: v for k, v in given.items() if v}
        _try_checker(registry[name](name), args, prompt, f"{where}: field 'kwargs[{i}]' ({name})")
        kept.append(args)
    return list(ids), kept


def _try_checker(checker, args: dict, prompt: str, where: str) -> None:
    """Stop with `where` if the checker would not read `args`: a missing argument would be drawn at random by
    lm-eval, an unknown or refused one raises inside it."""
    needed = [k for k in checker.get_instruction_args_keys() if k != "prompt"]
    missing = [k for k in needed if k not in args]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} (this instruction reads {', '.join(needed)})")
    try:
        checker.build_description(**args)
        if "prompt" in (checker.get_instruction_args() or {}):
            checker.build_description(prompt=prompt)
        checker.check_following(_TRIAL_ANSWER)
    except Exception as e:  # the checker's own refusal, whatever its type, is the user's to fix
        raise DataError(f"{where}: the checker refuses {args}: {type(e).__name__}: {e}") from None


def load_items(source: str, limit: int = 0, seed: int = 0) -> list[IFEvalItem]:
    """Every record of `source` (a file or hub dataset) checked; with `limit`, a seeded sample of that many in
    file order. Any bad record stops here, before anything is generated or written."""
    items = InvalidRecords("stop").keep(source, read_records(source), parse_item)
    if not items:
        raise DataError(f"{source}: no records")
    if 0 < limit < len(items):
        import random

        picked = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in picked]
    return items
