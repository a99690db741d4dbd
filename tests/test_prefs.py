import json

import pytest

from nanorlhf.prefs import PreferenceFileError, read_prefs, split_hh, write_prefs


def test_split_hh_at_word_boundary():
    chosen = "\n\nHuman: hi\n\nAssistant: Hello there"
    rejected = "\n\nHuman: hi\n\nAssistant: Go away"
    assert split_hh(chosen, rejected) == ("\n\nHuman: hi\n\nAssistant: ", "Hello there", "Go away")


def test_split_hh_cuts_back_a_prefix_inside_a_word():
    # common prefix "I like ca" ends inside a word: cut back to "I like "
    assert split_hh("I like cats", "I like cars") == ("I like ", "cats", "cars")
    # a prefix that is a whole text would leave it empty: cut back further
    assert split_hh("Hi there ", "Hi there friend") == ("Hi ", "there ", "there friend")
    assert split_hh("abc", "abd") == ("", "abc", "abd")


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_prefs_plain_and_hh_rows(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "Once", "chosen": " upon", "rejected": " a", "rater": "r1", "weight": 0.5}),
        "",
        json.dumps({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}),
    ])
    rows = read_prefs(path)
    assert rows[0] == {"prompt": "Once", "chosen": " upon", "rejected": " a", "rater": "r1", "weight": 0.5}
    assert rows[1] == {"prompt": "Q: hi A: ", "chosen": "yes", "rejected": "no", "weight": 1.0}


def test_an_empty_response_that_ended_is_a_real_response(tmp_path):
    """The sampler can end a response at once; train_rm.py's rows say so and read back."""
    row = {"prompt": "x", "chosen": "a", "rejected": "", "chosen_ended": True, "rejected_ended": True}
    rows = read_prefs(write_lines(tmp_path / "ok.jsonl", [json.dumps(row)]))
    assert rows[0]["rejected"] == "" and rows[0]["rejected_ended"] is True
    for ended in (False, "yes"):  # unended and empty, or a flag that is not true: refused
        path = write_lines(tmp_path / "bad.jsonl", [json.dumps({**row, "rejected_ended": ended})])
        with pytest.raises(PreferenceFileError, match="line 1: 'rejected' must be a non-empty string"):
            read_prefs(path)


@pytest.mark.parametrize("bad_line, message", [
    ('{"prompt": "x", "chosen": "a", "rejected": ', "not valid JSON"),
    ('{"prompt": "x", "chosen": "a"}', "missing key 'rejected'"),
    ('{"prompt": "x", "chosen": 3, "rejected": "b"}', "'chosen' must be a non-empty string"),
    ('{"prompt": "x", "chosen": "a", "rejected": ""}', "'rejected' must be a non-empty string"),
    ('{"prompt": "x", "chosen": "a", "rejected": "a"}', "'chosen' and 'rejected' are the same text"),
    ('{"prompt": 1, "chosen": "a", "rejected": "b"}', "'prompt' must be a string"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "weight": -1}', "'weight' must be a number from 1e-06 to 1e+06"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "group": "g1"}', "'group' must be a non-negative integer"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "group": 1.5}', "'group' must be a non-negative integer"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "group": true}', "'group' must be a non-negative integer"),
    ('{"prompt": "x", "chosen": "a", "rejected": "b", "group": -1}', "'group' must be a non-negative integer"),
])
def test_bad_row_names_its_line(tmp_path, bad_line, message):
    good = json.dumps({"prompt": "x", "chosen": "a", "rejected": "b", "group": 0})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad_line, good])  # the bad row is on line 3
    with pytest.raises(PreferenceFileError) as err:
        read_prefs(path)
    assert f"line 3: {message}" in str(err.value) and "bad.jsonl" in str(err.value)


def test_missing_key_on_line_2_and_all_problems_listed(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "x", "rejected": "b"}),
        "not json",
    ])
    with pytest.raises(PreferenceFileError) as err:
        read_prefs(path)
    assert "line 2: missing key 'chosen'" in str(err.value)
    assert "line 3: not valid JSON" in str(err.value)


def test_rows_with_and_without_a_group_are_refused(tmp_path):
    """train_rm.py / train_dpo.py number a row without a group by its index, which can be a real group."""
    row = {"prompt": "x", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps({**row, "group": 1}), json.dumps(row),
                                                  json.dumps({**row, "group": 1})])
    with pytest.raises(PreferenceFileError, match="line 2: no 'group', but line 1 has one; give every row"):
        read_prefs(path)
    for rows in ([{**row, "group": 3}, {**row, "group": 3}], [row, row]):  # all grouped, or none: fine
        assert read_prefs(write_lines(tmp_path / "ok.jsonl", [json.dumps(r) for r in rows])) == \
            [{**r, "weight": 1.0} for r in rows]


def test_empty_and_missing_files(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PreferenceFileError, match="no rows"):
        read_prefs(path)
    with pytest.raises(PreferenceFileError, match="no preference file"):
        read_prefs(tmp_path / "nope.jsonl")


def test_write_read_round_trip(tmp_path):
    rows = [
        {"prompt": "Tom went", "chosen": " home.", "rejected": " away!", "weight": 1 / 3,
         "rater": "rater2", "chosen_ended": True, "rejected_ended": False, "group": 0},
        {"prompt": "", "chosen": "Ünïcode ✓\nnew line", "rejected": "plain", "weight": 1.0, "group": 1},
    ]
    path = tmp_path / "sub" / "prefs.jsonl"
    write_prefs(path, rows)
    assert read_prefs(path) == rows
    write_prefs(path, rows[:1])  # overwrite in place, no temp files left behind
    assert read_prefs(path) == rows[:1]
    assert [p.name for p in path.parent.iterdir()] == ["prefs.jsonl"]
