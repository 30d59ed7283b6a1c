"""Stage 2, the reward model: a scalar score that agrees with people's rankings of K answers.

    chatrlhf reward --config rm.yaml
    chatrlhf score --model runs/x/reward --data pairs.jsonl

The model is the transformer without its unembedding plus a scalar head, read at the answer's end-of-turn
token (a Hugging Face `AutoModelForSequenceClassification` with one label, so any tool loads it). All C(K,2)
pairs of one prompt form one batch element (InstructGPT eq. 1): each of the K answers is forwarded once and
the loss is the mean of -log sigmoid(r_w - r_l) over that prompt's pairs; ties make no pair.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import AttentionInterface, set_seed

from chatrlhf.chat import render
from chatrlhf.config import TrainConfig, help_field
from chatrlhf.data import DataError, InvalidRecords, load_demonstrations
from chatrlhf.errors import UserError
from chatrlhf.losses import ranking_loss, ranking_pairs
from chatrlhf.models import (
    apply_lora,
    disable_dropout,
    load_tokenizer,
    match_tokenizer,
    own_weights,
    pick_device,
    resolve_model,
    save_model,
    unwrap,
)
from chatrlhf.preferences import Ranking, load_rankings
from chatrlhf.runs import data_lineage
from chatrlhf.training import Stage, check_config, fit


@dataclass
class RewardConfig(TrainConfig):
    """Reward model from rankings, pairs, Anthropic HH text or OpenAssistant trees."""

    output_dir: str = help_field("runs/reward", "where the reward model, metrics and plots go")
    batch_size: int = help_field(8, "prompts (each with all its K answers) per forward pass")
    lr: float = help_field(1e-5, "peak learning rate")
    epochs: float = help_field(1.0, "passes over the rankings; more than one overfits (InstructGPT)")
    eval_fraction: float = help_field(0.1, "share of prompts held out for accuracy when data.eval is empty")
    pairs_as_independent: bool = help_field(
        False, "train on shuffled single pairs instead of one batch element per prompt (for comparison)"
    )
    share_prompt: bool = help_field(
        True,
        "pack a prompt and its K answers into one row, so the prompt is forwarded once and nothing is padded",
    )
    normalize_with: str = help_field(
        "", "demonstrations file: after training, add a bias so their answers score mean 0 (InstructGPT)"
    )


@dataclass
class RankedItem:
    """One prompt's K answers, tokenized, with the pairs their ranks make."""

    sequences: list[list[int]]  # K x (T_k,) prompt + answer, ending at the answer's end-of-turn token
    pairs: list[tuple[int, int]]  # (winner, loser) indices


# --------------------------------------------------------------------------------------------------
# model


def load_reward_model(name_or_path: str, tokenizer, device, init_head: bool = False):
    """A one-label sequence-classification model; a new head is drawn from N(0, 1/sqrt(d+1))."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if init_head:  # a causal LM has no score head yet: the load report listing it as missing is expected
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    match_tokenizer(model, tokenizer)
    disable_dropout(model)
    if init_head:
        head = model.score if hasattr(model, "score") else model.get_output_embeddings()
        d = head.weight.shape[1]
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / math.sqrt(d + 1))
            if head.bias is not None:
                head.bias.zero_()
    return own_weights(model.to(device))


def reward_scores(model, sequences: Sequence[list[int]], pad_id: int, device) -> torch.Tensor:
    """Scalar reward of each sequence, read at its last token. Returns (N,); right padding, masked."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return (
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, 0].float()
    )


def backbone_hidden(model, input_ids, attention_mask, position_ids=None, **attention) -> torch.Tensor:
    """Last hidden states of a scalar-head model's transformer (PEFT-wrapped or not). (B, T, D); the mask
    is 2-D padding or a prepared (B, 1, T, T) mask; `attention` keywords reach the attention function."""
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **attention,
    )
    return out.last_hidden_state


