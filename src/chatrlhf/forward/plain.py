"""Plain model forwards: what SFT, the reward model, PPO, the judges and eval compute with a model, written
once.

    language model   collate + target_logits (LM losses), response_logits + gather_logprobs (answer log-probs),
                     response_hidden + unembed, logits_and_values (a value head on the policy)
    scalar head      backbone_hidden, scalar_head, reward_scores, token_values, sequence_scores

Rows sharing a prompt, and a trunk of first layers computed once, are handled by `sharing`, below these;
`trunk_matches_full_forward`, which checks a trunk split against the full `response_logits`, is here.
Every function takes a model that may be wrapped by PEFT, and token tensors already on its device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from chatrlhf.data import Sample
from chatrlhf.forward.sharing import Trunk, _decode, _only_layers, positions, trunk_hidden
from chatrlhf.models import unwrap

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
    """A value head on the policy (`value_on_policy: true`) at hidden states (..., D) -> (...) in fp32."""
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


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) for logits (B, R, V) and tokens (B, R). Returns (B, R)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


def answer_logprobs(
    model, sequences: Sequence[list[int]], answer_start: int, pad_id: int, device
) -> torch.Tensor:
    """log p(answer | prompt) of each sequence: the sum of the causal LM's log-probs of its tokens from
    `answer_start` on (right padding, masked; logits only where an answer token is predicted). (N,) fp32."""
    ids, mask = right_padded(sequences, pad_id, device)
    width = ids.shape[1]
    hidden = backbone_hidden(model, ids, mask)
    predicts = mask[:, answer_start:].bool()  # (N, width - answer_start): the answer tokens
    rows = torch.arange(len(sequences), device=device)[:, None].expand_as(predicts)[predicts]
    cols = torch.arange(answer_start, width, device=device)[None, :].expand_as(predicts)[predicts]
    logprobs = gather_logprobs(unembed(model, hidden[rows, cols - 1], 1.0), ids[rows, cols])
    return torch.zeros(len(sequences), device=device).index_add(0, rows, logprobs)


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
    ids, mask = right_padded(sequences, pad_id, device)
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 0].float()


def right_padded(sequences: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as (N, T) ids right-padded with `pad_id` and their (N, T) attention mask, on `device`."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


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
