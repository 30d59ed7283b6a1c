"""Model forward passes, below every stage: what SFT, the reward model, PPO, the judges and eval compute with a
model, written once.

    language model   collate + target_logits (LM losses), response_logits + gather_logprobs (answer log-probs),
                     trunk_hidden (the first layers' output, for models that share them)
    scalar head      backbone_hidden, scalar_head, reward_scores, token_values, sequence_scores
    packed rows      shared_prompt_scores: one prompt and its K answers in one row, each answer attending
                     to the prompt and to itself (segment attention)

Every function takes a model that may be wrapped by PEFT, and token tensors already on its device.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from chatrlhf.data import Sample
from chatrlhf.models import unwrap


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, whatever the left padding. (B, T)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------------------------------
# language-model losses and log-probs


def collate(samples: Sequence[Sample], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch.

    Returns input_ids, position_ids, targets (B, T): targets[b, t] is the token at t+1 when it carries
    loss, else -100. Padding restarts the position ids, so it forms its own segment and the model's
    packed-sequence masking keeps real tokens from attending to it (no attention mask needed).
    """
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.full((len(samples), width), -100, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        ids[b, :n] = torch.tensor(s.input_ids)
        pos = torch.tensor(s.position_ids)
        position_ids[b, :n] = pos
        position_ids[b, n:] = torch.arange(width - n)
        # a token is a target when it carries loss and does not start a new packed sample
        is_target = torch.tensor(s.loss_mask[1:], dtype=torch.bool) & (pos[1:] != 0)
        targets[b, : n - 1] = torch.where(is_target, ids[b, 1:n], torch.full_like(ids[b, 1:n], -100))
    return {
        "input_ids": ids.to(device),
        "position_ids": position_ids.to(device),
        "targets": targets.to(device),
    }


def target_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, V) at the N positions of a `collate` batch that have a target, and those targets (N,).
    The unembedding runs only there, so prompt tokens and padding never pay for the vocabulary projection."""
    base = unwrap(model)
    select = batch["targets"] != -100
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        return logits[select], batch["targets"][select]
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    return base.get_output_embeddings()(hidden[select]), batch["targets"][select]


def response_logits(
    model, sequences, attention_mask, prompt_width: int, temperature: float, trunk: Trunk | None = None
) -> torch.Tensor:
    """Temperature-scaled logits at the positions that predict each answer token of left-padded prompts
    followed by right-padded answers. With `trunk` (the hidden states after the model's first layers, from
    `trunk_hidden`) only the layers above it run. Returns (B, R, V) fp32."""
    hidden = response_hidden(model, sequences, attention_mask, prompt_width, trunk)
    return unembed(model, hidden, temperature)


def unembed(model, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled logits (..., V) in fp32 from the model's last hidden states (..., D)."""
    return unwrap(model).get_output_embeddings()(hidden).float() / temperature


def head_values(value_head, hidden: torch.Tensor) -> torch.Tensor:
    """A value head on the policy (`value_model: policy`) at hidden states (..., D) -> (...) in fp32."""
    return value_head(hidden)[..., 0].float()


def logits_and_values(
    model, value_head, sequences, attention_mask, prompt_width: int, temperature: float, trunk=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_logits` and, from the same hidden states, a value head on the policy (`value_model:
    policy`): one forward, and in the update one backward, for both. Returns ((B, R, V), (B, R)) fp32."""
    hidden = response_hidden(model, sequences, attention_mask, prompt_width, trunk)
    return unembed(model, hidden, temperature), head_values(value_head, hidden)


def response_hidden(
    model, sequences, attention_mask, prompt_width: int, trunk: Trunk | None = None
) -> torch.Tensor:
    """The causal LM's last hidden states (after the final norm) at the positions that predict each answer
    token: what `response_logits` unembeds, and what a value head on the policy reads. Returns (B, R, D)."""
    decoder = unwrap(model).get_decoder()
    prompts = sequences[:, :prompt_width]
    if trunk is None:
        hidden = _decode(decoder, attention_mask, prompts, input_ids=sequences)
    else:
        with _only_layers(decoder, trunk.layers, None):
            hidden = _decode(decoder, attention_mask, prompts, inputs_embeds=trunk.hidden)
    return hidden[:, prompt_width - 1 : -1]


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


def trunk_matches_full_forward(model, layers: int, vocab: int) -> bool:
    """Whether running the first `layers` layers, then the rest from their output, gives the full forward's
    logits for this model class (some decoders scale or mix their input embeddings, which a split would break).
    Checked once on a small random batch, adapters disabled where there are any."""
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as in a rollout batch
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), adapters:
        full = response_logits(model, ids, mask, 3, 1.0)
        split = response_logits(model, ids, mask, 3, 1.0, trunk_hidden(model, ids, mask, layers))
    return bool(torch.allclose(full, split, atol=1e-4, rtol=1e-4))


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


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for logits (B, R, V) and tokens (B, R). Returns (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


# --------------------------------------------------------------------------------------------------
# scalar-head models: the reward model and the value model


def backbone_hidden(
    model,
    input_ids,
    attention_mask,
    position_ids=None,
    trunk: Trunk | None = None,
    prompt_width: int = 0,
    **attention,
) -> torch.Tensor:
    """Last hidden states of a scalar-head model's transformer (PEFT-wrapped or not). (B, T, D); the mask
    is 2-D padding or a prepared (B, 1, T, T) mask; `attention` keywords reach the attention function. With
    `trunk` (the output of first layers this model shares, `shares_trunk`) only the layers above it run.
    With `prompt_width` (left-padded prompts, then answers) rows asking the same prompt run it once."""
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    prompts = input_ids[:, :prompt_width] if prompt_width else None
    if trunk is not None:
        with _only_layers(backbone, trunk.layers, None):
            return _decode(backbone, attention_mask, prompts, inputs_embeds=trunk.hidden)
    if prompts is not None and position_ids is None and not attention:
        return _decode(backbone, attention_mask, prompts, input_ids=input_ids)
    if position_ids is None:
        position_ids = positions(attention_mask)
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
    return unwrap(model).score(hidden)[..., 0].float()


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


def token_values(value_model, sequences, attention_mask, prompt_width: int, trunk: Trunk | None = None):
    """The value head at each state before an answer token. Returns (B, R) fp32."""
    hidden = backbone_hidden(value_model, sequences, attention_mask, trunk=trunk, prompt_width=prompt_width)
    return scalar_head(value_model, hidden[:, prompt_width - 1 : -1])


def sequence_scores(
    reward_model,
    sequences,
    attention_mask,
    last_index: torch.Tensor,
    trunk: Trunk | None = None,
    prompt_width: int = 0,
) -> torch.Tensor:
    """The reward head at each sequence's last answer token (its EOS when it stopped). Returns (B,). With
    `prompt_width` rows asking the same prompt run it once."""
    hidden = backbone_hidden(reward_model, sequences, attention_mask, trunk=trunk, prompt_width=prompt_width)
    return scalar_head(reward_model, hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index])


# --------------------------------------------------------------------------------------------------
# packed rows: a prompt forwarded once for its K answers

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
    ends = torch.tensor([len(t) for t in tails], device=device).cumsum(0) + shared - 1
    return scalar_head(model, hidden[0, ends])


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
