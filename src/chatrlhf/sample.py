"""`chatrlhf sample`: K distinct answers per prompt from a model, loaded as ranking tasks into the labeling DB.

    chatrlhf sample --prompts prompts.jsonl --k 4 --db labels.db --model runs/x/sft

Answers come from the shared generation engine, a batch of prompts x K rows at a time. An answer that
repeats another of its prompt (or is empty) is drawn again, up to `max_tries` rounds; a prompt left with fewer
than 2 distinct answers is reported and skipped. Every task records the model, the sampling settings and the
seed of the batch each answer came from, plus the prompt record's other fields (a judge's `reference`, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.progress import Progress

from chatrlhf.chat_template import prompt_ids
from chatrlhf.configs import SampleConfig, SamplingConfig
from chatrlhf.data import load_prompts
from chatrlhf.errors import UserError
from chatrlhf.generation import generate
from chatrlhf.harness import autocast
from chatrlhf.models import resolve_dtype
from chatrlhf.records import Conversation, DataError


def check_config(cfg: SampleConfig) -> None:
    if not cfg.prompts:
        raise UserError("sample: say which prompts to answer: --prompts FILE")
    for name in ("k", "labels_per_task", "batch_prompts", "max_tries"):
        if getattr(cfg, name) < (2 if name == "k" else 1):
            raise UserError(f"sample: --{name} must be at least {2 if name == 'k' else 1}")
    if cfg.sampling.max_new_tokens < 1:
        raise UserError("sample: --sampling.max_new_tokens must be at least 1")
    if cfg.sampling.temperature <= 0:
        raise UserError(
            "sample: --sampling.temperature must be above 0: greedy decoding gives K equal answers"
        )


@dataclass
class Drawn:
    conversation: Conversation
    answers: list[str]
    seeds: list[int]  # (K,) seed of the batch each answer came from


def draw(
    model,
    tokenizer,
    conversations: Sequence[Conversation],
    k: int,
    sampling: SamplingConfig,
    seed: int,
    max_tries: int = 4,
    system_prompt: str = "",
) -> list[Drawn]:
    """K distinct answers to each conversation (fewer where redrawing found no more), in one batch."""
    device = next(model.parameters()).device
    drawn = [Drawn(c, [], []) for c in conversations]
    prompts = [prompt_ids(tokenizer, c.messages, system_prompt) for c in conversations]
    for attempt in range(max_tries):
        rows = [i for i, d in enumerate(drawn) for _ in range(k - len(d.answers))]
        if not rows:
            break
        batch_seed = seed * 1000 + attempt
        generator = torch.Generator(device=device).manual_seed(batch_seed)
        with autocast(device, resolve_dtype("auto")):
            gen = generate(
                model,
                [prompts[i] for i in rows],
                sampling,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                generator,
            )
        for i, text in zip(rows, (text.strip() for text in gen.texts(tokenizer))):
            if text and text not in drawn[i].answers and len(drawn[i].answers) < k:
                drawn[i].answers.append(text)
                drawn[i].seeds.append(batch_seed)
    return drawn


def sample_tasks(
    model, tokenizer, conversations: Sequence[Conversation], cfg: SampleConfig, model_name: str, extra: dict
) -> Iterator[tuple[list, list[str], int]]:
    """Per batch of `batch_prompts` prompts: (ranking tasks, prompts skipped, prompts done). Each task's meta
    holds the prompt record's other fields, its place, each answer's seed, the sampling settings and `extra`."""
    from chatrlhf.labeling.store import TaskIn

    sampling = cfg.sampling
    settings = {"model": model_name, **asdict(sampling), **extra}
    for start in range(0, len(conversations), cfg.batch_prompts):
        chunk = conversations[start : start + cfg.batch_prompts]
        seed = cfg.seed * 100003 + start
        tasks, skipped = [], []
        for d in draw(model, tokenizer, chunk, cfg.k, sampling, seed, cfg.max_tries, cfg.system_prompt):
            if len(d.answers) < 2:
                skipped.append(d.conversation.where)
                continue
            meta = {**d.conversation.extra, "where": d.conversation.where, "seeds": d.seeds, **settings}
            tasks.append(TaskIn(d.conversation.messages, d.answers, meta, cfg.labels_per_task))
        yield tasks, skipped, len(chunk)


def read_tasks(source: str, extra: dict) -> list:
    """Ranking tasks written ahead: prompt records (as `load_prompts` reads them) that also carry `answers`,
    two or more distinct non-empty texts. The record's other fields and `extra` become the task's meta."""
    from chatrlhf.data import load_prompts
    from chatrlhf.labeling.store import TaskIn
    from chatrlhf.records import DataError

    tasks = []
    for conv in load_prompts(source):
        answers = conv.extra.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers or [0]):
            raise DataError(f"{conv.where}: field 'answers': expected a list of non-empty strings")
        if len(set(answers)) < 2 or len(set(answers)) != len(answers):
            raise DataError(f"{conv.where}: field 'answers': expected two or more distinct answers")
        meta = {k: v for k, v in conv.extra.items() if k != "answers"}
        tasks.append(TaskIn(conv.messages, answers, {**meta, "where": conv.where, **extra}))
    return tasks


def run(cfg: SampleConfig) -> list[int]:
    from chatrlhf.labeling.store import Store
    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_model

    check_config(cfg)
    console = Console()
    conversations = load_prompts(cfg.prompts)
    store = Store(cfg.db)  # opened before the model loads: a bad URL fails fast
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, tokenizer, pick_device())
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise DataError(
            f"sample: the tokenizer of {model_path} has {len(tokenizer)} tokens, the model {vocab}"
        )
    task_ids: list[int] = []
    skipped: list[str] = []
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("sampling", total=len(conversations))
        for tasks, missed, done in sample_tasks(
            model, tokenizer, conversations, cfg, cfg.model or model_path, {}
        ):
            task_ids += store.add_tasks(tasks)  # each batch lands whole; an interrupted run keeps what landed
            skipped += missed
            progress.advance(bar, done)
    for where in skipped:
        console.print(f"[yellow]{where}: fewer than 2 distinct answers after {cfg.max_tries} tries; skipped")
    console.print(
        f"{len(task_ids)} ranking tasks of up to {cfg.k} answers added to {cfg.db}"
        + (f" ({len(skipped)} prompts skipped)" if skipped else "")
    )
    return task_ids
