"""The instructor's mutation check: plausible wrong answers to each assignment, each of which a named test
must catch (`python -m nanorlhf.assignments mutants [NAME...]`). Never copied into a student copy.

A mutant is a text edit of the reference solution inside its region; the edited module is executed
afresh and its function's code swapped into the real function while the assignment's tests run (one
pytest session, tests collected once). ACCEPTED lists right answers written differently: they must pass.
To add an assignment: its (module, function) in TARGETS, and one line per mutant below,
mutant(name, "test_that_must_catch_it", "the mistake in words", (old, new), ...), old once in the region.
"""
import contextlib
import importlib
import inspect
import io
import os
import sys
import time
import types
from dataclasses import dataclass

from nanorlhf.assignments import HINTS, REPO, find_regions
from nanorlhf.mutants_new import NEW_ACCEPTED, NEW_MUTANTS, NEW_TARGETS  # the pg pieces' and soft BT's

# assignment -> (module, qualified name of the function whose body the region is)
TARGETS = {
    "attention_kv_cache": ("nanorlhf.model", "CausalSelfAttention.forward"),
    "generate": ("nanorlhf.sampler", "_decode_loop"),
    "bradley_terry_loss": ("nanorlhf.reward", "bradley_terry_loss"),
    "reward_readout": ("nanorlhf.reward", "last_real_index"),
    "kl_penalty_rewards": ("nanorlhf.ppo", "kl_penalty_rewards"),
    "compute_gae": ("nanorlhf.ppo", "compute_gae"),
    "masked_whiten": ("nanorlhf.ppo", "masked_whiten"),
    "policy_loss": ("nanorlhf.ppo", "policy_loss"),
    "value_loss": ("nanorlhf.ppo", "value_loss"),
    "adaptive_kl": ("nanorlhf.ppo", "AdaptiveKLController.update"),
    "dpo_loss": ("nanorlhf.dpo", "dpo_loss"), **NEW_TARGETS}


@dataclass
class Mutant:  # name: the assignment; test: the test that must fail; what: the mistake in words (listed
    name: str    # in docs/assignments.md); edits: (old, new) pairs applied to the solution region
    test: str
    what: str
    edits: tuple


def mutant(name, test, what, *edits):
    return Mutant(name, test, what, edits)


