"""Stage 1, supervised fine-tuning (and stage 0, causal-LM pretraining on raw text, on the same code).

    chatrlhf sft --config sft.yaml --max_steps 20
    chatrlhf pretrain --data.train corpus.txt

SFT trains on assistant tokens only. Logits are computed only where a target exists, so prompt tokens and
padding never pay for the full-vocabulary projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from transformers import set_seed

from chatrlhf.configs import PretrainConfig, SFTConfig, TrainConfig
from chatrlhf.data import (
    Sample,
    chunk_stream,
    load_demonstrations,
    load_texts,
    pack,
    tokenize_conversations,
    tokenize_texts,
)
from chatrlhf.forward import collate, target_logits
from chatrlhf.harness import check_config
from chatrlhf.losses import token_nll
from chatrlhf.models import (
    apply_lora,
    freeze_bottom,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_model,
)
from chatrlhf.records import InvalidRecords
from chatrlhf.runs import data_lineage
from chatrlhf.training import Stage, fit


def _lm_stage(name: str, tokenizer, device, lineage: dict, plots: list[str]) -> Stage:
    pad_id = tokenizer.pad_token_id

    def loss(model, samples, step_weight):
        logits, targets = target_logits(model, collate(samples, pad_id, device))
        nll = token_nll(logits, targets)
        stats = {"nll": nll.sum().item(), "tokens": float(nll.numel())}
        stats["input_tokens"] = float(sum(len(s.input_ids) for s in samples))
        return nll.sum() / step_weight, stats

    def summarize(sums):
        return {
            "train/loss": sums["nll"] / max(sums["tokens"], 1),
            "train/tokens": sums["tokens"],
            "train/input_tokens": sums["input_tokens"],
        }

    def evaluate(model, samples):
        nll_sum, count = 0.0, 0
        for i in range(0, len(samples), 8):
            logits, targets = target_logits(model, collate(samples[i : i + 8], pad_id, device))
            nll = token_nll(logits, targets)
            nll_sum, count = nll_sum + nll.sum().item(), count + nll.numel()
        mean = nll_sum / max(count, 1)
        return {"eval/loss": mean, "eval/ppl": math.exp(min(mean, 50.0))}

    return Stage(
        name=name,
        loss=loss,
        weight=lambda s: float(sum(1 for m, p in zip(s.loss_mask[1:], s.position_ids[1:]) if m and p != 0)),
        length=lambda s: len(s.input_ids),
        summarize=summarize,
        evaluate=evaluate,
        export=lambda model, folder: save_model(model, folder, tokenizer),
        plots=plots,
        lineage=lineage,
    )


def _fit_lm(
    name: str, cfg: TrainConfig, rows_of: Callable, on_step, packing: bool = False
) -> dict[str, float]:
    """Check the config, tokenize the data with `rows_of(source, tokenizer, invalid)` (training rows packed
    with `packing`), load the model (with LoRA when configured) and train it."""
    check_config(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)
    train_items = rows_of(d.train, tokenizer, invalid)
    eval_items = rows_of(d.eval, tokenizer, invalid) if d.eval else []
    if packing:
        train_items = pack(train_items, d.max_length)
    set_seed(cfg.seed)
    model = load_causal_lm(model_path, tokenizer, pick_device())
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    freeze_bottom(model, cfg.freeze_layers)
    lineage = {
        "parent": model_path,
        "data": data_lineage(d.train, d.eval),
        "invalid_records": invalid.summary(),
    }
    stage = _lm_stage(name, tokenizer, pick_device(), lineage, ["train/loss", "eval/loss", "train/lr"])
    return fit(cfg, stage, model, train_items, eval_items, on_step=on_step)


def train(cfg: SFTConfig, on_step=None) -> dict[str, float]:
    """Fine-tune on demonstrations; every record is validated before anything is written."""
    d = cfg.data

    def samples(source: str, tokenizer, invalid) -> list[Sample]:
        conversations = load_demonstrations(source, d.format, invalid)
        return tokenize_conversations(conversations, tokenizer, d.max_length, d.truncation, d.system_prompt)

    return _fit_lm("sft", cfg, samples, on_step, packing=d.packing)


def pretrain(cfg: PretrainConfig, on_step=None) -> dict[str, float]:
    """Causal-LM training on raw text, packed into rows of data.max_length; every token is a target."""

    def rows(source: str, tokenizer, invalid) -> list[Sample]:
        return chunk_stream(tokenize_texts(load_texts(source, invalid), tokenizer), cfg.data.max_length)

    return _fit_lm("pretrain", cfg, rows, on_step)
