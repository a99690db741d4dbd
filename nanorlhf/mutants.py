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
from nanorlhf.mutants_pg import PG_ACCEPTED, PG_MUTANTS, PG_TARGETS  # the pg track's pieces
from nanorlhf.mutants_ppo import PPO_ACCEPTED, PPO_MUTANTS, PPO_TARGETS  # the ppo track's pieces

# assignment -> (module, qualified name of the function whose body the region is)
TARGETS = {
    "attention_kv_cache": ("nanorlhf.model", "CausalSelfAttention.forward"),
    "generate": ("nanorlhf.sampler", "_decode_loop"),
    "bradley_terry_loss": ("nanorlhf.reward", "bradley_terry_loss"),
    "soft_bradley_terry_loss": ("nanorlhf.reward", "soft_bradley_terry_loss"),
    "reward_readout": ("nanorlhf.reward", "last_real_index"),
    "dpo_loss": ("nanorlhf.dpo", "dpo_loss"), **PPO_TARGETS, **PG_TARGETS}


@dataclass
class Mutant:  # name: the assignment; test: the test that must fail; what: the mistake in words (listed
    name: str    # in docs/assignments.md); edits: (old, new) pairs applied to the solution region
    test: str
    what: str
    edits: tuple


def mutant(name, test, what, *edits):
    return Mutant(name, test, what, edits)


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
    # ---- soft_bradley_terry_loss
    mutant("soft_bradley_terry_loss", "test_soft_bt_targets_are_used", "soft targets ignored (the hard-label loss)",
           ("-(targets * F.logsigmoid(d) + (1 - targets) * F.logsigmoid(-d))", "-F.logsigmoid(d)")),
    mutant("soft_bradley_terry_loss", "test_soft_bt_target_is_the_probability_chosen_wins",
           "soft targets flipped (p and 1 - p swapped)",
           ("targets * F.logsigmoid(d) + (1 - targets) * F.logsigmoid(-d)",
            "(1 - targets) * F.logsigmoid(d) + targets * F.logsigmoid(-d)")),
    mutant("soft_bradley_terry_loss", "test_soft_bt_large_margins_stay_finite",
           "log(sigmoid(x)) for the soft loss, which overflows",
           ("F.logsigmoid(d)", "torch.log(torch.sigmoid(d))"), ("F.logsigmoid(-d)", "torch.log(torch.sigmoid(-d))")),
    mutant("soft_bradley_terry_loss", "test_soft_bt_weights_are_used", "soft loss: weights ignored",
           ("if weights is None:", "if True:")),
    mutant("soft_bradley_terry_loss", "test_soft_bt_weights_normalised_by_their_sum",
           "soft loss: weights divided by their count",
           ("/ weights.sum()", "/ len(weights)")),
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
] + [mutant(*m) for m in PPO_MUTANTS + PG_MUTANTS]

# Right answers written another way: every test must pass with them.
ACCEPTED = [
    mutant("soft_bradley_terry_loss", "", "the soft loss as binary_cross_entropy_with_logits",
           ("losses = -(targets * F.logsigmoid(d) + (1 - targets) * F.logsigmoid(-d))",
            "losses = F.binary_cross_entropy_with_logits(d, targets.to(d.dtype), reduction='none')")),
] + [mutant(*m) for m in PPO_ACCEPTED + PG_ACCEPTED]


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
        code = pytest.main([*files, "-q", "-n", "0", "-p", "no:cacheprovider", "-W", "ignore", f"--rootdir={REPO}"],
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