POLICY_STATS = '"ratio": masked_mean(ratio, mask),'
MUTANTS = [  # each caught by its named test
    # ---- attention_kv_cache
    mutant("attention_kv_cache", "test_attention_matches_a_per_head_loop", "no 1/sqrt(head size) scale",
           ("is_causal=attn_bias is None,", "is_causal=attn_bias is None, scale=1.0,")),
    mutant("attention_kv_cache", "test_kv_cache_decoding_equals_full_forward_on_left_padded_batch",
           "the cache written but its columns not attended over",
           ("k, v = kv_cache.update(layer, k, v, columns)", "kv_cache.update(layer, k, v, columns)")),
    mutant("attention_kv_cache", "test_left_padded_row_equals_the_row_alone", "the padding/causal bias ignored",
           ("attn_mask=attn_bias, is_causal=attn_bias is None", "attn_mask=None, is_causal=q.size(2) > 1")),
    mutant("attention_kv_cache", "test_attention_matches_a_per_head_loop", "dropout left on in evaluation",
           ("dropout_p=self.dropout if self.training else 0.0", "dropout_p=0.1")),
    # ---- generate
    mutant("generate", "test_early_ending_rows_are_masked_and_padded_with_eos", "rows that keep going after their EOS",
           ("finished = finished | (token == eos_id)", "finished = finished")),
    mutant("generate", "test_early_ending_rows_are_masked_and_padded_with_eos",
           "the mask taken after the update: the EOS itself masked out",
           ("finished_before.append(finished)\n        finished = finished | (token == eos_id)",
            "finished = finished | (token == eos_id)\n        finished_before.append(finished)")),
    mutant("generate", "test_generate_equals_naive_generate", "the new token's cache column left masked",
           ("attn_mask[:, P + t] = 1", "pass")),
    mutant("generate", "test_generate_equals_naive_generate", "the position id not advanced",
           ("position = position + 1", "position = position")),
    mutant("generate", "test_generate_is_deterministic_for_a_seed", "the generator ignored",
           ("sample_token(logits, temperature, top_k, top_p, generator)",
            "sample_token(logits, temperature, top_k, top_p, None)")),
    # ---- bradley_terry_loss
    mutant("bradley_terry_loss", "test_bradley_terry_margin_is_chosen_minus_rejected", "the margin's sign",
           ("-F.logsigmoid(r_chosen - r_rejected)", "-F.logsigmoid(r_rejected - r_chosen)")),
    mutant("bradley_terry_loss", "test_bradley_terry_large_margins_stay_finite", "log(sigmoid(x)), which overflows",
           ("-F.logsigmoid(r_chosen - r_rejected)", "-torch.log(torch.sigmoid(r_chosen - r_rejected))")),
    mutant("bradley_terry_loss", "test_bradley_terry_weights_normalised_by_their_sum",
           "weights divided by the number of pairs", ("/ weights.sum()", "/ len(weights)")),
    mutant("bradley_terry_loss", "test_bradley_terry_weights_are_used", "weights ignored",
           ("return (losses * weights).sum() / weights.sum()", "return losses.mean()")),
    # ---- reward_readout
    mutant("reward_readout", "test_reward_readout_short_response_is_read_at_its_last_real_token",
           "read at the last column", ("torch.where(last >= 0, P + last,",
                                       "torch.where(last >= 0, P + response_mask.size(1) - 1,")),
    mutant("reward_readout", "test_reward_readout_short_response_is_read_at_its_last_real_token", "off by one",
           ("torch.where(last >= 0, P + last,", "torch.where(last >= 0, P + last + 1,")),
    mutant("reward_readout", "test_reward_readout_empty_response_is_read_at_the_last_prompt_column",
           "an empty response read at column P", ("torch.full_like(last, P - 1)", "torch.full_like(last, P)")),
    mutant("reward_readout", "test_reward_readout_counts_the_left_padding_of_the_prompt",
           "the real prompt tokens counted instead of its padded width",
           ("P = prompt_mask.size(1)", "P = prompt_mask.sum(1)")),
    # ---- kl_penalty_rewards
    mutant("kl_penalty_rewards", "test_kl_penalty_is_a_penalty_not_a_bonus", "the KL's sign (a bonus)",
           ("-kl_coef * kl", "kl_coef * kl")),
    mutant("kl_penalty_rewards", "test_kl_penalty_uses_the_kl_coef_it_is_given", "beta hard-coded to 0.1",
           ("-kl_coef * kl", "-0.1 * kl")),
    mutant("kl_penalty_rewards", "test_kl_penalty_score_at_the_last_real_token_not_the_last_column",
           "the score at the last column", ("last = last_token_index(mask)",
                                            "last = torch.full_like(last_token_index(mask), mask.size(1) - 1)")),
    mutant("kl_penalty_rewards", "test_kl_penalty_score_only_once", "the score on every real token",
           ("return rewards + bonus", "return rewards + score[:, None] * mask")),
    mutant("kl_penalty_rewards", "test_kl_penalty_empty_response_gets_no_score", "a score given to an empty response",
           ("score = torch.where(last >= 0, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))",
            "score = scores.to(rewards.dtype)")),
    mutant("kl_penalty_rewards", "test_kl_penalty_never_reads_the_padding", "padding masked by multiplying (inf*0)",
           ("rewards = torch.where(real, -kl_coef * kl, torch.zeros_like(kl))", "rewards = -kl_coef * kl * mask")),
    mutant("kl_penalty_rewards", "test_kl_penalty_does_not_change_its_inputs", "the logprobs changed in place",
           ("kl = logprobs - ref_logprobs", "kl = logprobs.sub_(ref_logprobs)")),
    # ---- compute_gae
    mutant("compute_gae", "test_compute_gae_value_after_the_end_is_zero", "bootstrapping from the padding's value",
           ("values = torch.where(mask > 0, values, torch.zeros_like(values))", "values = values")),
    mutant("compute_gae", "test_compute_gae_runs_backwards", "a forward loop", ("reversed(range(T))", "range(T)")),
    mutant("compute_gae", "test_compute_gae_uses_lambda", "lambda left out",
           ("gamma * lam * next_advantage", "gamma * next_advantage")),
    mutant("compute_gae", "test_compute_gae_gamma_discounts_the_next_value", "gamma left out of delta",
           ("rewards[:, t] + gamma * next_value", "rewards[:, t] + next_value")),
    mutant("compute_gae", "test_compute_gae_gamma_discounts_the_next_value", "lambda in delta instead of gamma",
           ("rewards[:, t] + gamma * next_value", "rewards[:, t] + lam * next_value")),
    mutant("compute_gae", "test_compute_gae_returns_are_advantages_plus_values", "returns = advantages",
           ("returns = advantages + values", "returns = advantages + 0 * values")),
    mutant("compute_gae", "test_compute_gae_zero_on_padding", "advantages left on padding",
           ("rewards = torch.where(mask > 0, rewards, torch.zeros_like(rewards))", "rewards = rewards"),
           ("next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]",
            "next_advantage = delta + gamma * lam * next_advantage * mask[:, t]")),
    mutant("compute_gae", "test_compute_gae_never_reads_the_padding", "padding masked by multiplying (inf*0)",
           ("values = torch.where(mask > 0, values, torch.zeros_like(values))", "values = values * mask"),
           ("rewards = torch.where(mask > 0, rewards, torch.zeros_like(rewards))", "rewards = rewards * mask")),
    mutant("compute_gae", "test_compute_gae_does_not_change_its_inputs", "the caller's values masked in place",
           ("values = torch.where(mask > 0, values, torch.zeros_like(values))",
            "values = values.masked_fill_(mask == 0, 0.0)")),
    # ---- masked_whiten
    mutant("masked_whiten", "test_masked_whiten_statistics_over_real_tokens_only", "the mean over the padding too",
           ("mean = masked_mean(x, mask)", "mean = x.mean()")),
    mutant("masked_whiten", "test_masked_whiten_uses_the_biased_variance", "the unbiased variance",
           ("unbiased=False", "unbiased=True")),
    mutant("masked_whiten", "test_masked_whiten_epsilon_inside_the_square_root", "epsilon outside the square root",
           ("* torch.rsqrt(var + 1e-8)", "/ (torch.sqrt(var) + 1e-8)")),
    mutant("masked_whiten", "test_masked_whiten_epsilon_inside_the_square_root", "epsilon 1e-5",
           ("var + 1e-8", "var + 1e-5")),
    mutant("masked_whiten", "test_masked_whiten_constant_input_stays_finite", "no epsilon", ("var + 1e-8", "var")),
    mutant("masked_whiten", "test_masked_whiten_zero_on_padding", "the padding of the result not zeroed",
           ("return torch.where(mask > 0, whitened, torch.zeros_like(whitened))", "return whitened")),
    mutant("masked_whiten", "test_masked_whiten_never_reads_the_padding", "a masked mean written (x*mask).sum()/n",
           ("mean = masked_mean(x, mask)", "mean = (x * mask).sum() / mask.sum()")),
    mutant("masked_whiten", "test_masked_whiten_never_reads_the_padding", "padding zeroed by multiplying (inf*0)",
           ("return torch.where(mask > 0, whitened, torch.zeros_like(whitened))", "return whitened * mask")),
    mutant("masked_whiten", "test_masked_whiten_adds_the_mean_back_without_shift", "shift_mean=False ignored",
           ("whitened = whitened + mean", "whitened = whitened")),
    mutant("masked_whiten", "test_masked_whiten_does_not_change_its_input", "the caller's x masked in place",
           ("mean = masked_mean(x, mask)", "mean = masked_mean(x.masked_fill_(mask == 0, 0.0), mask)")),
    # ---- policy_loss
    mutant("policy_loss", "test_policy_loss_takes_the_pessimistic_max_of_the_two_terms", "min instead of max",
           ("torch.maximum(unclipped, clipped)", "torch.minimum(unclipped, clipped)")),
    mutant("policy_loss", "test_policy_loss_uses_the_clip_it_is_given", "the clip range hard-coded to 0.2",
           ("1.0 - clip, 1.0 + clip", "1.0 - 0.2, 1.0 + 0.2")),
    mutant("policy_loss", "test_policy_loss_gradient_flows_through_unclipped_tokens_only", "the clip on both terms",
           ("unclipped = -advantages * ratio", "unclipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)")),
    mutant("policy_loss", "test_policy_loss_statistics_are_detached",
           "statistics that carry a gradient (only the ratio detached)",
           ("with torch.no_grad():", "if True:"),
           (POLICY_STATS, '"ratio": masked_mean(ratio, mask).detach(),')),
    mutant("policy_loss", "test_policy_loss_is_a_mean_over_real_tokens", "a mean over the padding too",
           ("loss = masked_mean(torch.maximum(unclipped, clipped), mask)",
            "loss = torch.maximum(unclipped, clipped).mean()")),
    mutant("policy_loss", "test_policy_loss_never_reads_the_padding", "a masked mean written (x*mask).sum()/n",
           ("loss = masked_mean(torch.maximum(unclipped, clipped), mask)",
            "loss = (torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()")),
    mutant("policy_loss", "test_policy_loss_does_not_change_its_inputs", "the caller's advantages masked in place",
           ("unclipped = -advantages * ratio", "unclipped = -advantages.masked_fill_(mask == 0, 0.0) * ratio")),
    mutant("policy_loss", "test_policy_loss_clipfrac_counts_only_tokens_whose_gradient_is_cut",
           "clipfrac counting every token outside the range",
           ("(clipped > unclipped).to(ratio.dtype)", "((ratio - 1).abs() > clip).to(ratio.dtype)")),
    mutant("policy_loss", "test_policy_loss_approx_kl_is_half_the_squared_log_ratio", "approx_kl as the mean log-ratio",
           ("0.5 * log_ratio ** 2", "-log_ratio")),
    mutant("policy_loss", "test_policy_loss_ratio_is_new_over_old", "the ratio inverted",
           ("log_ratio = logprobs - old_logprobs", "log_ratio = old_logprobs - logprobs")),
    mutant("policy_loss", "test_policy_loss_takes_the_pessimistic_max_of_the_two_terms", "the loss's sign",
           ("loss = masked_mean(", "loss = -masked_mean(")),
    # ---- value_loss
    mutant("value_loss", "test_value_loss_clips_around_the_old_values", "V itself clipped to [-clip, clip]",
           ("old_values + torch.clamp(values - old_values, -clip, clip)", "torch.clamp(values, -clip, clip)")),
    mutant("value_loss", "test_value_loss_takes_the_larger_squared_error", "min instead of max",
           ("torch.maximum(unclipped, clipped)", "torch.minimum(unclipped, clipped)")),
    mutant("value_loss", "test_value_loss_is_half_the_squared_error", "the 0.5 left out", ("0.5 *", "")),
    mutant("value_loss", "test_value_loss_is_half_the_squared_error", "absolute instead of squared error",
           ("unclipped = (values - returns) ** 2", "unclipped = (values - returns).abs()"),
           ("clipped = (values_clipped - returns) ** 2", "clipped = (values_clipped - returns).abs()")),
    mutant("value_loss", "test_value_loss_uses_the_clip_it_is_given", "clip set to 0.2", ("-clip, clip", "-0.2, 0.2")),
    mutant("value_loss", "test_value_loss_is_a_mean_over_real_tokens", "a mean over the padding too",
           ("masked_mean(torch.maximum(unclipped, clipped), mask)", "torch.maximum(unclipped, clipped).mean()")),
    mutant("value_loss", "test_value_loss_never_reads_the_padding", "a masked mean written (x*mask).sum()/n",
           ("masked_mean(torch.maximum(unclipped, clipped), mask)",
            "(torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()")),
    mutant("value_loss", "test_value_loss_clips_around_the_old_values", "the clip around the returns",
           ("old_values + torch.clamp(values - old_values, -clip, clip)",
            "returns + torch.clamp(values - returns, -clip, clip)")),
    mutant("value_loss", "test_value_loss_does_not_change_its_inputs", "the caller's values masked in place",
           ("unclipped = (values - returns) ** 2", "unclipped = (values.masked_fill_(mask == 0, 0.0) - returns) ** 2")),
    # ---- adaptive_kl
    mutant("adaptive_kl", "test_adaptive_kl_error_is_clipped", "the error not clipped",
           ("min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)", "float(current_kl) / self.target - 1.0")),
    mutant("adaptive_kl", "test_adaptive_kl_beta_rises_above_target_and_falls_below", "the error's sign",
           ("self.value *= 1.0 + proportional_error", "self.value *= 1.0 - proportional_error")),
    mutant("adaptive_kl", "test_adaptive_kl_step_scales_with_n_steps_over_horizon", "n_steps / horizon left out",
           ("proportional_error * n_steps / self.horizon", "proportional_error")),
    mutant("adaptive_kl", "test_adaptive_kl_update_is_multiplicative", "an additive update",
           ("self.value *= 1.0 + proportional_error", "self.value += proportional_error")),
    mutant("adaptive_kl", "test_adaptive_kl_beta_stays_a_python_float", "beta turned into a tensor",
           ("float(current_kl)", "current_kl")),
    mutant("adaptive_kl", "test_adaptive_kl_kl_of_zero", "target over KL (inverted)",
           ("float(current_kl) / self.target", "self.target / max(float(current_kl), 1e-8)")),
    # ---- dpo_loss
    mutant("dpo_loss", "test_dpo_loss_beta_multiplies_both_sides", "beta on the chosen side only",
           ("beta * (chosen_logratios - rejected_logratios)", "beta * chosen_logratios - rejected_logratios")),
    mutant("dpo_loss", "test_dpo_loss_prefers_the_chosen_response", "chosen and rejected swapped",
           ("beta * (chosen_logratios - rejected_logratios)", "beta * (rejected_logratios - chosen_logratios)")),
    mutant("dpo_loss", "test_dpo_loss_rewards_are_detached", "rewards that carry a gradient",
           ("beta * chosen_logratios.detach()", "beta * chosen_logratios")),
    mutant("dpo_loss", "test_dpo_loss_uses_the_beta_it_is_given", "beta hard-coded to 0.1",
           ("beta * (chosen_logratios - rejected_logratios)", "0.1 * (chosen_logratios - rejected_logratios)"),
           ("chosen_rewards = beta *", "chosen_rewards = 0.1 *")),
    mutant("dpo_loss", "test_dpo_loss_large_margins_stay_finite", "log(sigmoid(x)), which overflows",
           ("-F.logsigmoid(beta * (chosen_logratios - rejected_logratios))",
            "-(beta * (chosen_logratios - rejected_logratios)).sigmoid().log()")),
] + [mutant(*m) for m in NEW_MUTANTS]

# Right answers written another way: every test must pass with them.
ACCEPTED = [
    mutant("policy_loss", "", "clipfrac in float32 of float64 inputs (the dtype rule)",
           ("(clipped > unclipped).to(ratio.dtype)", "(clipped > unclipped).float()")),
    mutant("policy_loss", "", "stats detached one by one instead of under no_grad",
           ("with torch.no_grad():", "if True:"),
           ('"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),',
            '"clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach(),'),
           ('"approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),',
            '"approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),'),
           (POLICY_STATS, '"ratio": masked_mean(ratio, mask).detach(),')),
    mutant("masked_whiten", "", "1 / sqrt instead of rsqrt", ("* torch.rsqrt(var + 1e-8)", "/ torch.sqrt(var + 1e-8)")),
    mutant("value_loss", "", "clamp written as min/max around V_old",
           ("old_values + torch.clamp(values - old_values, -clip, clip)",
            "torch.minimum(torch.maximum(values, old_values - clip), old_values + clip)")),
] + [mutant(*m) for m in NEW_ACCEPTED]


def resolve(obj, qualname):
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)  # compute_gae is wrapped by torch.no_grad


def mutated_code(m):
    """The code object of m's function with its edits applied to the solution region."""
    module_name, qualname = TARGETS[m.name]
    module = importlib.import_module(module_name)
    with open(module.__file__) as f:
        source = f.read()
    wrong = region = find_regions(source)[m.name]
    for old, new in m.edits:
        if wrong.count(old) != 1:
            raise ValueError(f"mutant {m.name}/{m.what!r}: {old!r} occurs {wrong.count(old)} times in the solution")
        wrong = wrong.replace(old, new)
    namespace = types.SimpleNamespace(__name__=module_name, __file__=module.__file__)
    exec(compile(source.replace(region, wrong), module.__file__, "exec"), namespace.__dict__)
    code = resolve(namespace, qualname).__code__
    original = resolve(module, qualname)
    if code.co_freevars != original.__code__.co_freevars:
        raise ValueError(f"mutant {m.name}/{m.what!r} changes the function's closure: keep the edit inside the body")
    return original, code


