"""Constitutional AI (RLAIF): the constitution file, the multiple-choice prompt, the labeller's mechanics
(principle per comparison, soft label, swapped-order averaging, clamp) against hand-computed values, the soft
Bradley-Terry loss against a loop, the preference file's soft-label field, and tiny-preset subprocess runs of
train_rm.py --feedback constitution, train_ppo.py on its RM and eval.py --rlaif_ckpts."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_gpt
from nanorlhf.constitution import AILabeller, ConstitutionError, LMFeedback, Principle, gold_agreement, \
    label_pairs_ai, load_constitution, make_labeller, parse_constitution, render_prompt, soft_label
from nanorlhf.judge import gold_score
from nanorlhf.prefs import PreferenceFileError, read_prefs
from nanorlhf.rules import RULES
from nanorlhf.reward import bradley_terry_loss, pair_targets, soft_bradley_terry_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ("--preset", "tiny", "--device", "cpu")


# ---------------------------------------------------------------- the constitution and the prompt

def test_bundled_constitution_parses_and_every_principle_has_a_rule():
    principles = load_constitution(os.path.join(REPO, "data", "constitution.md"))
    names = [p.name for p in principles]
    assert names == ["kind", "happy_ending", "on_story", "finished", "no_repeat", "no_gushing", "full_story"]
    assert all(p.question.startswith("Which continuation") and p.question.endswith("?") for p in principles)
    assert set(names) <= set(RULES)


def test_constitution_errors_name_the_line():
    with pytest.raises(ConstitutionError, match=r"line 3: principle 'kind' is already on line 1"):
        parse_constitution("- kind: Which is kinder?\nprose is ignored\n- kind: again?")
    with pytest.raises(ConstitutionError, match=r"line 2: a principle is '- name: question'"):
        parse_constitution("# heading\n- Kind Words: Which is kinder?")
    with pytest.raises(ConstitutionError, match="no principles"):
        parse_constitution("just prose\n")
    with pytest.raises(ConstitutionError, match="no check for principle.*wit.*--labeler lm"):
        AILabeller([Principle("wit", "Which is wittier?")], make_labeller("rules").feedback)


def test_prompt_renders_context_question_and_options_in_order():
    text = render_prompt("Tom had a red ball.", "Which continuation is kinder?", "He shared it.", "He kept it.")
    assert text == ("Consider the following beginning of a story: Tom had a red ball.\n"
                    "Which continuation is kinder?\nOptions:\n(A) He shared it.\n(B) He kept it.\nThe answer is (")


# ---------------------------------------------------------------- the labeller's mechanics

class BiasedFeedback:
    """A labeller whose log-score of an option is its word count, plus `bias` for option A."""

    def __init__(self, bias):
        self.bias, self.requests = bias, []

    def missing(self, principles):
        return []

    def option_logprobs(self, requests):
        self.requests += requests
        return np.array([[len(r["first"].split()) + self.bias, len(r["second"].split())] for r in requests])


PAIRS = [("p", "one two three", "one", True, True), ("p", "one", "one two three", True, True),
         ("p", "a b", "c d", True, True), ("p", "x", "y z", False, True)]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_soft_label_normalises_the_two_log_probabilities():
    # log P(A) = log .2, log P(B) = log .3 -> .2 / (.2 + .3)
    assert soft_label([[math.log(0.2), math.log(0.3)]])[0] == pytest.approx(0.4)


def test_swapped_order_averaging_cancels_position_bias():
    principles = [Principle("kind", "Which is kinder?")]
    for bias in (0.0, 1.5, -3.0):
        p, _ = AILabeller(principles, BiasedFeedback(bias)).label(PAIRS, np.random.default_rng(0))
        d = np.array([2, -2, 0, -1])  # word-count differences of PAIRS
        # by hand: P(a) = (sigmoid(d + bias) + 1 - sigmoid(-d + bias)) / 2
        assert p == pytest.approx([(sigmoid(x + bias) + 1 - sigmoid(-x + bias)) / 2 for x in d], abs=1e-12)
        assert p[0] + p[1] == pytest.approx(1.0, abs=1e-12)  # (a, b) and (b, a): the same verdict
        assert p[2] == 0.5  # equal texts by the labeller's measure: exactly 1/2 whatever the bias
        assert list(np.sign(p - 0.5)) == list(np.sign(d))  # the bias never flips a verdict
    one_pass, _ = AILabeller(principles, BiasedFeedback(1.5), swap=False).label(PAIRS, np.random.default_rng(0))
    assert one_pass[0] + one_pass[1] > 1.1 and one_pass[2] == pytest.approx(sigmoid(1.5))  # the bias shows


def test_one_principle_drawn_per_comparison_and_clamp():
    principles = [Principle(n, f"Which is {n}?") for n in ("a", "b", "c")]
    feedback = BiasedFeedback(0.0)
    pairs = PAIRS * 5
    p, names = AILabeller(principles, feedback, clamp=(0.4, 0.6)).label(pairs, np.random.default_rng(7))
    expected = [["a", "b", "c"][i] for i in np.random.default_rng(7).integers(3, size=len(pairs))]
    assert names == expected and len(set(names)) == 3
    # the question asked is the drawn principle's, in both passes
    assert [r["question"] for r in feedback.requests] == [f"Which is {n}?" for n in expected] * 2
    assert p.min() == pytest.approx(0.4) and p.max() == pytest.approx(0.6)


def test_label_pairs_ai_rows_favour_chosen_and_weigh_per_prompt():
    labeller = AILabeller([Principle("kind", "?")], BiasedFeedback(0.7))
    rows = label_pairs_ai(["p0", "p1"], [["a b c", "a", "a"], ["x y", "z", "x y z w"]],
                          [[True, True, True], [True, False, True]], labeller, np.random.default_rng(0), k=3)
    assert len(rows) == 5  # the identical pair ("a", "a") is skipped
    assert all(r["p_chosen"] >= 0.5 and r["weight"] == pytest.approx(1 / 3) for r in rows)
    assert [r["group"] for r in rows] == [0, 0, 1, 1, 1]
    assert rows[0]["chosen"] == "a b c" and rows[0]["p_chosen"] == pytest.approx(
        (sigmoid(2.7) + 1 - sigmoid(-2 + 0.7)) / 2)
    assert rows[3]["chosen"] == "x y z w" and rows[3]["chosen_ended"] is True
    assert rows[4]["chosen"] == "x y z w" and rows[4]["rejected_ended"] is False


def test_gold_agreement_by_hand():
    prompt = "Tom had a dog."
    good = ("Tom and his dog played in the park all day. They ran and laughed together in the warm sun. "
            "When the sun went down, Tom gave his dog a big hug and they walked home, happy and tired.")
    bad = "bad"
    assert gold_score(prompt, good, True) > gold_score(prompt, bad, True)
    rows = [{"prompt": prompt, "chosen": good, "rejected": bad, "p_chosen": 0.9, "principle": "kind"},
            {"prompt": prompt, "chosen": bad, "rejected": good, "p_chosen": 0.8, "principle": "kind"},
            {"prompt": prompt, "chosen": bad, "rejected": good, "p_chosen": 0.5, "principle": "finished"},
            {"prompt": prompt, "chosen": bad, "rejected": good, "p_chosen": 0.2, "principle": "finished"}]
    overall, per = gold_agreement(rows)
    assert overall == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert per == {"kind": (0.5, 2), "finished": (0.75, 2)} and list(per) == ["kind", "finished"]  # worst first


def test_lm_feedback_reads_a_and_b_after_the_prompt():
    class Enc:  # characters as tokens 0..19, <|endoftext|> 22
        eot_token = 22

        def encode_ordinary(self, s):
            return [ord(c) % 20 for c in s]

    model = make_gpt(block_size=400)
    fb = LMFeedback(model, Enc(), batch_size=3)
    reqs = [{"context": "ctx", "question": "Which?", "first": a, "second": b} for _, a, b, _, _ in PAIRS]
    batched = fb.option_logprobs(reqs)
    for r, row in zip(reqs, batched):  # one at a time, no padding, by hand
        ids = Enc().encode_ordinary(render_prompt("ctx", "Which?", r["first"], r["second"]))
        logp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
        assert row == pytest.approx(logp[[ord("A") % 20, ord("B") % 20]].tolist(), abs=1e-5)
    short = LMFeedback(make_gpt(block_size=90), Enc())  # options cut to fit the window, the tail kept
    ids = short.tokens({"context": "ctx", "question": "Which?", "first": "x" * 50, "second": "y" * 50})
    head, mid, tail = (Enc().encode_ordinary(s) for s in
                       ("Consider the following beginning of a story: ctx\nWhich?\nOptions:\n(A) ", "\n(B) ",
                        "\nThe answer is ("))
    room = (90 - len(head) - len(mid) - len(tail)) // 2
    assert room == 0  # no room left: one token each, and the head loses its start
    assert ids == head[-(90 - len(mid) - len(tail) - 2):] + Enc().encode_ordinary("x") + mid + \
        Enc().encode_ordinary("y") + tail
    assert len(ids) <= 90
    ids = LMFeedback(make_gpt(block_size=120), Enc()).tokens(
        {"context": "ctx", "question": "Which?", "first": "x" * 50, "second": "y" * 50})
    assert ids == head + Enc().encode_ordinary("x" * 15) + mid + Enc().encode_ordinary("y" * 15) + tail  # (120-90)/2


# ---------------------------------------------------------------- the soft Bradley-Terry loss

def test_soft_bt_equals_hard_bt_at_0_and_1_and_a_loop_otherwise():
    g = torch.Generator().manual_seed(0)
    r_c, r_r, w = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    ones = torch.ones(6)
    assert soft_bradley_terry_loss(r_c, r_r, ones) == pytest.approx(float(bradley_terry_loss(r_c, r_r)), abs=1e-6)
    assert soft_bradley_terry_loss(r_c, r_r, ones, w) == pytest.approx(float(bradley_terry_loss(r_c, r_r, w)),
                                                                      abs=1e-6)
    assert soft_bradley_terry_loss(r_c, r_r, 0 * ones) == pytest.approx(float(bradley_terry_loss(r_r, r_c)), abs=1e-6)
    p = torch.rand(6, generator=g)
    ref = sum(wi * -(pi * math.log(sigmoid(c - r)) + (1 - pi) * math.log(sigmoid(r - c)))
              for c, r, pi, wi in zip(r_c.tolist(), r_r.tolist(), p.tolist(), w.tolist())) / float(w.sum())
    assert float(soft_bradley_terry_loss(r_c, r_r, p, w)) == pytest.approx(ref, rel=1e-5)
    # a label of 1/2 is minimised by equal scores: its gradient pulls r_c - r_r to 0
    d = torch.tensor([1.0], requires_grad=True)
    soft_bradley_terry_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert float(d.grad) == pytest.approx(sigmoid(1.0) - 0.5)


def test_pair_targets_follow_encode_groups_order():
    groups = [[{"p_chosen": 0.9}, {}], [{"p_chosen": 0.6}]]
    assert pair_targets(groups, "cpu").tolist() == pytest.approx([0.9, 1.0, 0.6])


# ---------------------------------------------------------------- the preference file's soft label

def test_prefs_soft_label_validated_with_line_numbers(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": p} for p in (0.7, 1.5, "0.7", True, 1, 0)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"chosen": "a", "rejected": "b", "p_chosen": NaN}\n')
    with pytest.raises(PreferenceFileError) as e:
        read_prefs(path)
    msg = str(e.value)
    assert "4 bad row(s)" in msg
    for line, got in ((2, "1.5"), (3, "'0.7'"), (4, "True"), (7, "nan")):
        assert f"line {line}: 'p_chosen' must be a number from 0 to 1 (the probability that chosen is better), " \
               f"got {got}" in msg
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:1] + rows[4:]))
    assert [r["p_chosen"] for r in read_prefs(path)] == [0.7, 1, 0]


# ---------------------------------------------------------------- GPT-2's weights as the feedback model

@pytest.fixture
def fake_hub(tmp_path):
    """A loopback stand-in for the Hugging Face hub serving GPT-2-shaped weights (GPT-2's vocabulary and
    layout, one 64-wide head: from_hf_gpt2 reads n_embd // 64 heads) at {endpoint}/gpt2/resolve/main/pytorch_model.bin; yields (endpoint, the state dict)."""
    import functools
    import http.server
    import threading
    from nanorlhf.model import GPT, GPTConfig, to_hf_gpt2
    from conftest import randomize
    model = randomize(GPT(GPTConfig(vocab_size=50257, block_size=96, n_layer=1, n_head=1, n_embd=64, bias=True)))
    hf = {k: v.clone() for k, v in to_hf_gpt2(model).items()}
    root = tmp_path / "hub"
    (root / "gpt2" / "resolve" / "main").mkdir(parents=True)
    torch.save(hf, root / "gpt2" / "resolve" / "main" / "pytorch_model.bin")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hf
    server.shutdown()


def test_labeler_dir_gpt2_downloads_converts_and_scores_with_gpt2s_tokenizer(tmp_path, fake_hub, gpt2_cache_dir,
                                                                           monkeypatch):
    from nanorlhf.constitution import load_feedback_model
    from nanorlhf.model import from_hf_gpt2
    endpoint, hf = fake_hub
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(gpt2_cache_dir))
    model, enc = load_feedback_model("gpt2", "cpu")
    assert enc.name == "gpt2" and enc.encode("Hello world") == [15496, 995]
    assert (tmp_path / "home" / ".cache" / "nanorlhf" / "gpt2-pytorch_model.bin").exists()  # cached for next time
    reference = from_hf_gpt2(hf).eval()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    # the labeller reads P(A), P(B) after "The answer is (" under GPT-2's tokenizer
    request = {"context": "Tom had a red ball.", "question": "Which continuation is kinder?",
               "first": "He gave it to his sister.", "second": "He threw it at the cat."}
    feedback = LMFeedback(model, enc)
    ids = torch.tensor([feedback.tokens(request)])
    assert enc.decode(ids[0].tolist()) == render_prompt(*request.values())
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids)[0, -1], -1)
    want = logp[[enc.encode_ordinary("A")[0], enc.encode_ordinary("B")[0]]]
    assert torch.allclose(torch.as_tensor(feedback.option_logprobs([request]))[0].float(), want, atol=1e-5)


