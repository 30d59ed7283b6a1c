"""The one generation engine: PPO rollouts, sampling for labeling, evaluation, chat and serving use it.

Prompts are left-padded into one batch and prefilled once each: rows asking the same prompt (k answers per
prompt, as PPO, sampling and eval ask) share one prefill, whose KV cache is then copied to each of them. The
batch is then decoded token by token over the KV cache with only the last position's logits computed, by
`decode_step`'s lean step for Llama-family models (the model's forward for the rest). A
sequence stops at EOS (kept as its last token) and leaves the batch, KV cache included, so the rest decode
without it; its remaining positions hold the pad token, which is distinct from EOS. The sampled tokens'
log-probs (under the temperature-scaled distribution, before top-k/top-p filtering, as PPO recomputes them)
come back too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chatrlhf.configs import SamplingConfig
from chatrlhf.decode_step import stepper
from chatrlhf.errors import UserError
from chatrlhf.forward import cache_keyword, distinct_rows, positions
from chatrlhf.kv_cache import RoomyCache
from chatrlhf.models import unwrap


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on prompt tokens
    response_ids: torch.Tensor  # (B, R) right-padded with pad; EOS kept where reached
    response_mask: torch.Tensor  # (B, R) 1 on response tokens, EOS included
    logprobs: torch.Tensor  # (B, R) log-prob of each sampled token, 0 on padding
    finished: torch.Tensor  # (B,) True where the response ended with EOS
    # with `keep_trunk=L`: (B, P+R, D) the hidden states entering decoder layer L at every position, as a
    # full forward of `sequences` computes them (zeros where a row had finished); PPO's shared trunk
    trunk: torch.Tensor | None = None

    @property
    def sequences(self) -> torch.Tensor:
        """(B, P+R) each prompt followed by its response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P+R) 1 on prompt and response tokens."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    def token_lists(self, eos_id: int) -> list[list[int]]:
        """Each response's ids without padding and without the final EOS."""
        return response_token_lists(self, eos_id)

    def texts(self, tokenizer) -> list[str]:
        """Each response as text, special tokens left out."""
        return [
            tokenizer.decode(ids, skip_special_tokens=True)
            for ids in self.token_lists(tokenizer.eos_token_id)
        ]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_tokens(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` (B, V), drawn by inverting the cumulative distribution with one uniform
    number per row from `generator`. Exact like `torch.multinomial` (which is much slower on a CPU at a large
    vocabulary), and a token of probability 0 is never drawn. A row with no distribution (its sum NaN,
    infinite or zero: the model's logits were not finite) stops with a UserError."""
    cumulative = probs.cumsum(-1)
    total = cumulative[:, -1:]
    broken = ~torch.isfinite(total[:, 0]) | (total[:, 0] <= 0)
    if broken.any():
        rows = broken.nonzero()[:, 0].tolist()
        raise UserError(
            f"sampling: {len(rows)} of {len(total)} rows have no next-token distribution (rows {rows[:8]}, "
            f"sum {total[rows[0], 0].item()}): the model's logits are NaN or infinite, so its weights have "
            "diverged (in training, try a lower lr)"
        )
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=total.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    # the first index whose cumulative sum exceeds u: there the sum rose, so that token's probability is > 0
    return torch.searchsorted(cumulative, u, right=True)[:, 0]


def cache_argument(model) -> str:
    """Newer transformers name the KV-cache argument `cache`, older ones `past_key_values`."""
    return cache_keyword(type(unwrap(model)))


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
    share_prefill: bool = True,
    keep_trunk: int = 0,
) -> Generation:
    """Continue each prompt (token ids) until EOS or max_new_tokens. Rows with the same prompt share its
    prefill unless `share_prefill` is off (the result is the same up to float rounding). With `keep_trunk`
    > 0 the hidden states entering that decoder layer, which decoding computes anyway, come back as
    `Generation.trunk`, so a model sharing those first layers need not run them again.

    `on_step(tokens (B,), alive (B,))` sees every new token as it is chosen (streaming); it may return a
    (B,) bool tensor of rows to stop now (a stop sequence was met), keeping that token.
    """
    with _LayerInput(model, keep_trunk) as seen:
        return _generate(model, prompts, sampling, eos_id, pad_id, generator, on_step, share_prefill, seen)


def _generate(
    model, prompts, sampling, eos_id, pad_id, generator, on_step, share_prefill, seen
) -> Generation:
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    batch = ids.shape[0]
    key = cache_argument(model)
    cache = {key: RoomyCache()}
    step_logits = _prefill(model, prompts, ids, mask, cache, share_prefill, seen)
    step = stepper(model, key, seen.layer)
    next_pos = positions(mask)[:, -1:] + 1
    attention = mask
    # rows still decoding; a finished row leaves the batch (and its KV cache) so later steps skip its work,
    # with `keep_trunk` after one more forward, which gives its last token's trunk state
    active = torch.arange(batch, device=device)
    tokens, logprobs, alive = [], [], torch.ones(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    for _ in range(sampling.max_new_tokens):
        chosen, chosen_logp = _choose(
            step_logits, sampling, generator, eos_id, len(tokens) < sampling.min_new_tokens
        )
        token = torch.full((batch,), pad_id, dtype=chosen.dtype, device=device).index_put_((active,), chosen)
        logprob = torch.zeros(batch, device=device).index_put_((active,), chosen_logp)
        tokens.append(token)
        logprobs.append(logprob)
        was_alive = alive
        lengths = lengths + was_alive.long()
        alive = alive & (token != eos_id)
        if on_step is not None:
            stop = on_step(token, was_alive)
            if stop is not None:
                alive = alive & ~stop.to(alive.device)
        if not seen.layer:
            if not alive.any() or len(tokens) == sampling.max_new_tokens:
                break  # the last tokens' forward would feed nothing
            active, chosen, attention, next_pos = _leave(
                cache, alive[active], active, chosen, attention, next_pos
            )
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        step_logits = step(chosen, attention, next_pos, cache[key])
        seen.take_step(active, step.trunk)
        next_pos = next_pos + 1
        if seen.layer:  # rows that finished stayed for their last token's trunk state; they leave now
            if not alive.any():
                break
            active, step_logits, attention, next_pos = _leave(
                cache, alive[active], active, step_logits, attention, next_pos
            )
    response = torch.stack(tokens, dim=1)
    # a row's response runs up to and including its EOS (or the token where it was stopped)
    response_mask = (torch.arange(response.shape[1], device=device)[None, :] < lengths[:, None]).long()
    logprobs = torch.stack(logprobs, 1) * response_mask
    trunk = seen.trunk(batch, response.shape[1])
    return Generation(ids, mask, response, response_mask, logprobs, ~alive, trunk)


@dataclass
class Continuation:
    ids: list[int]  # the response's ids, without the final EOS
    finished: bool  # it ended with EOS (else it reached max_new_tokens)


@torch.no_grad()
def generate_each(
    model,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    eos_id: int,
    pad_id: int,
    slots: int,
    generator: torch.Generator | None = None,
    on_done: Callable[[int, Continuation], None] | None = None,
) -> list[Continuation]:
    """Continue every prompt as `generate` does, at most `slots` rows at a time, with continuous batching:
    a row that ends leaves, and waiting prompts are prefilled into the free slots, so the batch stays full
    instead of decoding on with fewer and fewer rows behind its longest answer. For queues of prompts whose
    answers differ in length (evaluation, IFEval). `on_done(index, continuation)` hears each as it ends."""
    device = next(model.parameters()).device
    key = cache_argument(model)
    step = stepper(model, key)
    waiting = list(range(len(prompts)))[::-1]
    done: list[Continuation | None] = [None] * len(prompts)
    live: list[int] = []  # the prompt of each row
    answers: list[list[int]] = []
    state = None  # (cache, attention (B, W), next_pos (B, 1), step_logits (B, V)) of the live rows
    refill = max(1, slots // 8)  # a prefill is a forward of its own: admit prompts a few at a time
    while waiting or live:
        free = slots - len(live)
        if waiting and (free >= refill or len(waiting) <= free or not live):
            new = [waiting.pop() for _ in range(min(free, len(waiting)))]
            state = _admit(model, key, [prompts[i] for i in new], pad_id, device, state)
            live, answers = live + new, answers + [[] for _ in new]
        cache, attention, next_pos, step_logits = state
        short = torch.tensor([len(a) < sampling.min_new_tokens for a in answers], device=device)
        chosen, _ = _choose(step_logits, sampling, generator, eos_id, short, logprobs=False)
        keep = []
        for row, token in enumerate(chosen.tolist()):
            if token != eos_id:
                answers[row].append(token)
            if token == eos_id or len(answers[row]) == sampling.max_new_tokens:
                done[live[row]] = Continuation(answers[row], token == eos_id)
                if on_done is not None:
                    on_done(live[row], done[live[row]])
            else:
                keep.append(row)
        live, answers = [live[r] for r in keep], [answers[r] for r in keep]
        if not live:
            state = None
            continue
        if len(keep) < len(chosen):
            kept = torch.tensor(keep, device=device)
            cache[key].batch_select_indices(kept)
            chosen, attention, next_pos = chosen[kept], attention[kept], next_pos[kept]
        attention = _trim(cache[key], torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1))
        state = (cache, attention, next_pos + 1, step(chosen, attention, next_pos, cache[key]))
    return done


def _admit(model, key: str, prompts, pad_id: int, device, state):
    """Prefill `prompts` and add them to the live rows' `state`: the narrower of the two KV caches and masks
    is padded on the left (masked out) to the other's width, then the rows are stacked."""
    ids, mask = left_pad(prompts, pad_id, device)
    cache = {key: RoomyCache()}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1, **cache)  # fmt: skip
    new = (cache, mask, positions(mask)[:, -1:] + 1, out.logits[:, -1, :])
    if state is None:
        return new
    old_cache, old_mask = state[0][key], state[1]
    width = max(old_mask.shape[1], mask.shape[1])
    for old_layer, new_layer in zip(old_cache.layers, cache[key].layers):
        for name in ("keys", "values"):
            a, b = getattr(old_layer, name), getattr(new_layer, name)
            a = torch.nn.functional.pad(a, (0, 0, width - a.shape[-2], 0))
            b = torch.nn.functional.pad(b, (0, 0, width - b.shape[-2], 0))
            setattr(old_layer, name, torch.cat([a, b]))
    masks = [torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in (old_mask, mask)]
    return (state[0], torch.cat(masks), torch.cat([state[2], new[2]]), torch.cat([state[3], new[3]]))


def _trim(cache, attention: torch.Tensor) -> torch.Tensor:
    """Drop the leading columns no row attends to (left padding that a long row's leaving freed) from the
    KV cache; returns the mask without them."""
    lead = int(attention.any(0).long().argmax())
    if lead == 0:
        return attention
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
    return attention[:, lead:]


def _choose(
    step_logits, sampling: SamplingConfig, generator, eos_id: int, block_eos, logprobs: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each row's next token from its logits (B, V) and the token's log-prob under the temperature-scaled
    distribution (before top-k/top-p, as PPO's training forward recomputes it). EOS is never chosen where
    `block_eos` (a bool for every row, or a (B,) mask) holds: `min_new_tokens` is not reached yet. Without
    `logprobs` (a caller that keeps only the tokens) no log-softmax over the vocabulary is computed."""
    logits = step_logits.float() / (sampling.temperature or 1.0)
    logp = torch.log_softmax(logits, dim=-1) if logprobs else None
    if isinstance(block_eos, torch.Tensor):
        logits[block_eos, eos_id] = float("-inf")
    elif block_eos:
        logits[:, eos_id] = float("-inf")
    if sampling.temperature > 0:
        chosen = sample_tokens(_filter(logits, sampling.top_k, sampling.top_p).softmax(-1), generator)
    else:
        chosen = logits.argmax(-1)
    return chosen, None if logp is None else logp.gather(1, chosen[:, None])[:, 0]


def _prefill(model, prompts, ids, mask, cache: dict, share: bool, seen: _LayerInput) -> torch.Tensor:
    """Prefill the left-padded prompts `ids` into `cache`, once per distinct prompt when `share` (its KV
    cache and logits then go to each of its rows); returns each row's next-token logits (B, V)."""
    batch = ids.shape[0]
    distinct, inverse = distinct_rows(prompts) if share else (list(range(batch)), None)
    pick = torch.tensor(distinct, device=ids.device)
    out = model(
        input_ids=ids[pick],
        attention_mask=mask[pick],
        position_ids=positions(mask[pick]),
        use_cache=True,
        logits_to_keep=1,
        **cache,
    )
    logits, spread = out.logits[:, -1, :], None
    if len(distinct) < batch:
        spread = torch.tensor(inverse, device=ids.device)
        next(iter(cache.values())).batch_select_indices(spread)
        logits = logits[spread]
    seen.take_prompt(spread)
    return logits


def _leave(cache: dict, keep: torch.Tensor, *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows where `keep` (over the batch as it decodes now) is True, of `rows` and of the KV cache."""
    if keep.all():
        return rows
    kept = keep.nonzero()[:, 0]
    next(iter(cache.values())).batch_select_indices(kept)
    return tuple(t[kept] for t in rows)


class _LayerInput:
    """Within the block, records the hidden states entering decoder layer `layer` of `model` at each forward
    of a generation (nothing when `layer` is 0), and assembles them into one (B, P+R, D) tensor."""

    def __init__(self, model, layer: int):
        self.layer, self.model = layer, model
        self.last: torch.Tensor | None = None
        self.prompt: torch.Tensor | None = None
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> _LayerInput:
        if self.layer:
            layers = unwrap(self.model).get_decoder().layers
            if not 0 < self.layer < len(layers):
                raise ValueError(f"keep_trunk {self.layer}: the decoder has {len(layers)} layers")
            self.handle = layers[self.layer].register_forward_pre_hook(self._keep, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.layer:
            self.handle.remove()

    def _keep(self, module, args, kwargs) -> None:
        self.last = args[0] if args else kwargs["hidden_states"]

    def take_prompt(self, spread: torch.Tensor | None) -> None:
        """After the prefill; `spread` maps each row to its distinct prompt's place when they shared it."""
        if self.layer:
            self.prompt = self.last if spread is None else self.last[spread]

    def take_step(self, active: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """After a decoding forward of the rows `active`, one new token each; `hidden` is the layer's input
        where the step did not run the layer's module (the lean step), else the hook saw it."""
        if self.layer:
            self.steps.append((active, (self.last if hidden is None else hidden)[:, 0]))

    def trunk(self, batch: int, length: int) -> torch.Tensor | None:
        if not self.layer:
            return None
        width = self.prompt.shape[1]
        out = self.prompt.new_zeros(batch, width + length, self.prompt.shape[2])
        out[:, :width] = self.prompt
        for t, (active, hidden) in enumerate(self.steps):
            out[active, width + t] = hidden
        return out


def response_token_lists(gen: Generation, eos_id: int) -> list[list[int]]:
    """Each response's ids without padding and without the final EOS."""
    rows = []
    for ids, m in zip(gen.response_ids.tolist(), gen.response_mask.tolist()):
        row = [t for t, keep in zip(ids, m) if keep]
        rows.append(row[:-1] if row and row[-1] == eos_id else row)
    return rows
