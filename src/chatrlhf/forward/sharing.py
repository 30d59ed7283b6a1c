"""Forwards that share work, below the plain forwards: rows asking the same prompt run it once, and models
sharing their first layers run them once.

    prompt sharing   distinct_rows, prompt_groups; `_decode` runs each distinct prompt once and copies its KV
                     cache to every row asking it (`_shared_prompt_decode`)
    trunk split      Trunk, trunk_hidden (the first layers' output), `_only_layers` (running only some
                     layers), shares_trunk (whether two models' first layers are the same weights)
    masks            positions from left padding, 4-D attention masks in the form the model's attention takes

Every function takes a model that may be wrapped by PEFT, and token tensors already on its device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from chatrlhf.models import unwrap


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding. (B, T)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def distinct_rows(prompts: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(the first row of each distinct prompt, for every row the place of its prompt in that list)."""
    first: dict[tuple[int, ...], int] = {}
    inverse = [first.setdefault(tuple(p), len(first)) for p in prompts]
    rows = [0] * len(first)
    for row, place in reversed(list(enumerate(inverse))):
        rows[place] = row
    return rows, inverse


def _prompt_keys(prompts: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """Each row's left-padded prompt (B, P) as a list, -1 on its padding."""
    real = attention_mask[:, : prompts.shape[1]]
    return (prompts * real - (1 - real)).tolist()


def prompt_groups(
    sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
) -> list[list[int]]:
    """The rows of a rollout batch grouped by prompt (each group's rows ask the same one), in order of first
    appearance."""
    _, inverse = distinct_rows(_prompt_keys(sequences[:, :prompt_width], attention_mask))
    groups: list[list[int]] = [[] for _ in range(max(inverse, default=-1) + 1)]
    for row, place in enumerate(inverse):
        groups[place].append(row)
    return groups


def _decode(decoder, attention_mask, prompts: torch.Tensor | None = None, **inputs) -> torch.Tensor:
    """The decoder's last hidden states (B, T, D) for token ids or embeddings, positions from the (left)
    padding. With `prompts` (B, P), the left-padded prompt of each row: rows asking the same prompt (a
    prompt's k answers) run its P positions once (`_shared_prompt_decode`); the same result."""
    if prompts is not None and prompts.shape[1] > 0 and not _checkpointing(decoder):
        width = prompts.shape[1]
        distinct, inverse = distinct_rows(_prompt_keys(prompts, attention_mask))
        if len(distinct) < len(inverse) and width < attention_mask.shape[1]:
            return _shared_prompt_decode(decoder, attention_mask, width, distinct, inverse, inputs)
    position_ids = positions(attention_mask)
    return decoder(
        **inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def _shared_prompt_decode(decoder, attention_mask, width: int, distinct, inverse, inputs) -> torch.Tensor:
    """`_decode` where rows share prompts: the distinct prompts' first `width` positions run once, their
    KV cache is copied to each row asking them (an index, so gradients flow back), then every row's
    answer positions run over it. Masks are built here, 4-D, so that the cache's layer numbering (a
    decoder running only its upper layers) plays no part in them."""
    from transformers import DynamicCache

    device = attention_mask.device
    pick, spread = torch.tensor(distinct, device=device), torch.tensor(inverse, device=device)
    cache = DynamicCache()
    argument = {cache_keyword(type(decoder)): cache}
    prompt_mask = attention_mask[pick, :width]
    head = decoder(
        **{name: t[pick, :width] for name, t in inputs.items()},
        attention_mask=_padded_causal(decoder, prompt_mask, 0),
        position_ids=positions(prompt_mask),
        use_cache=True,
        **argument,
    ).last_hidden_state
    cache.batch_select_indices(spread)
    tail = decoder(
        **{name: t[:, width:] for name, t in inputs.items()},
        attention_mask=_padded_causal(decoder, attention_mask, width),
        position_ids=positions(attention_mask)[:, width:],
        use_cache=True,
        **argument,
    ).last_hidden_state
    return torch.cat([head[spread], tail], dim=1)


def _padded_causal(decoder, mask: torch.Tensor, start: int) -> torch.Tensor:
    """The (B, 1, T - start, T) attention of queries start.. over keys 0.. of left/right-padded rows: each
    real key at or before the query, and a padding query its own position (so that no row is empty)."""
    length = mask.shape[1]
    query = torch.arange(start, length, device=mask.device)[:, None]
    key = torch.arange(length, device=mask.device)[None, :]
    allowed = ((key <= query)[None] & mask.bool()[:, None, :]) | (key == query)[None]
    return _attention_mask(decoder, allowed[:, None])


def _checkpointing(module) -> bool:
    """Gradient checkpointing recomputes layers without the KV cache the shared prompt needs."""
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


@functools.cache
def cache_keyword(model_class: type) -> str:
    """Newer transformers name the KV-cache argument `cache`, older ones `past_key_values`; looked up once
    per model class (generation asks per request and per rollout)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Trunk(NamedTuple):
    """The hidden states (B, T, D) entering layer `layers` of a decoder: what models sharing their first
    `layers` layers (a LoRA policy with adapters only above them, and its reference) compute once."""

    hidden: torch.Tensor
    layers: int

    def rows(self, idx: torch.Tensor) -> Trunk:
        return Trunk(self.hidden[idx], self.layers)


@torch.no_grad()
def trunk_hidden(model, sequences, attention_mask, layers: int) -> Trunk:
    """The hidden states after the first `layers` decoder layers (no final norm), without gradient."""
    decoder = unwrap(model).get_decoder()
    with _only_layers(decoder, 0, layers):
        return Trunk(_decode(decoder, attention_mask, input_ids=sequences), layers)


@contextlib.contextmanager
def _only_layers(decoder, start: int, stop: int | None):
    """Within the block the decoder runs only its layers [start, stop); below the top (`stop` given) it ends
    without its final norm, so the output is the residual stream entering layer `stop`."""
    layers, norm = decoder.layers, decoder.norm
    decoder.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if stop is not None:
        decoder.norm = torch.nn.Identity()
    try:
        yield
    finally:
        decoder.layers, decoder.norm = layers, norm


def shares_trunk(model, other, layers: int) -> bool:
    """Whether `model`'s first `layers` decoder layers and its token embeddings are `other`'s weights to the
    bit (a value or reward model trained from the policy's start with those layers frozen, or not trained),
    in the same decoder class: then the output of `other`'s trunk is this model's too."""
    a = getattr(unwrap(model), unwrap(model).base_model_prefix)
    b = unwrap(other).get_decoder()
    if type(a) is not type(b) or len(a.layers) < layers or a.config.hidden_size != b.config.hidden_size:
        return False
    pairs = [(a.embed_tokens, b.embed_tokens)] + [(a.layers[i], b.layers[i]) for i in range(layers)]
    pairs += [(a.rotary_emb, b.rotary_emb)] if hasattr(a, "rotary_emb") else []
    for mine, theirs in pairs:
        left, right = _base_state(mine), _base_state(theirs)
        if left.keys() != right.keys() or not all(torch.equal(left[k], right[k]) for k in left):
            return False
    return True


def _base_state(module) -> dict[str, torch.Tensor]:
    """A module's weights and buffers under their names without PEFT's `base_layer.` wrapping."""
    own = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return {name.replace(".base_layer", ""): t for name, t in own.items() if "lora_" not in name}


def _attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A custom boolean mask, (L, L) or already 4-D, as a 4-D mask in the form the model's attention takes:
    boolean for SDPA, additive for eager attention."""
    if allowed.dim() == 2:
        allowed = allowed[None, None]
    if getattr(unwrap(model).config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed
