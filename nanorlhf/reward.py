"""The reward model: a transformer with a scalar head, read at the last real token,
trained on pairwise preferences with the Bradley-Terry loss.

Bradley & Terry 1952; as a reward model: Christiano et al. 2017, Ziegler et al. 2019,
Ouyang et al. 2022 (InstructGPT, Eq. 1).
"""
import torch
import torch.nn.functional as F

from nanorlhf.data import encode_prompts, left_pad, right_pad
from nanorlhf.model import join_prompt_response
from nanorlhf.ppo import last_token_index


# P(chosen > rejected) = sigmoid(r_c - r_r);  loss = -log sigmoid(r_c - r_r), averaged
def bradley_terry_loss(r_chosen, r_rejected, weights=None):
    """r_chosen, r_rejected (B,) -> scalar. weights (B,) give a weighted mean
    (InstructGPT weighs each of a prompt's C(k,2) pairs by 1/C(k,2))."""
    # BEGIN ASSIGNMENT bradley_terry_loss
    losses = -F.logsigmoid(r_chosen - r_rejected)
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()
    # END ASSIGNMENT


# soft targets p = P(chosen > rejected):  loss = -(p log sigmoid(d) + (1 - p) log sigmoid(-d)),  d = r_c - r_r
def soft_bradley_terry_loss(r_chosen, r_rejected, targets, weights=None):
    """The Bradley-Terry loss against soft labels (B,) in [0, 1] (Constitutional AI, Bai et al. 2022, trains
    on the feedback model's probabilities): the cross-entropy of sigmoid(r_c - r_r) with the targets.
    At targets 1 it is bradley_terry_loss; weights as there."""
    # BEGIN ASSIGNMENT soft_bradley_terry_loss
    d = r_chosen - r_rejected
    losses = -(targets * F.logsigmoid(d) + (1 - targets) * F.logsigmoid(-d))
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / weights.sum()
    # END ASSIGNMENT


def pair_targets(groups, device):
    """The soft label of each pair of encode_groups' batch, in its order ("p_chosen", 1.0 when absent) (B,)."""
    return torch.tensor([row.get("p_chosen", 1.0) for group in groups for row in group],
                        dtype=torch.float32, device=device)


def last_real_index(prompt_mask, response_mask):
    """Column of the last real token of left-padded prompt + right-padded response (B,):
    the last response token, or the last prompt column when the response is empty."""
    # BEGIN ASSIGNMENT reward_readout
    P = prompt_mask.size(1)
    last = last_token_index(response_mask)  # (B,), -1 for an empty response
    return torch.where(last >= 0, P + last, torch.full_like(last, P - 1))
    # END ASSIGNMENT


def score(model, prompt, prompt_mask, response, response_mask):
    """Raw scalar reward of each (prompt, response) (B,), read at the last real token."""
    idx, mask, pos = join_prompt_response(prompt, prompt_mask, response, response_mask)
    values = model(idx, position_ids=pos, attention_mask=mask)  # (B, P+N)
    return values.float().gather(1, last_real_index(prompt_mask, response_mask)[:, None]).squeeze(1)


def normalised_score(rm, gain, bias, prompt, prompt_mask, response, response_mask):
    """The reward every user of a trained RM sees (PPO, best-of-n, evaluation, sample.py): gain * raw + bias,
    with the checkpoint's gain and bias, which give mean 0 and std 1 on SFT samples (normaliser) (B,)."""
    return gain * score(rm, prompt, prompt_mask, response, response_mask) + bias


@torch.no_grad()
def normalised_scores(rm, gain, bias, batches, rt):
    """normalised_score of every response that sample_responses drew (its "batches"), on the CPU (M,)."""
    raw = []
    for b in batches:
        with rt.autocast():
            raw.append(score(rm, b["prompt"], b["prompt_mask"], b["tokens"], b["mask"]))
    return gain * torch.cat(raw).cpu() + bias


