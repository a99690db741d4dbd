"""nanorlhf/reward.py: grouped pair scoring with nanorlhf's GPT, and the normaliser. The assignments
bradley_terry_loss and reward_readout are tested in tests/assignments/."""
import math

import pytest
import torch

from conftest import make_scalar_gpt
from nanorlhf.reward import encode_groups, encode_pairs, group_rows, group_scores, normaliser, ranked_right, score
from nanorlhf.tokenizer import make_encoding, train_bpe


def test_normaliser_gives_mean_zero_std_one():
    raw = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0])
    gain, bias = normaliser(raw)
    normalised = gain * raw + bias
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-6)
    gain, bias = normaliser(torch.full((4,), 2.5))  # constant scores: finite, not a division by zero
    assert math.isfinite(gain) and math.isfinite(bias)
    assert gain * 2.5 + bias == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 scores"):  # one score's std is nan: a nan reward for PPO
        normaliser(torch.tensor([1.0]))


def test_group_scores_equal_pair_by_pair_scores_and_score_each_response_once():
    """A prompt's C(k, 2) pairs in one batch element: the same scores as scoring every pair's
    chosen and rejected response on its own, from one forward pass per distinct response."""
    text = "the cat sat on the mat and the dog ran. " * 4
    enc = make_encoding(train_bpe(text, 270), "bpe-test")
    model = make_scalar_gpt(seed=3, vocab_size=enc.n_vocab)
    a, b, c = " a happy cat", " the dog ran on", " mat"
    rows = [  # prompt 0 ranks three responses (3 pairs); prompt 1 has one pair and no "group" key
        {"prompt": "the cat", "chosen": a, "rejected": b, "group": 0, "weight": 1 / 3},
        {"prompt": "the cat", "chosen": a, "rejected": c, "group": 0, "weight": 1 / 3,
         "rejected_ended": False},
        {"prompt": "the cat", "chosen": b, "rejected": c, "group": 0, "weight": 1 / 3,
         "rejected_ended": False},
        {"prompt": "a dog", "chosen": c, "rejected": a},
    ]
    groups = group_rows(rows)
    assert [len(g) for g in groups] == [3, 1]
    batch = encode_groups(enc, groups, 8, 12, "cpu")
    assert batch[2].size(0) == 3 + 2  # distinct (prompt, response, ended): a, b, c unended; then c, a
    assert batch[-1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    with torch.no_grad():
        r_c, r_r = group_scores(model, batch)
        prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask = encode_pairs(enc, rows, 8, 12, "cpu")
        p_c = score(model, prompt, prompt_mask, chosen, chosen_mask)
        p_r = score(model, prompt, prompt_mask, rejected, rejected_mask)
    assert torch.allclose(r_c, p_c, atol=1e-5) and torch.allclose(r_r, p_r, atol=1e-5)
    assert not torch.allclose(r_c, r_r)  # the pairs are really different responses


def test_ranked_right_counts_ties_as_half():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, 0.5, 0.0])
    assert ranked_right(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 0.5]
