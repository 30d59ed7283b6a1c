"""The token sampler: exact distribution, never a token of probability 0, reproducible from a seed."""

import torch

from chatrlhf.generation import sample_tokens


def _draws(probs: list[float], n: int, seed: int) -> torch.Tensor:
    rows = torch.tensor(probs).repeat(n, 1)
    return sample_tokens(rows, torch.Generator().manual_seed(seed))


def test_frequencies_match_the_probabilities():
    probs = [0.5, 0.0, 0.3, 0.15, 0.05]
    n = 40_000
    counts = torch.bincount(_draws(probs, n, 0), minlength=len(probs)).double() / n
    for k, p in enumerate(probs):
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(counts[k].item() - p) <= 5 * sigma + 1e-12, (k, counts[k].item(), p)
    assert counts[1] == 0


def test_zero_probability_tokens_at_either_end_are_never_drawn():
    assert set(_draws([0.0, 0.0, 1.0, 0.0], 5000, 1).tolist()) == {2}
    assert set(_draws([0.0, 0.7, 0.3, 0.0, 0.0], 5000, 2).tolist()) == {1, 2}


def test_unnormalised_rows_and_a_large_vocabulary():
    # rows that do not sum to 1 (rounding in softmax) are sampled in proportion; the vocabulary of the
    # default model
    probs = torch.zeros(4, 49152)
    probs[:, 17] = 2.0
    probs[:, 49151] = 2.0
    drawn = sample_tokens(probs.repeat(500, 1), torch.Generator().manual_seed(3))
    assert set(drawn.tolist()) == {17, 49151}
    assert 0.45 < (drawn == 17).double().mean().item() < 0.55


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(4))
    probs = logits.softmax(-1)
    a = sample_tokens(probs, torch.Generator().manual_seed(5))
    b = sample_tokens(probs, torch.Generator().manual_seed(5))
    c = sample_tokens(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