def scalar_head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The one-label head on hidden states (..., D) -> (...) in fp32."""
    base = unwrap(model)
    return base.score(hidden)[..., 0].float()


PACK_LIMIT = 2048  # tokens per packed row: attention over a packed row grows with its length squared


def shared_prompt_scores(
    model, sequences: Sequence[list[int]], pad_id: int, device, limit: int = PACK_LIMIT
) -> torch.Tensor:
    """Rewards of K answers to one prompt, forwarding the prompt once (InstructGPT's K-way batching).

    The longest common prefix of the K sequences and the answers after it are packed into one row with no
    padding: each answer attends to the prefix and to itself, with positions continuing the prefix's.
    Answers that would make a row longer than `limit` tokens go to another row with its own copy of the
    prefix. Equal to `reward_scores` on the full sequences (scores and gradients); saves the prompt's
    compute K-1 times and every pad token. Returns (K,).
    """
    shared = min(len(s) for s in sequences) - 1  # every answer keeps at least one token of its own
    for i in range(shared):
        if any(s[i] != sequences[0][i] for s in sequences):
            shared = i
            break
    if shared == 0:
        return reward_scores(model, sequences, pad_id, device)
    rows, row, size = [], [], shared
    for tail in (s[shared:] for s in sequences):
        if row and size + len(tail) > limit:
            rows.append(row)
            row, size = [], shared
        row.append(tail)
        size += len(tail)
    rows.append(row)
    prefix = sequences[0][:shared]
    return torch.cat([_packed_scores(model, prefix, tails, device) for tails in rows])


def _packed_scores(model, prefix: list[int], tails: list[list[int]], device) -> torch.Tensor:
    """The reward at the end of each tail, for one row of prefix + tails. Returns (len(tails),)."""
    shared = len(prefix)
    ids = prefix + [t for tail in tails for t in tail]
    positions = list(range(shared)) + [shared + j for tail in tails for j in range(len(tail))]
    segment = torch.tensor(
        [0] * shared + [k + 1 for k, tail in enumerate(tails) for _ in tail], device=device
    )
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    mask = causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    hidden = _row_hidden(
        model,
        torch.tensor([ids], device=device),
        mask,
        torch.tensor([positions], device=device),
        shared,
        [len(tail) for tail in tails],
    )
    ends = torch.tensor([len(t) for t in tails], device=device).cumsum(0) + shared - 1
    return scalar_head(model, hidden[0, ends])


def _row_hidden(model, ids, mask, positions, shared: int, lengths: list[int]) -> torch.Tensor:
    """The packed row's hidden states; under SDPA attention runs per answer segment (`segment_attention`).
    Not with gradient checkpointing: its recomputation in backward would run outside the switch."""
    base = unwrap(model)
    config = base.config
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    if config._attn_implementation != "sdpa" or checkpointing:
        return backbone_hidden(model, ids, _attention_mask(model, mask), positions)
    config._attn_implementation = SEGMENT_ATTENTION
    try:
        row = PackedRow.of(shared, lengths, ids.device)
        return backbone_hidden(model, ids, mask[None, None], positions, packed_row=row)
    finally:
        config._attn_implementation = "sdpa"


SEGMENT_ATTENTION = "chatrlhf_segments"


class PackedRow(NamedTuple):
    """The layout of one packed row for `segment_attention`: the shared prefix's length, each answer's
    length, and each answer's (n, shared + n) mask over the prefix and its own tokens, built once per row
    rather than once per layer."""

    shared: int
    lengths: list[int]
    masks: list[torch.Tensor]

    @classmethod
    def of(cls, shared: int, lengths: list[int], device) -> PackedRow:
        masks = []
        for n in lengths:
            allowed = torch.ones(n, shared + n, dtype=torch.bool, device=device)
            allowed[:, shared:] = allowed[:, shared:].tril()
            masks.append(allowed)
        return cls(shared, lengths, masks)


def segment_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_row=None, **kwargs
):
    """Attention over a packed row one segment at a time: the prefix's queries attend causally to the
    prefix, each answer's to the prefix and causally to itself. The same result as the row's full mask
    without computing the blocks it masks out (answers attending to other answers), which grow with the
    square of K. query (1, H, L, hd), key and value (1, H_kv, L, hd); returns ((1, L, H, hd), None). Without
    `packed_row` (a `PackedRow`) it is transformers' SDPA attention.

    The row is cut with `split`, whose backward is one concatenation; slicing it once per segment would make
    every segment's backward write a zero-filled tensor of the whole row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_row is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    sdpa = torch.nn.functional.scaled_dot_product_attention
    sizes = [packed_row.shared, *packed_row.lengths]
    (q0, *qs), (k0, *ks), (v0, *vs) = (t.split(sizes, dim=2) for t in (query, key, value))
    parts = [sdpa(q0, k0, v0, scale=scaling, is_causal=True, enable_gqa=True)]
    for q, k, v, allowed in zip(qs, ks, vs, packed_row.masks):
        keys, values = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
        parts.append(sdpa(q, keys, values, attn_mask=allowed, scale=scaling, enable_gqa=True))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def _attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A custom (1, 1, L, L) mask in the form the model's attention takes: boolean for SDPA, additive for
    eager attention."""
    if getattr(unwrap(model).config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[None, None]
    return allowed[None, None]


def sequence_ids(tokenizer, prompt: list[dict], response: str, system_prompt: str = "") -> list[int]:
    """Prompt + answer rendered by the shared renderer, cut after the answer's end-of-turn token."""
    rendered = render(
        tokenizer, prompt + [{"role": "assistant", "content": response}], system_prompt=system_prompt
    )
    last = max(i for i, m in enumerate(rendered.assistant_mask) if m)
    return rendered.input_ids[: last + 1]


def tokenize_rankings(
    rankings: Sequence[Ranking], tokenizer, max_length: int, truncation: bool, system_prompt: str = ""
) -> list[RankedItem]:
    items, dropped = [], 0
    for r in rankings:
        seqs = [sequence_ids(tokenizer, r.prompt, resp, system_prompt) for resp in r.responses]
        longest = max(len(s) for s in seqs)
        if longest > max_length:
            if not truncation:
                raise DataError(
                    f"{r.where}: field `responses`: {longest} tokens with the prompt, more than "
                    f"data.max_length={max_length} (raise it, or set data.truncation: true to drop such records)"
                )
            dropped += 1
            continue
        items.append(RankedItem(seqs, ranking_pairs(r.ranks)))
    if dropped:
        print(f"warning: {dropped} ranking(s) longer than data.max_length dropped", file=sys.stderr)
    return items


def split_by_prompt(
    rankings: list[Ranking], fraction: float, seed: int
) -> tuple[list[Ranking], list[Ranking]]:
    """Hold out a share of the prompts: every ranking of one prompt lands on the same side."""
    groups: dict[str, list[Ranking]] = defaultdict(list)
    for r in rankings:
        groups[json.dumps(r.prompt, sort_keys=True)].append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * fraction) if fraction > 0 else 0
    if fraction > 0 and len(keys) > 1:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    held = set(keys[:n_eval])
    train = [r for k in keys if k not in held for r in groups[k]]
    return train, [r for k in keys[:n_eval] for r in groups[k]]