def response_ids(enc, row, key, max_response_tokens):
    """The tokens of row[key] ("chosen" or "rejected"), cut to max_response_tokens,
    ending with <|endoftext|> when the response ended."""
    ids = enc.encode_ordinary(row[key])
    if row.get(f"{key}_ended", True):
        ids = ids + [enc.eot_token]
    return ids[:max_response_tokens]


def encode_pairs(enc, rows, max_prompt_tokens, max_response_tokens, device):
    """Preference rows -> prompt (B, P), chosen (B, N), rejected (B, N) tensors with masks."""
    prompts = encode_prompts(enc, [r["prompt"] for r in rows], max_prompt_tokens)
    prompt, prompt_mask = left_pad(prompts, enc.eot_token, device)
    chosen, chosen_mask = right_pad([response_ids(enc, r, "chosen", max_response_tokens) for r in rows],
                                    enc.eot_token, device)
    rejected, rejected_mask = right_pad([response_ids(enc, r, "rejected", max_response_tokens) for r in rows],
                                        enc.eot_token, device)
    return prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask


def group_rows(rows):
    """Preference rows -> lists of rows, one per prompt's comparisons (rows sharing "group";
    a row without one is a group of its own), in order of first appearance."""
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("group", f"row {i}"), []).append(row)
    return list(groups.values())


def encode_groups(enc, groups, max_prompt_tokens, max_response_tokens, device):
    """Groups of rows -> each distinct (prompt, response) once, and the pairs as indices into them.

    InstructGPT (Ouyang et al. 2022, sec 3.5) puts all C(k, 2) comparisons of a prompt in one
    batch element: k forward passes instead of 2 * C(k, 2), and it no longer overfits as
    shuffled pairs do. Returns prompt (M, P), prompt_mask, response (M, N), response_mask and
    chosen, rejected (B,) indices into the M rows, with the rows' weights (B,)."""
    prompts, responses, chosen, rejected, weights = [], [], [], [], []
    for group in groups:
        index = {}  # (prompt, text, ended) -> its row in responses
        for row in group:
            pair = []
            for key in ("chosen", "rejected"):
                text = (row["prompt"], row[key], row.get(f"{key}_ended", True))
                if text not in index:
                    index[text] = len(responses)
                    prompts.append(row["prompt"])
                    responses.append(response_ids(enc, row, key, max_response_tokens))
                pair.append(index[text])
            chosen.append(pair[0])
            rejected.append(pair[1])
            weights.append(row.get("weight", 1.0))
    prompt, prompt_mask = left_pad(encode_prompts(enc, prompts, max_prompt_tokens), enc.eot_token, device)
    response, response_mask = right_pad(responses, enc.eot_token, device)
    as_tensor = lambda xs, dtype: torch.tensor(xs, dtype=dtype, device=device)
    return (prompt, prompt_mask, response, response_mask, as_tensor(chosen, torch.long),
            as_tensor(rejected, torch.long), as_tensor(weights, torch.float32))


def group_scores(model, batch):
    """Scores of the chosen and rejected responses of encode_groups' pairs -> (B,), (B,)."""
    prompt, prompt_mask, response, response_mask, chosen, rejected, _ = batch
    scores = score(model, prompt, prompt_mask, response, response_mask)
    return scores[chosen], scores[rejected]


def ranked_right(r_chosen, r_rejected):
    """Reward accuracy per pair: 1 where the reward prefers the chosen response, 1/2 for a tie (as the
    gold judge's ties count; DPO's implicit rewards all tie at step 1, when the policy is the reference)."""
    return (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()


def normaliser(raw_scores):
    """gain, bias so that gain * raw + bias has mean 0 and std 1 on these scores
    (Ziegler et al. 2019 normalise the reward on samples of the initial policy)."""
    if raw_scores.numel() < 2:
        raise ValueError(f"normaliser needs at least 2 scores to measure a spread, got {raw_scores.numel()}")
    std = raw_scores.float().std().clamp(min=1e-6)
    return float(1.0 / std), float(-raw_scores.float().mean() / std)
