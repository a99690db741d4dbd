"""Assignment reward_readout (nanorlhf/reward.py): the reward is read at the last real token of
left-padded prompt + right-padded response. docs/design.md detail 2. The model here is a stand-in without
attention, so these tests need no other assignment."""
import torch

from conftest import TINY, left_padded
from nanorlhf.data import right_pad
from nanorlhf.reward import last_real_index, score

PROMPT_LENGTHS = [3, 5, 1, 4]
RESPONSES = [[4, 7], [], [1, 2, 3, 5], [9]]  # right padded; row 1 is empty
PAD = TINY["vocab_size"] - 1


class PositionTokenValue(torch.nn.Module):
    """A stand-in scalar model: the value at a column is 100 * its position id + its token id,
    so a score tells at which position and token it was read."""

    def forward(self, idx, position_ids=None, attention_mask=None):
        return 100.0 * position_ids + idx  # (B, T)


def batch():
    prompt, prompt_mask = left_padded(PROMPT_LENGTHS, TINY["vocab_size"], seed=4)
    response, response_mask = right_pad(RESPONSES, pad_id=PAD)
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
    model = PositionTokenValue()
    prompt, prompt_mask, response, response_mask = batch()
    scores = score(model, prompt, prompt_mask, response, response_mask)
    for b, (n, resp) in enumerate(zip(PROMPT_LENGTHS, RESPONSES)):
        alone = torch.cat([prompt[b, -n:], torch.tensor(resp, dtype=torch.long)])  # no padding: positions 0, 1, ...
        assert scores[b].item() == 100.0 * (len(alone) - 1) + alone[-1].item(), b
    # the check can fail: the last column of the padded batch is another number for short rows
    idx = torch.cat([prompt, response], 1)
    pos = (torch.cat([prompt_mask, response_mask], 1).cumsum(1) - 1).clamp(min=0)
    assert not torch.equal(model(idx, pos)[:, -1], scores)


# ---------------------------------------------------------------- one test per common bug

def test_reward_readout_short_response_is_read_at_its_last_real_token():
    prompt_mask = torch.tensor([[1, 1]])
    response_mask = torch.tensor([[1, 1, 0, 0]])
    assert last_real_index(prompt_mask, response_mask).tolist() == [3], \
        "a 2-token response after a 2-column prompt ends at column 3, not at the last (padding) column"


def test_reward_readout_counts_the_left_padding_of_the_prompt():
    prompt_mask = torch.tensor([[0, 0, 1]])   # one real prompt token after two pads
    response_mask = torch.tensor([[1, 0]])
    assert last_real_index(prompt_mask, response_mask).tolist() == [3], \
        "the response starts at column P = the prompt's padded width (3 here), however many prompt tokens are real"


def test_reward_readout_empty_response_is_read_at_the_last_prompt_column():
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    response_mask = torch.tensor([[0, 0], [1, 0]])
    assert last_real_index(prompt_mask, response_mask).tolist() == [2, 3], \
        "an empty response is read at the last prompt column, P - 1"


def test_reward_readout_is_a_long_tensor_of_shape_b():
    out = last_real_index(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
    assert out.shape == (3,) and out.dtype == torch.long, \
        f"expected a (B,) long tensor, got {out.dtype} {tuple(out.shape)}"