def independent_pairs(items: Sequence[RankedItem]) -> list[RankedItem]:
    return [
        RankedItem([item.sequences[w], item.sequences[loser]], [(0, 1)])
        for item in items
        for w, loser in item.pairs
    ]


# --------------------------------------------------------------------------------------------------
# the stage


def _pair_stats(
    rewards: torch.Tensor, item_pairs: list[tuple[int, int]]
) -> tuple[torch.Tensor, float, float]:
    pairs = torch.tensor(item_pairs, dtype=torch.long, device=rewards.device)
    diff = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).detach()
    return pairs, float((diff > 0).sum()), float(diff.sum())


def _reward_stage(tokenizer, device, lineage: dict, share_prompt: bool = True) -> Stage:
    pad_id = tokenizer.pad_token_id

    def forward(model, items: Sequence[RankedItem]) -> list[torch.Tensor]:
        if share_prompt:
            return [shared_prompt_scores(model, item.sequences, pad_id, device) for item in items]
        rewards = reward_scores(model, [s for item in items for s in item.sequences], pad_id, device)
        return list(torch.split(rewards, [len(item.sequences) for item in items]))

    def loss(model, items, step_weight):
        total = torch.zeros((), device=device)
        stats = {"loss": 0.0, "pairs": 0.0, "correct": 0.0, "margin": 0.0, "prompts": float(len(items))}
        for item, rewards in zip(items, forward(model, items)):
            pairs, correct, margin = _pair_stats(rewards, item.pairs)
            item_loss = ranking_loss(rewards, pairs)
            total = total + item_loss
            stats["loss"] += item_loss.item()
            stats["pairs"] += len(item.pairs)
            stats["correct"] += correct
            stats["margin"] += margin
        return total / step_weight, stats

    def summarize(s):
        return {
            "rm/loss": s["loss"] / s["prompts"],
            "rm/train_accuracy": s["correct"] / s["pairs"],
            "rm/train_margin": s["margin"] / s["pairs"],
            "train/pairs": s["pairs"],
        }

    def evaluate(model, items):
        by_k: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
        correct = pairs = margin = loss_sum = 0.0
        for i in range(0, len(items), 8):
            batch = items[i : i + 8]
            for item, rewards in zip(batch, forward(model, batch)):
                p, c, m = _pair_stats(rewards, item.pairs)
                loss_sum += ranking_loss(rewards, p).item()
                correct, pairs, margin = correct + c, pairs + len(item.pairs), margin + m
                by_k[len(item.sequences)][0] += c
                by_k[len(item.sequences)][1] += len(item.pairs)
        out = {
            "rm/accuracy": correct / pairs,
            "rm/margin": margin / pairs,
            "rm/eval_loss": loss_sum / len(items),
        }
        out.update({f"rm/accuracy_k{k}": c / n for k, (c, n) in sorted(by_k.items())})
        return out

    return Stage(
        name="reward",
        loss=loss,
        weight=lambda item: 1.0,  # one batch element per prompt, whatever its K
        length=lambda item: max(len(s) for s in item.sequences) * len(item.sequences),
        summarize=summarize,
        evaluate=evaluate,
        export=lambda model, folder: save_model(model, folder, tokenizer),
        plots=["rm/loss", "rm/train_accuracy", "rm/accuracy", "rm/margin"],
        lineage=lineage,
    )


