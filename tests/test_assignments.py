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
         "kl_penalty_rewards": "nanorlhf/ppo.py", "compute_gae": "nanorlhf/ppo.py",
         "masked_whiten": "nanorlhf/ppo.py", "policy_loss": "nanorlhf/ppo.py", "value_loss": "nanorlhf/ppo.py",
         "adaptive_kl": "nanorlhf/ppo.py", "dpo_loss": "nanorlhf/dpo.py"}


def run(args, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def check(cwd, *names):
    """Run `check` in cwd -> (exit code, {name: (passed, total, status)}, output)."""
    result = run(["-m", "nanorlhf.assignments", "check", *names], cwd)
    rows = re.findall(r"^(\w+) +(\d+)/(\d+) +(.+)$", result.stdout, re.M)
    table = {name: (int(p), int(t), status.strip()) for name, p, t, status in rows if name != "total"}
    return result.returncode, table, result.stdout + result.stderr


def put_back(copy_dir, name, mistake=("", "")):
    """Copy the reference solution of one assignment from the repository into the student copy
    (with mistake = (old, new) replaced in it: a student's wrong answer)."""
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
    assert "11 assignments blanked" in result.stdout
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
    with pytest.raises(NotImplementedError, match="^generate: each step"):
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


def test_script_in_student_copy_stops_inside_the_first_blanked_piece(student, tmp_path):
    result = run(["train_sft.py", "--preset", "tiny", "--out_dir", str(tmp_path / "sft")], student)
    assert result.returncode != 0
    assert f"NotImplementedError: {hint_line('attention_kv_cache')}" in result.stderr, result.stderr[-3000:]
    # the innermost frame of the traceback is the raise that replaced the region, in model.py
    frames = re.findall(r'File "([^"]+)", line (\d+)', result.stderr)
    path, line = frames[-1]
    assert path == os.path.join(student, "nanorlhf", "model.py")
    with open(path) as f:
        assert "raise NotImplementedError" in f.read().splitlines()[int(line) - 1]


def test_student_copy_fails_every_assignment_with_its_own_hint(student, full_marks):
    code, table, output = check(student)
    assert code == 1
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
    assert "value_loss: test_" in output and "details: python -m pytest -q tests/assignments/test_value_loss.py" in output
    assert table["dpo_loss"] == (0, full_marks["dpo_loss"][1], "not implemented")


def test_repository_scores_full_marks(full_marks):
    assert list(full_marks) == list(HINTS)
    for name, (passed, total, status) in full_marks.items():
        assert total >= 2 and passed == total and status == "done", name
