"""Packed rows: a prompt forwarded once for its K answers, each answer attending to the prompt and to itself
(segment attention), for the reward model's training and scoring and for DPO's answer log-probs."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple

import torch

from chatrlhf.forward.plain import (
    answer_logprobs,
    backbone_hidden,
    gather_logprobs,
    reward_scores,
    scalar_head,
    unembed,
)
from chatrlhf.forward.sharing import _attention_mask
from chatrlhf.models import unwrap

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
    shared = _common_prefix(sequences, min(len(s) for s in sequences) - 1)
    if shared == 0:
        return reward_scores(model, sequences, pad_id, device)
    scores = []
    for tails in _rows(sequences, shared, limit):
        hidden = _packed_hidden(model, sequences[0][:shared], tails, device)
        ends = torch.tensor([len(t) for t in tails], device=device).cumsum(0) + shared - 1
        scores.append(scalar_head(model, hidden[ends]))
    return torch.cat(scores)


def shared_prompt_logprobs(
    model, sequences: Sequence[list[int]], answer_start: int, device, limit: int = PACK_LIMIT
) -> torch.Tensor:
    """log p(answer | prompt) of K answers to one prompt, a causal LM forwarding the prompt once: the sum
    of the log-probs of each sequence's tokens from `answer_start` on, packed as `shared_prompt_scores`
    packs (the shared prefix stops at `answer_start`, so every answer token is its own). Equal to
    `answer_logprobs` on the full sequences. Returns (K,) fp32."""
    shared = _common_prefix(sequences, answer_start)
    if shared == 0:
        return answer_logprobs(model, sequences, answer_start, 0, device)
    out = []
    for tails in _rows(sequences, shared, limit):
        hidden = _packed_hidden(model, sequences[0][:shared], tails, device)
        at, where, targets, owner = shared, [], [], []
        for k, tail in enumerate(tails):
            skip = answer_start - shared  # answer tokens start this far into every tail
            where += [(shared - 1 if j == 0 else at + j - 1) for j in range(skip, len(tail))]
            targets += tail[skip:]
            owner += [k] * (len(tail) - skip)
            at += len(tail)
        logprobs = gather_logprobs(unembed(model, hidden[where], 1.0), torch.tensor(targets, device=device))
        sums = torch.zeros(len(tails), device=device).index_add(
            0, torch.tensor(owner, device=device), logprobs
        )
        out.append(sums)
    return torch.cat(out)


def _common_prefix(sequences: Sequence[list[int]], most: int) -> int:
    """Length of the longest prefix all sequences share, at most `most` tokens."""
    for i in range(most):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return most


def _rows(sequences: Sequence[list[int]], shared: int, limit: int) -> list[list[list[int]]]:
    """The tails after the shared prefix, grouped into rows of at most `limit` tokens with the prefix."""
    rows, row, size = [], [], shared
    for tail in (s[shared:] for s in sequences):
        if row and size + len(tail) > limit:
            rows.append(row)
            row, size = [], shared
        row.append(tail)
        size += len(tail)
    rows.append(row)
    return rows


def _packed_hidden(model, prefix: list[int], tails: list[list[int]], device) -> torch.Tensor:
    """The last hidden states (L, D) of one row of prefix + tails, each tail attending to the prefix and to
    itself, positions continuing the prefix's."""
    shared = len(prefix)
    ids = prefix + [t for tail in tails for t in tail]
    position_ids = list(range(shared)) + [shared + j for tail in tails for j in range(len(tail))]
    segment = torch.tensor(
        [0] * shared + [k + 1 for k, tail in enumerate(tails) for _ in tail], device=device
    )
    causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=device).tril()
    mask = causal & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    hidden = _row_hidden(
        model,
        torch.tensor([ids], device=device),
        mask,
        torch.tensor([position_ids], device=device),
        PackedRow.of(shared, [len(tail) for tail in tails], device),
    )
    return hidden[0]


def _row_hidden(model, ids, mask, position_ids, row: PackedRow) -> torch.Tensor:
    """The packed row's hidden states; under SDPA attention runs per answer segment (`segment_attention`),
    otherwise over the row's full (L, L) mask. Not with gradient checkpointing: its recomputation in
    backward would run outside the switch."""
    base = unwrap(model)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    if base.config._attn_implementation != "sdpa" or checkpointing:
        return backbone_hidden(model, ids, _attention_mask(model, mask), position_ids)
    with segment_attention_on(model):
        return backbone_hidden(model, ids, mask[None, None], position_ids, packed_row=row)


SEGMENT_ATTENTION = "chatrlhf_segments"


@contextlib.contextmanager
def segment_attention_on(model):
    """Within the block, the SDPA model's attention is `segment_attention` (SDPA itself for any forward that
    passes no `packed_row`); registered with transformers on first use."""
    _register_segment_attention()
    config = unwrap(model).config
    config._attn_implementation = SEGMENT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _register_segment_attention() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if SEGMENT_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


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
