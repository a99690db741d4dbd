"""nanorlhf/reward.py: the Bradley-Terry loss by hand, the read-out column under left/right
padding against rows run alone, pair scoring, and the normaliser."""
import math

import pytest
import torch

from conftest import TINY, left_padded, make_scalar_gpt
from nanorlhf.data import right_pad
from nanorlhf.reward import bradley_terry_loss, last_real_index, normaliser, pair_scores, score

PROMPT_LENGTHS = [3, 5, 1, 4]
RESPONSES = [[4, 7], [], [1, 2, 3, 5], [9]]  # right padded; row 1 is empty


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_loss_by_hand():
    r_c = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    r_r = torch.tensor([0.0, 0.5, 2.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    loss = bradley_terry_loss(r_c, r_r)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d loss / d r_c = -(1 - sigmoid(r_c - r_r)) / B
    expected_grad = [-(1 - sigmoid(d)) / 3 for d in (1.0, -1.0, 0.0)]
    assert r_c.grad.tolist() == pytest.approx(expected_grad, abs=1e-6)


def test_bradley_terry_loss_weighted_and_stable():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    weights = torch.tensor([1.0, 3.0])
    expected = (1 * math.log(1 + math.exp(-1)) + 3 * math.log(1 + math.exp(1))) / 4
    assert bradley_terry_loss(r_c, r_r, weights).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(r_c, r_r, torch.ones(2)).item() == pytest.approx(bradley_terry_loss(r_c, r_r).item())
    # large margins stay finite: log(1 + e^200) = 200 (no overflow to inf)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


def batch():
    prompt, prompt_mask = left_padded(PROMPT_LENGTHS, TINY["vocab_size"], seed=4)
    response, response_mask = right_pad(RESPONSES, pad_id=TINY["vocab_size"] - 1)
    return prompt, prompt_mask, response, response_mask


def test_last_real_index_under_left_and_right_padding():
    prompt, prompt_mask, response, response_mask = batch()
    P = prompt.size(1)
    expected = []
    for b in range(len(RESPONSES)):  # the obviously-correct loop: scan the joined mask for the last 1
        joined = prompt_mask[b].tolist() + response_mask[b].tolist()
        expected.append(max(i for i, m in enumerate(joined) if m))
    assert last_real_index(prompt_mask, response_mask).tolist() == expected
    assert expected == [P + 1, P - 1, P + 3, P + 0]  # row 1: empty response -> the last prompt column


def test_score_reads_the_last_real_token_like_each_row_alone():
    model = make_scalar_gpt(seed=1)
    prompt, prompt_mask, response, response_mask = batch()
    scores = score(model, prompt, prompt_mask, response, response_mask)
    for b, (n, resp) in enumerate(zip(PROMPT_LENGTHS, RESPONSES)):
        alone = torch.cat([prompt[b, -n:], torch.tensor(resp, dtype=torch.long)])[None]  # (1, n + len), no padding
        assert scores[b].item() == pytest.approx(model(alone)[0, -1].item(), abs=1e-5), b
    # the check can fail: the last column of the padded batch is another number for short rows
    values = model(torch.cat([prompt, response], 1), attention_mask=torch.cat([prompt_mask, response_mask], 1))
    assert not torch.allclose(values[:, -1], scores, atol=1e-3)


def test_pair_scores_equal_separate_scores_at_different_widths():
    model = make_scalar_gpt(seed=2)
    prompt, prompt_mask, chosen, chosen_mask = batch()
    rejected, rejected_mask = right_pad([[3], [5, 6, 7, 8, 1, 2], [2], []], pad_id=0)  # wider than chosen
    r_c, r_r = pair_scores(model, (prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask))
    assert torch.allclose(r_c, score(model, prompt, prompt_mask, chosen, chosen_mask), atol=1e-5)
    assert torch.allclose(r_r, score(model, prompt, prompt_mask, rejected, rejected_mask), atol=1e-5)


def test_normaliser_gives_mean_zero_std_one():
    raw = torch.tensor([3.0, -1.0, 0.5, 7.0, 2.0])
    gain, bias = normaliser(raw)
    normalised = gain * raw + bias
    assert normalised.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert normalised.std().item() == pytest.approx(1.0, abs=1e-6)
    gain, bias = normaliser(torch.full((4,), 2.5))  # constant scores: finite, not a division by zero
    assert math.isfinite(gain) and math.isfinite(bias)
    assert gain * 2.5 + bias == pytest.approx(0.0, abs=1e-6)