class _Loop:
    """pytest plugin that runs the loop: tests collected once, then per plan entry its tests (mutant planted)."""

    def __init__(self, plan):
        self.plan, self.results = plan, []  # plan: [(assignment, Mutant or None)]

    def pytest_runtestloop(self, session):
        from _pytest.runner import runtestprotocol
        by_name = {}
        for item in session.items:
            by_name.setdefault(item.path.stem[len("test_"):], []).append(item)
        for name, m in self.plan:
            original = None
            if m is not None:
                original, code = mutated_code(m)
                saved, original.__code__ = original.__code__, code
            try:
                failed = set()
                for item in by_name.get(name, []):
                    if any(r.failed for r in runtestprotocol(item, nextitem=None, log=False)):
                        failed.add(item.originalname)
            finally:
                if original is not None:
                    original.__code__ = saved
            self.results.append((failed, len(by_name.get(name, []))))
        return True


def run_plan(plan):
    """[(assignment, Mutant or None)] -> [(failed test names, tests run)], in one pytest session."""
    import pytest
    files = [os.path.join(REPO, "tests", "assignments", f"test_{n}.py") for n in dict.fromkeys(n for n, _ in plan)]
    loop = _Loop(plan)
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(out):
        code = pytest.main([*files, "-q", "-p", "no:cacheprovider", "-W", "ignore", f"--rootdir={REPO}"],
                           plugins=[loop])
    if len(loop.results) != len(plan):
        raise SystemExit(f"the assignments' tests did not run (pytest exit {code}):\n{out.getvalue()[-2000:]}")
    return loop.results


