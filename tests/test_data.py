"""Preference-pair loading: formats, refused rows with their line numbers, and the split."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from graddyn.data.pairs import (
    ASSISTANT_TAG,
    PreferencePair,
    load_pairs,
    split_hh_dialogue,
    split_pairs,
)


def hh(prompt: str, response: str) -> str:
    return f"\n\nHuman: {prompt}{ASSISTANT_TAG}{response}"


def write_lines(path, lines: list[str]):
    text = "".join(line + "\n" for line in lines)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_bundled_file_counts():
    pair_file = load_pairs()
    assert len(pair_file.pairs) == 2303
    assert pair_file.skipped_by_reason() == {
        "chosen and rejected prompts differ": 5,
        "empty response": 4,
    }
    assert len(pair_file.pairs) + len(pair_file.skipped) == 2312
    ids = [pair.pair_id for pair in pair_file.pairs]
    assert ids == sorted(set(ids)) and ids[0] == 0 and ids[-1] == 2311
    skipped_ids = {row.line - 1 for row in pair_file.skipped}
    assert skipped_ids.isdisjoint(ids) and skipped_ids | set(ids) == set(range(2312))
    for pair in pair_file.pairs[:50]:
        assert pair.prompt.endswith(ASSISTANT_TAG)
        assert pair.chosen.strip() and pair.rejected.strip()


def test_hh_and_explicit_rows_plain_and_gzip(tmp_path):
    lines = [
        json.dumps({"chosen": hh("Hi?", " Hello."), "rejected": hh("Hi?", " Go away.")}),
        json.dumps({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}),
        json.dumps(
            {"chosen": hh("naïve café?", " Oui. ✓"), "rejected": hh("naïve café?", " Non.")}
        ),
    ]
    expected = [
        PreferencePair(0, f"\n\nHuman: Hi?{ASSISTANT_TAG}", " Hello.", " Go away."),
        PreferencePair(1, "Q: 2+2?\nA:", " 4", " 5"),
        PreferencePair(2, f"\n\nHuman: naïve café?{ASSISTANT_TAG}", " Oui. ✓", " Non."),
    ]
    for name in ("pairs.jsonl", "pairs.jsonl.gz"):
        pair_file = load_pairs(write_lines(tmp_path / name, lines))
        assert pair_file.pairs == expected
        assert pair_file.skipped == []
        assert pair_file.path == str(tmp_path / name)


def test_multi_turn_prompt_splits_at_last_assistant_turn():
    dialogue = hh("Hi", " Hello.") + "\n\nHuman: And now?" + ASSISTANT_TAG + " Bye."
    prompt, response = split_hh_dialogue(dialogue)
    assert response == " Bye."
    assert prompt == dialogue[: -len(" Bye.")]
    assert prompt.count(ASSISTANT_TAG) == 2
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_dialogue("\n\nHuman: no answer")


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    good = json.dumps({"prompt": "P", "chosen": " a", "rejected": " b"})
    lines = [
        good,  # 1
        '{"prompt": "P", "chosen": " a", "rejected": ',  # 2 malformed JSON
        json.dumps({"prompt": "P", "chosen": " a"}),  # 3 missing field
        json.dumps({"prompt": "P", "chosen": 5, "rejected": " b"}),  # 4 non-string
        json.dumps({"prompt": "P", "chosen": " a", "rejected": "   "}),  # 5 empty response
        "",  # 6 blank line
        json.dumps({"chosen": hh("A", " x"), "rejected": hh("B", " y")}),  # 7 prompts differ
        json.dumps(["P", " a", " b"]),  # 8 not an object
        json.dumps({"prompt": 3, "chosen": " a", "rejected": " b"}),  # 9 non-string prompt
        json.dumps({"chosen": hh("A", ""), "rejected": hh("A", " y")}),  # 10 empty response
        good,  # 11
    ]
    pair_file = load_pairs(write_lines(tmp_path / "mixed.jsonl", lines))
    assert [pair.pair_id for pair in pair_file.pairs] == [0, 10]
    reasons = {row.line: row.reason for row in pair_file.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert reasons[2].startswith("malformed JSON")
    assert "'rejected'" in reasons[3] and "missing" in reasons[3]
    assert "'chosen'" in reasons[4] and "not a string" in reasons[4]
    assert reasons[5] == "empty response"
    assert reasons[6] == "blank line"
    assert reasons[7] == "chosen and rejected prompts differ"
    assert "object" in reasons[8]
    assert "'prompt'" in reasons[9]
    assert reasons[10] == "empty response"


def test_file_without_valid_pair_names_the_file(tmp_path):
    path = write_lines(tmp_path / "nothing-valid.jsonl", ["not json", "", "{}"])
    with pytest.raises(ValueError, match="nothing-valid.jsonl") as error:
        load_pairs(path)
    assert "line 1" in str(error.value)
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_pairs(empty)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        load_pairs(tmp_path / "absent.jsonl")


def _pairs(n: int) -> list[PreferencePair]:
    return [PreferencePair(i * 3 + 1, f"p{i}", f" c{i}", f" r{i}") for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    pairs = _pairs(200)
    train, held = split_pairs(pairs, 0.1, seed=5)
    assert len(held) == 20 and len(train) == 180
    train_ids = {p.pair_id for p in train}
    held_ids = {p.pair_id for p in held}
    assert train_ids.isdisjoint(held_ids)
    assert train_ids | held_ids == {p.pair_id for p in pairs}

    assert split_pairs(pairs, 0.1, seed=5) == (train, held)
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    assert split_pairs(shuffled, 0.1, seed=5) == (train, held), "input order is irrelevant"
    _, other_held = split_pairs(pairs, 0.1, seed=6)
    assert {p.pair_id for p in other_held} != held_ids

    _, tiny_held = split_pairs(_pairs(3), 0.01, seed=0)
    assert len(tiny_held) == 1, "at least one held-out pair"
    for fraction in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="held_out_fraction"):
            split_pairs(pairs, fraction, seed=0)


def test_bundled_split_sizes():
    pairs = load_pairs().pairs
    train, held = split_pairs(pairs, 0.1, seed=0)
    assert len(held) == round(0.1 * len(pairs)) == 230
    assert len(train) + len(held) == len(pairs)
    assert {p.pair_id for p in train}.isdisjoint(p.pair_id for p in held)
