"""Direct Preference Optimization: the reward model and the RL step folded into one loss.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model".
The implicit reward of a response is r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)); plugging it
into the Bradley-Terry model of preferences gives a classification loss on pairs, no sampling needed.
"""
import torch.nn.functional as F


# L = -log sigmoid( beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))) )
#                                                                      (Rafailov et al. 2023, Eq. 7)
# r_w = beta * (log pi(y_w) - log pi_ref(y_w)),  r_l likewise          (Sec. 5, the implicit reward)
def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Each input (B,): log-probability of a whole response, summed over its real tokens.

    Returns losses (B,) (take .mean() to train), chosen_rewards (B,), rejected_rewards (B,),
    the rewards detached: they are for logging (reward accuracy = chosen > rejected, margin).
    """
    # BEGIN ASSIGNMENT dpo_loss
    chosen_logratios = policy_chosen_logps - ref_chosen_logps          # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps    # (B,)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards
    # END ASSIGNMENT
