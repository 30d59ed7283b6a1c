"""Model forward passes, below every stage: what SFT, the reward model, PPO, the judges and eval compute with a
model, written once.

    plain           language model: collate + target_logits (LM losses), response_logits + gather_logprobs
                    (answer log-probs), answer_logprobs (a whole answer's); scalar head: backbone_hidden, scalar_head, reward_scores,
                    token_values, sequence_scores
    sharing         rows asking the same prompt run it once (prompt_groups, distinct_rows); trunk_hidden (the
                    first layers' output, for models that share them: Trunk, shares_trunk)
    packed          shared_prompt_scores, shared_prompt_logprobs: one prompt and its K answers in one row,
                    each answer attending to the prompt and to itself (segment attention)

Every function takes a model that may be wrapped by PEFT, and token tensors already on its device.
"""

from chatrlhf.forward.packed import (
    PACK_LIMIT,
    SEGMENT_ATTENTION,
    PackedRow,
    segment_attention,
    segment_attention_on,
    shared_prompt_logprobs,
    shared_prompt_scores,
)
from chatrlhf.forward.plain import (
    answer_logprobs,
    backbone_hidden,
    collate,
    gather_logprobs,
    head_values,
    logits_and_values,
    response_hidden,
    response_logits,
    reward_scores,
    scalar_head,
    sequence_scores,
    target_logits,
    token_values,
    trunk_matches_full_forward,
    unembed,
)
from chatrlhf.forward.sharing import (
    Trunk,
    cache_keyword,
    distinct_rows,
    positions,
    prompt_groups,
    shares_trunk,
    trunk_hidden,
)

__all__ = [
    "answer_logprobs",
    "PACK_LIMIT",
    "SEGMENT_ATTENTION",
    "PackedRow",
    "Trunk",
    "backbone_hidden",
    "cache_keyword",
    "collate",
    "distinct_rows",
    "gather_logprobs",
    "head_values",
    "logits_and_values",
    "positions",
    "prompt_groups",
    "response_hidden",
    "response_logits",
    "reward_scores",
    "scalar_head",
    "segment_attention",
    "segment_attention_on",
    "sequence_scores",
    "shared_prompt_logprobs",
    "shared_prompt_scores",
    "shares_trunk",
    "target_logits",
    "token_values",
    "trunk_hidden",
    "trunk_matches_full_forward",
    "unembed",
]
