"""The mutation check's wrong answers to the pg track's pieces (RLOO's leave-one-out baseline, GRPO's group
advantages, the k3 estimator), kept apart from nanorlhf/mutants.py for length; that module adds them to its
lists. Never copied into a student copy. Each entry: (assignment, the test that must catch it, the mistake in
words, (old, new), ...)."""

PG_TARGETS = {
    "kl_k3": ("nanorlhf.pg", "kl_k3"),
    "leave_one_out_baseline": ("nanorlhf.pg", "leave_one_out_baseline"),
    "group_advantages": ("nanorlhf.pg", "group_advantages"),
}

GROUP_SUMS = "rewards, valid, total, n = _group_sums(rewards, valid)"
# the padding masked by multiplying by valid: nan * 0 is nan, so an invalid slot's junk leaks into the sums
MULTIPLIED = ("valid = valid.to(rewards.dtype); rewards = rewards * valid; "
              "total, n = rewards.sum(1, keepdim=True), valid.sum(1, keepdim=True)")

PG_MUTANTS = [  # each caught by its named test
    # ---- kl_k3
    ("kl_k3", "test_kl_k3_log_ratio_is_ref_minus_policy", "k3 with the log-ratio the wrong way round",
     ("log_ratio = ref_logprobs - logprobs", "log_ratio = logprobs - ref_logprobs")),
    ("kl_k3", "test_kl_k3_is_never_negative", "k3 with its sign flipped",
     ("return torch.expm1(log_ratio) - log_ratio", "return log_ratio - torch.expm1(log_ratio)")),
    ("kl_k3", "test_kl_k3_is_zero_where_the_policies_agree", "r instead of r - 1 (off by one everywhere)",
     ("torch.expm1(log_ratio)", "torch.exp(log_ratio)")),
    ("kl_k3", "test_kl_k3_carries_the_gradient", "k3 detached from the policy",
     ("log_ratio = ref_logprobs - logprobs", "log_ratio = (ref_logprobs - logprobs).detach()")),
    # ---- leave_one_out_baseline
    ("leave_one_out_baseline", "test_rloo_baseline_leaves_out_the_sample_itself", "the sample's own reward inside its baseline",
     ("baseline = (total - rewards) / (n - 1).clamp(min=1)", "baseline = total / n.clamp(min=1)")),
    ("leave_one_out_baseline", "test_rloo_never_reads_invalid_members", "RLOO: invalid slots masked by multiplying (nan leaks)",
     (GROUP_SUMS, MULTIPLIED)),
    ("leave_one_out_baseline", "test_rloo_counts_only_valid_members", "RLOO: n - 1 taken as k - 1 in ragged groups",
     ("(n - 1).clamp(min=1)", "(rewards.shape[1] - 1)")),
    ("leave_one_out_baseline", "test_rloo_group_of_one_has_baseline_zero", "RLOO: a group of one divides by zero",
     ("(n - 1).clamp(min=1)", "(n - 1)")),
    ("leave_one_out_baseline", "test_rloo_is_zero_where_not_valid", "RLOO: baselines left on invalid slots",
     ("return baseline * valid", "return baseline")),
    # ---- group_advantages
    ("group_advantages", "test_grpo_std_uses_bessels_correction", "GRPO: the std with ddof 0 (divides by n)",
     ("/ (n - 1).clamp(min=1)).sqrt()", "/ n.clamp(min=1)).sqrt()")),
    ("group_advantages", "test_grpo_eps_is_added_outside_the_root", "GRPO: eps inside the square root",
     ("/ (n - 1).clamp(min=1)).sqrt()", "/ (n - 1).clamp(min=1) + eps).sqrt()"), ("(std + eps)", "std")),
    ("group_advantages", "test_grpo_uses_the_eps_it_is_given", "GRPO: eps hard-coded to 1e-4",
     ("(std + eps)", "(std + 1e-4)")),
    ("group_advantages", "test_dr_grpo_does_not_divide_by_the_std", "Dr. GRPO: scale_by_std ignored",
     ("if scale_by_std:", "if True:")),
    ("group_advantages", "test_grpo_never_reads_invalid_members", "GRPO: invalid slots masked by multiplying (nan leaks)",
     (GROUP_SUMS, MULTIPLIED)),
    ("group_advantages", "test_grpo_mean_over_valid_members_only", "GRPO: the mean over all k slots",
     ("mean = total / n.clamp(min=1)", "mean = total / rewards.shape[1]")),
    ("group_advantages", "test_grpo_is_zero_where_not_valid", "GRPO: advantages left on invalid slots",
     ("centred = (rewards - mean) * valid", "centred = rewards - mean")),
]

# Right answers written another way: every test must pass with them.
PG_ACCEPTED = [
    ("kl_k3", "", "exp(log r) - 1 instead of expm1",
     ("return torch.expm1(log_ratio) - log_ratio", "return torch.exp(log_ratio) - 1 - log_ratio")),
]