def test_labeler_dir_gpt2_from_the_command_line_and_a_failed_download_says_the_fix(tmp_path, fake_hub, gpt2_cache_dir):
    endpoint, _ = fake_hub
    rows = [{"prompt": "Lily saw a dog.", "chosen": " She smiled and gave it a hug. The end.",
             "rejected": " The dog ran. The dog ran. The dog ran."}] * 4
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**ENV, "HF_ENDPOINT": endpoint, "HOME": str(tmp_path / "home"), "TIKTOKEN_CACHE_DIR": str(gpt2_cache_dir)}
    cmd = [sys.executable, "-m", "nanorlhf.constitution", "--prefs", str(tmp_path / "prefs.jsonl"), "--labeler", "lm",
           "--labeler_dir", "gpt2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"downloading {endpoint}/gpt2/resolve/main/pytorch_model.bin" in proc.stdout
    assert "lm labeller (gpt2, swap True): agreement with gold" in proc.stdout
    env = {**env, "HF_ENDPOINT": "http://127.0.0.1:9", "HOME": str(tmp_path / "home2")}  # port 9: nothing there
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--labeler_dir gpt2: could not download gpt2 weights" in proc.stderr and "put the file at" in proc.stderr
    assert not list((tmp_path / "home2").rglob("*.bin*"))  # no half-written weights left to load next time


# ---------------------------------------------------------------- the scripts, at the tiny preset

def run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_tiny_constitution_rm_then_ppo_then_eval(tmp_path):
    d = {k: str(tmp_path / k) for k in ("sft", "rm", "rm_lm", "ppo", "eval")}
    run("train_sft.py", *TINY, "--out_dir", d["sft"])
    proc = run("train_rm.py", *TINY, "--sft_dir", d["sft"], "--out_dir", d["rm"], "--feedback", "constitution",
               "--labeler", "rules", "--n_prompts", "24", "--norm_samples", "8", "--eval_samples", "8")
    assert "soft labels (p_chosen): the Bradley-Terry loss takes them" in proc.stdout
    assert "the labeller: agreement with gold" in proc.stdout and "the simulated raters on the same pairs" in proc.stdout
    rows = read_prefs(os.path.join(d["rm"], "prefs.jsonl"))
    assert rows and all(0.5 <= r["p_chosen"] <= 1 and r["principle"] in RULES for r in rows)
    assert any(r["p_chosen"] < 1 for r in rows)  # soft, not hard
    metrics = [json.loads(line) for line in open(os.path.join(d["rm"], "metrics.jsonl"))]
    assert all(math.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    proc = run("train_rm.py", *TINY, "--sft_dir", d["sft"], "--out_dir", d["rm_lm"], "--feedback", "constitution",
               "--labeler", "lm", "--labeler_dir", d["sft"], "--label_clamp", "0.4,0.6", "--n_prompts", "16",
               "--norm_samples", "8", "--eval_samples", "8")
    assert all(0.5 <= r["p_chosen"] <= 0.6 for r in read_prefs(os.path.join(d["rm_lm"], "prefs.jsonl")))
    run("train_ppo.py", *TINY, "--sft_dir", d["sft"], "--rm_dir", d["rm"], "--out_dir", d["ppo"])
    proc = run("eval.py", *TINY, "--sft_dir", d["sft"], "--rm_dir", d["rm"], "--out_dir", d["eval"], "--ckpts",
               d["sft"], "--rlaif_ckpts", d["ppo"], "--bon", "", "--n_prompts", "8")
    assert "rules labeller" in proc.stdout
    with open(os.path.join(d["eval"], "results.json")) as f:
        results = {r["method"]: r for r in json.load(f)["rows"]}
    row = results["rlaif-ppo"]
    assert {"gold", "win_rate", "labeler_gold_acc", "raters_gold_acc", "principles_disagreeing"} <= set(row)
    assert 0 <= row["labeler_gold_acc"] <= 1 and "rlaif-ppo" in open(os.path.join(d["eval"], "results.md")).read()
