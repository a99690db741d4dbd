"""nanorlhf/assignments.py: the student copy blanks every marked region and still imports; a
script in it stops inside the first blanked piece with its hint; there every assignment's tests
fail with its own NotImplementedError; putting one solution back makes exactly its tests pass;
and the repository itself scores full marks."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from nanorlhf import assignments
from nanorlhf.assignments import HINTS, blank, find_regions, hint_line, raise_line

# where each assignment lives, in the order of HINTS (docs/assignments.md has a section for each)
WHERE = {"attention_kv_cache": "nanorlhf/model.py", "generate": "nanorlhf/sampler.py",
         "bradley_terry_loss": "nanorlhf/reward.py", "reward_readout": "nanorlhf/reward.py",
         "soft_bradley_terry_loss": "nanorlhf/reward.py",
         "kl_penalty_rewards": "nanorlhf/ppo.py", "compute_gae": "nanorlhf/ppo.py",
         "masked_whiten": "nanorlhf/ppo.py", "policy_loss": "nanorlhf/ppo.py", "value_loss": "nanorlhf/ppo.py",
         "adaptive_kl": "nanorlhf/ppo.py", "dpo_loss": "nanorlhf/dpo.py",
         "kl_k3": "nanorlhf/pg.py", "leave_one_out_baseline": "nanorlhf/pg.py", "group_advantages": "nanorlhf/pg.py"}


def run(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(cwd, *names):
    """Run `check` in cwd -> (exit code, {name: (passed, total, status)}, output)."""
    result = run(["-m", "nanorlhf.assignments", "check", *names], cwd)
    rows = re.findall(r"^(\w+) +(\d+)/(\d+) +(.+)$", result.stdout, re.M)
    table = {name: (int(p), int(t), status.strip()) for name, p, t, status in rows if name != "total"}
    return result.returncode, table, result.stdout + result.stderr


def put_back(copy_dir, *names, mistake=("", "")):
    """Copy the reference solution of the assignments from the repository into the student copy
    (with mistake = (old, new) replaced in it: a student's wrong answer)."""
    for name in names:
        put_back_one(copy_dir, name, mistake)


def put_back_one(copy_dir, name, mistake):
    path = WHERE[name]
    with open(os.path.join(REPO, path)) as f:
        solution = find_regions(f.read())[name]
    assert mistake[0] in solution
    solution = solution.replace(*mistake)
    indent = re.match(r" *", solution).group(0)
    with open(os.path.join(copy_dir, path)) as f:
        source = f.read()
    stub = raise_line(name, indent)
    assert source.count(stub) == 1, name
    with open(os.path.join(copy_dir, path), "w") as f:
        f.write(source.replace(stub, solution))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "nanorlhf-student"
    result = run(["-m", "nanorlhf.assignments", "make", str(out)], REPO)
    assert result.returncode == 0, result.stderr
    assert f"{len(HINTS)} assignments blanked" in result.stdout
    return str(out)


@pytest.fixture(scope="module")
def full_marks():
    code, table, output = check(REPO)
    assert code == 0, output
    return table


# ---------------------------------------------------------------- markers and blanking, in process

def test_every_assignment_has_one_region_where_expected():
    assert list(WHERE) == list(HINTS)
    marked = assignments.marked_files(REPO, assignments.repo_files(REPO))
    assert {name: path for path, regions in marked.items() for name in regions} == WHERE
    with open(os.path.join(REPO, "docs", "assignments.md")) as f:
        docs = f.read()
    for name in HINTS:
        assert os.path.exists(os.path.join(REPO, "tests", "assignments", f"test_{name}.py")), name
        assert re.search(rf"^## \d+\. {name} ", docs, re.M), name


def test_blank_keeps_indentation_and_the_rest_of_the_source():
    source = ("def f(x):\n"
              "    y = x + 1\n"
              "    for t in range(3):\n"
              "        # BEGIN ASSIGNMENT generate\n"
              "        y = y * t\n"
              "        # END ASSIGNMENT\n"
              "    return y\n"
              "\n"
              "def g(x):\n"
              "    # BEGIN ASSIGNMENT dpo_loss\n"
              "    return -x\n"
              "    # END ASSIGNMENT\n")
    blanked = blank(source)
    assert blanked.count("NotImplementedError") == 2 and "y * t" not in blanked and "-x" not in blanked
    namespace = {}
    exec(compile(blanked, "blanked", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="^generate: not written yet"):
        namespace["f"](1)
    with pytest.raises(NotImplementedError, match=re.escape(hint_line("dpo_loss"))):
        namespace["g"](1)
    only = blank(source, names=["dpo_loss"])  # a subset: the other region stays, markers and all
    assert "y = y * t" in only and "-x" not in only
    with pytest.raises(ValueError, match="add its hint"):
        blank(source.replace("dpo_loss", "no_such_piece"))


def test_make_refuses_a_target_inside_the_repo_or_not_empty(tmp_path):
    with pytest.raises(SystemExit, match="inside the repository"):
        assignments.make(os.path.join(REPO, "out", "student"))
    (tmp_path / "something").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        assignments.make(str(tmp_path))
    with pytest.raises(SystemExit, match="unknown assignment"):
        assignments.make(str(tmp_path / "new"), ["policy_los"])


# ---------------------------------------------------------------- the student copy

def test_student_copy_holds_the_code_but_no_solution(student):
    files = assignments.repo_files(REPO)
    for path in ("data/tinystories_sample.txt", "docs/assignments.md", "train_sft.py", "tests/conftest.py",
                 "nanorlhf/assignments.py", "tests/assignments/test_policy_loss.py"):
        assert os.path.isfile(os.path.join(student, path)), path
    for path in ("tests/test_assignments.py", "out", "data/cache", ".git"):
        assert not os.path.exists(os.path.join(student, path)), path
    for path in set(WHERE.values()):
        with open(os.path.join(student, path)) as f:
            source = f.read()
        assert "# BEGIN ASSIGNMENT" not in source and "# END ASSIGNMENT" not in source, path
        for name, where in WHERE.items():
            if where == path:
                assert hint_line(name) in source, name
    untouched = [p for p in files if p not in WHERE.values()]
    assert len(untouched) > 20
    for path in untouched:
        with open(os.path.join(REPO, path), "rb") as a, open(os.path.join(student, path), "rb") as b:
            assert a.read() == b.read(), path


def test_student_copy_imports(student):
    modules = sorted(f[:-3] for f in os.listdir(os.path.join(student, "nanorlhf")) if f.endswith(".py"))
    assert {"model", "sampler", "reward", "ppo", "dpo"} <= set(modules)
    result = run(["-c", "import " + ", ".join(f"nanorlhf.{m}" for m in modules)], student)
    assert result.returncode == 0, result.stderr


def test_script_in_student_copy_stops_with_one_line_naming_the_first_missing_piece(student, tmp_path):
    out = tmp_path / "sft"
    result = run(["train_sft.py", "--preset", "tiny", "--out_dir", str(out)], student)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [f"train_sft.py needs assignment attention_kv_cache (and 1 more: generate), not written yet: read "
                     f"{assignments.section('attention_kv_cache')}, then python -m nanorlhf.assignments check "
                     f"attention_kv_cache"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not out.exists()  # no traceback, no empty output folder


def test_student_copy_fails_every_assignment_with_its_own_hint(student, full_marks):
    code, table, output = check(student)
    assert code == 1
    assert f"next: attention_kv_cache (not implemented): read {assignments.section('attention_kv_cache')}" in output
    # "not implemented": every test failed, each with NotImplementedError("<its own name>: ...");
    # a test of one assignment that ran into another's raise would show up as "failing"
    assert table == {name: (0, total, "not implemented") for name, (_, total, _) in full_marks.items()}, output


def test_putting_solutions_back_passes_exactly_their_tests(full_marks, tmp_path):
    copy_dir = str(tmp_path / "student")
    assignments.make(copy_dir)
    put_back(copy_dir, "generate")  # its tests use a model without attention: attention may stay blank
    code, table, output = check(copy_dir)
    assert code == 1
    for name, (_, total, _) in full_marks.items():
        assert table[name] == ((total, total, "done") if name == "generate" else (0, total, "not implemented")), output
    put_back(copy_dir, "policy_loss")
    put_back(copy_dir, "value_loss", mistake=("0.5 * masked_mean", "masked_mean"))  # a wrong answer
    code, table, output = check(copy_dir, "policy_loss", "value_loss", "dpo_loss")  # check NAME... runs those only
    assert code == 1 and list(table) == ["policy_loss", "value_loss", "dpo_loss"], output
    assert table["policy_loss"] == (full_marks["policy_loss"][1], full_marks["policy_loss"][1], "done")
    passed, total, status = table["value_loss"]
    assert passed < total and status == "failing", output  # failing, and not for a NotImplementedError
    assert re.search(r"^value_loss: \d+ test\(s\) failing", output, re.M), output
    assert re.search(r"^  test_value_loss_\w+: ", output, re.M), output  # each failing test, with what it says
    assert "details: python -m pytest -q tests/assignments/test_value_loss.py" in output
    assert f"next: value_loss (failing): read {assignments.section('value_loss')}" in output
    assert table["dpo_loss"] == (0, full_marks["dpo_loss"][1], "not implemented")


def test_repository_scores_full_marks(full_marks):
    assert list(full_marks) == list(HINTS)
    for name, (passed, total, status) in full_marks.items():
        assert total >= 2 and passed == total and status == "done", name


# ---------------------------------------------------------------- hints, tracks, the mutation check

def code_tokens(source):
    """The python tokens of source without comments and layout."""
    import io
    import tokenize
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]


def test_no_raise_text_contains_code_from_the_solution():
    marked = assignments.marked_files(REPO, assignments.repo_files(REPO))
    for path, regions in marked.items():
        for name, region in regions.items():
            text = hint_line(name)
            assert text.startswith(f"{name}: not written yet; read {assignments.section(name)}"), name
            assert not re.search(r"[=\[\]*+]|\w\(", text.split("; hints:")[0]), (name, text)  # no expression, no call
            tokens = code_tokens(region)
            said = code_tokens(text.replace("'", " "))
            grams = {tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)}
            leaked = [g for g in (tuple(said[i:i + 3]) for i in range(len(said) - 2)) if g in grams]
            assert not leaked, (name, leaked)


def test_hints_come_one_tier_per_call(tmp_path, capsys):
    for name, tiers in HINTS.items():
        assert len(tiers) >= 3 and all(t.strip() for t in tiers), name
    name = "policy_loss"
    assert assignments.hint(name, repo=str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert HINTS[name][0] in out and HINTS[name][1] not in out and "the next call shows hint 2" in out
    assert assignments.hint(name, repo=str(tmp_path)) == 2
    assert HINTS[name][1] in capsys.readouterr().out
    assert assignments.hint(name, tier=1, repo=str(tmp_path)) == 1  # --tier K: up to K, the count is kept
    out = capsys.readouterr().out
    assert HINTS[name][1] not in out and "the next call shows hint 3" in out
    assert assignments.hint(name, repo=str(tmp_path)) == 3 and HINTS[name][2] in capsys.readouterr().out
    assert assignments.hint(name, repo=str(tmp_path)) == 3  # stays at the last tier
    assert assignments.hint("dpo_loss", repo=str(tmp_path)) == 1  # each assignment has its own count
    with pytest.raises(SystemExit, match="tiers 1 to 3"):
        assignments.hint(name, tier=4, repo=str(tmp_path))


def test_check_hint_on_the_command_line(student):
    result = run(["-m", "nanorlhf.assignments", "check", "--hint", "compute_gae", "--tier", "2"], student)
    assert result.returncode == 0, result.stderr
    assert HINTS["compute_gae"][0] in result.stdout and HINTS["compute_gae"][1] in result.stdout
    assert HINTS["compute_gae"][2] not in result.stdout


def test_tracks_cover_every_assignment_once_in_order():
    assert [n for names in assignments.TRACKS.values() for n in names] == list(HINTS)


def test_ppo_track_runs_train_ppo_once_its_pieces_are_written(tmp_path):
    copy_dir = str(tmp_path / "ppo-student")
    assignments.make(copy_dir, track="ppo")
    for path, name in ((p, n) for n, p in WHERE.items()):
        with open(os.path.join(copy_dir, path)) as f:
            blanked = raise_line(name).strip() in f.read()
        assert blanked == (name in assignments.TRACKS["ppo"]), name
    out = tmp_path / "run"
    flags = ["--preset", "tiny", "--sft_dir", str(out / "sft"), "--rm_dir", str(out / "rm"), "--iterations", "2",
             "--eval_prompts", "8"]
    put_back(copy_dir, *assignments.TRACKS["ppo"][:-1])  # adaptive_kl still missing: one line, no folder
    result = run(["train_ppo.py", *flags, "--out_dir", str(out / "ppo")], copy_dir, timeout=300)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"train_ppo.py needs assignment adaptive_kl, not written yet: read {assignments.section('adaptive_kl')}, "
        "then python -m nanorlhf.assignments check adaptive_kl"], result.stderr[-3000:]
    assert not out.exists()
    put_back(copy_dir, "adaptive_kl")
    result = run(["train_ppo.py", *flags, "--out_dir", str(out / "ppo")], copy_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(out / "ppo" / "ckpt.pt") and os.path.isfile(out / "ppo" / "metrics.jsonl")


def test_pg_track_runs_train_pg_once_its_pieces_are_written(tmp_path):
    copy_dir = str(tmp_path / "pg-student")
    assignments.make(copy_dir, track="pg")
    for path, name in ((p, n) for n, p in WHERE.items()):
        with open(os.path.join(copy_dir, path)) as f:
            assert (raise_line(name).strip() in f.read()) == (name in assignments.TRACKS["pg"]), name
    put_back(copy_dir, "kl_k3", "leave_one_out_baseline")  # group_advantages still missing: one line, no folder
    out = tmp_path / "run"
    result = run(["train_pg.py", "--preset", "tiny", "--sft_dir", str(out / "sft"), "--rm_dir", str(out / "rm"),
                  "--out_dir", str(out / "pg")], copy_dir)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"train_pg.py needs assignment group_advantages, not written yet: read "
        f"{assignments.section('group_advantages')}, then python -m nanorlhf.assignments check group_advantages"], \
        result.stderr[-3000:]
    assert not out.exists()
    put_back(copy_dir, "group_advantages")  # the three written: GRPO runs on them (tiny SFT and RM first)
    result = run(["train_pg.py", "--preset", "tiny", "--algo", "grpo", "--iterations", "2", "--eval_prompts", "8",
                  "--sft_dir", str(out / "sft"), "--rm_dir", str(out / "rm"), "--out_dir", str(out / "pg")],
                 copy_dir, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isfile(out / "pg" / "ckpt.pt") and os.path.isfile(out / "pg" / "metrics.jsonl")


def test_mutation_check_every_wrong_answer_is_caught_by_its_named_test():
    from nanorlhf import mutants
    assert len(mutants.MUTANTS) >= 40 and set(mutants.TARGETS) == set(HINTS)
    with open(os.path.join(REPO, "docs", "assignments.md")) as f:
        docs = f.read()
    for m in mutants.MUTANTS:
        assert m.test in docs and m.what in docs, m.what  # the docs list each mutant and the test that catches it
    result = run(["-m", "nanorlhf.assignments", "mutants"], REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"{len(mutants.MUTANTS)}/{len(mutants.MUTANTS)} mutants caught" in result.stdout


def test_instructor_files_stay_out_of_the_student_copy(student):
    for path in ("nanorlhf/mutants.py", "nanorlhf/mutants_pg.py", "nanorlhf/mutants_ppo.py", "docs/instructor.md"):
        assert os.path.isfile(os.path.join(REPO, path)) and not os.path.exists(os.path.join(student, path)), path
    result = run(["-m", "nanorlhf.assignments", "mutants"], student)
    assert result.returncode != 0 and "instructor" in result.stderr