def main(names=None):
    """Plant each mutant of names (default all): True when its named test catches each, and the solution
    and every accepted variant pass."""
    names = list(names or HINTS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:  # a new assignment: its TARGETS entry and mutants go here
        raise SystemExit(f"no mutants for {unknown}: add them to TARGETS in nanorlhf/mutants.py")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start, ok = time.time(), True
    chosen = [m for m in MUTANTS if m.name in names]
    accepted = [m for m in ACCEPTED if m.name in names]
    results = run_plan([(n, None) for n in names] + [(m.name, m) for m in chosen + accepted])
    for name, (failed, ran) in zip(names, results):
        if failed or not ran:
            print(f"SOLUTION FAILS {name}: {sorted(failed) or 'no tests ran'}")
            ok = False
    results = results[len(names):]
    caught = 0
    for m, (failed, _) in zip(chosen, results):
        hit = m.test in failed
        caught += hit
        also = sorted(failed - {m.test})
        print(f"{'caught  ' if hit else 'SURVIVED'} {m.name:<20} {m.what:<58} by {m.test}"
              + (f" (+{len(also)} more)" if also and hit else f"; failed instead: {also}" if not hit else ""))
    for m, (failed, _) in zip(accepted, results[len(chosen):]):
        ok &= not failed
        print(f"{'accepted' if not failed else 'REJECTED'} {m.name:<20} {m.what:<58}"
              + (f" failed: {sorted(failed)}" if failed else ""))
    print(f"{caught}/{len(chosen)} mutants caught by their named test, {len(accepted)} right variants checked, "
          f"over {len(names)} assignments, in {time.time() - start:.0f} s")
    return ok and caught == len(chosen)


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:] or None) else 1)