def train(cfg: RewardConfig, on_step=None) -> dict[str, float]:
    """Train a reward model; every record is validated before anything is written."""
    check_config(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    d = cfg.data
    invalid = InvalidRecords(d.on_invalid)
    rankings = load_rankings(d.train, d.format, invalid)
    if d.eval:
        train_rankings, eval_rankings = rankings, load_rankings(d.eval, d.format, invalid)
    else:
        train_rankings, eval_rankings = split_by_prompt(rankings, cfg.eval_fraction, cfg.seed)
    reference = load_demonstrations(cfg.normalize_with, invalid=invalid) if cfg.normalize_with else []
    train_items = tokenize_rankings(train_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)
    eval_items = tokenize_rankings(eval_rankings, tokenizer, d.max_length, d.truncation, d.system_prompt)
    if cfg.pairs_as_independent:
        train_items = independent_pairs(train_items)

    set_seed(cfg.seed)
    device = pick_device()
    model = load_reward_model(model_path, tokenizer, device, init_head=True)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
        for name, p in model.named_parameters():
            p.requires_grad = p.requires_grad or name.split(".")[-2] == "score"  # the new head always trains
    lineage = {
        "parent": model_path,
        "data": data_lineage(d.train, d.eval, cfg.normalize_with),
        "invalid_records": invalid.summary(),
    }
    stage = _reward_stage(tokenizer, device, lineage, cfg.share_prompt)
    if reference:
        stage.export = _normalizing_export(stage.export, reference, tokenizer, cfg, device)
    return fit(cfg, stage, model, train_items, eval_items, on_step=on_step)


def _normalizing_export(export, reference, tokenizer, cfg: RewardConfig, device):
    """Before saving, store a bias that makes the demonstrations' answers score mean 0."""

    def write(model, folder: Path):
        seqs = [
            sequence_ids(tokenizer, c.messages[:-1], c.messages[-1]["content"], cfg.data.system_prompt)
            for c in reference
        ]
        model.eval()
        with torch.no_grad():
            scores = torch.cat(
                [
                    reward_scores(model, seqs[i : i + 8], tokenizer.pad_token_id, device)
                    for i in range(0, len(seqs), 8)
                ]
            )
        base = unwrap(model)
        base.config.reward_bias = -float(scores.mean())
        export(model, folder)

    return write


# --------------------------------------------------------------------------------------------------
# scoring


@dataclass
class ScoreConfig:
    model: str = help_field("", "reward model checkpoint (output_dir of `chatrlhf reward`)")
    data: str = help_field("", "rankings or pairs file whose answers are scored")
    prompt: str = help_field("", "a single prompt to score (with --response)")
    response: list[str] = help_field([], "answers to --prompt (repeat the flag for several)")
    batch_size: int = help_field(8, "sequences per forward pass")
    max_length: int = help_field(2048, "longest sequence scored")


def score_rankings(model_path: str, rankings: Sequence[Ranking], batch_size: int = 8) -> list[list[float]]:
    """Reward of every answer of every ranking (the stored normalisation bias added)."""
    tokenizer = load_tokenizer(model_path)
    device = pick_device()
    model = load_reward_model(model_path, tokenizer, device).eval()
    bias = float(getattr(model.config, "reward_bias", 0.0) or 0.0)
    seqs = [sequence_ids(tokenizer, r.prompt, resp) for r in rankings for resp in r.responses]
    with torch.no_grad():
        flat = [
            float(x) + bias
            for i in range(0, len(seqs), batch_size)
            for x in reward_scores(model, seqs[i : i + batch_size], tokenizer.pad_token_id, device)
        ]
    out, at = [], 0
    for r in rankings:
        out.append(flat[at : at + len(r.responses)])
        at += len(r.responses)
    return out


def score(cfg: ScoreConfig) -> list[list[float]]:
    """`chatrlhf score`: print one JSON line per prompt with the reward of each answer."""
    if not cfg.model:
        raise UserError("model: name the reward model checkpoint to score with")
    if cfg.data:
        rankings = load_rankings(cfg.data)
    elif cfg.prompt and cfg.response:
        rankings = [
            Ranking(
                "command line",
                [{"role": "user", "content": cfg.prompt}],
                cfg.response,
                [1] * len(cfg.response),
            )
        ]
    else:
        raise UserError("give --data FILE, or --prompt TEXT with one or more --response TEXT")
    results = score_rankings(resolve_model(cfg.model), rankings, cfg.batch_size)
    for r, scores in zip(rankings, results):
        print(json.dumps({"prompt": r.prompt[-1]["content"], "responses": r.responses, "scores": scores}))
    return results
