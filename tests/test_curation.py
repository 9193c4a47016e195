"""Curation: PII never reaches a training file, filters, dedupe, user split, contexts."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from training.curation import (
    CurationConfig,
    curate,
    make_scrubber,
    sft_records,
    write_jsonl,
)

SYSTEM = {"pirate": "You are a pirate.", "chef": "You are a chef."}


def _turns(n_users: int = 12, turns_per_session: int = 3) -> pd.DataFrame:
    rows = []
    for u in range(n_users):
        for t in range(turns_per_session):
            rows.append(
                {
                    "experiment_id": "e0",
                    "session_id": f"s{u}",
                    "user_id": f"u{u}",
                    "character": "pirate" if u % 2 else "chef",
                    "day": 0,
                    "turn_index": t,
                    "user_message": f"user {u} says thing {t}",
                    "bot_reply": f"reply number {t} to user {u}",
                    "unsafe": False,
                    "violates_any": False,
                    "follows_all": True,
                    "reported": False,
                    "continued": True,
                    "liked": False,
                    "gold_satisfaction": 0.0,
                }
            )
    return pd.DataFrame(rows)


def _planted_pii(n: int, seed: int) -> list[tuple[str, str]]:
    """(message, planted value) pairs written by the world's own PII planter."""
    from sim.user_llm import PII_TEMPLATES, UserSimulator

    # maybe_plant_pii reads only pii_rate and its lazily built Faker from the simulator.
    holder = SimpleNamespace(pii_rate=1.0, _faker=None)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = f"hello there, friend {chr(97 + i % 26)}"
        text, planted = UserSimulator.maybe_plant_pii(holder, base, rng)
        assert planted
        sentence = text[len(base) + 1 :]
        for template in (t for ts in PII_TEMPLATES.values() for t in ts):
            prefix, suffix = template.split("{}")
            if sentence.startswith(prefix) and sentence.endswith(suffix):
                out.append((text, sentence[len(prefix) : len(sentence) - len(suffix)]))
                break
        else:
            raise AssertionError(f"could not find the planted value in {sentence!r}")
    return out


def test_planted_pii_never_reaches_a_training_file(tmp_path):
    planted = _planted_pii(240, seed=3)
    turns = _turns(n_users=80, turns_per_session=3)
    turns["user_message"] = [text for text, _ in planted]
    # Bots sometimes echo what users said: the reply is scrubbed too.
    turns.loc[::7, "bot_reply"] = [f"got it, {value}!" for _, value in planted[::7]]
    data = curate(turns, np.random.default_rng(0), system_prompts=SYSTEM)
    assert data.n_pii_spans >= len(planted)
    train = write_jsonl(sft_records(data.train), tmp_path / "train.jsonl")
    held = write_jsonl(sft_records(data.held_out), tmp_path / "held_out.jsonl")
    text = train.read_text() + held.read_text()
    # Echoed replies collapse to the same scrubbed text; the rest survive curation.
    assert len(data.train) + len(data.held_out) >= 0.8 * len(turns)
    for _, value in planted:
        assert value not in text
        # No fragment that identifies: every run of 3+ digits and every e-mail local part.
        for digits in re.findall(r"\d{3,}", value):
            assert digits not in text, (value, digits)
        if "@" in value:
            assert value.split("@")[0] not in text
    assert "{{EMAIL}}" in text and "{{PHONE" in text and "{{ADDRESS" in text


@pytest.mark.parametrize(
    "text",
    [
        "I was born in 1999 and have 3 kids",
        "the score was 10-2 in 2024",
        "I have 12345 points and 42 lives",
        "I live on a boat, like a pirate",
    ],
)
def test_scrubber_leaves_ordinary_numbers_alone(text):
    assert make_scrubber().clean(text) == text


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("mail bob.smith@example.com now", "bob.smith@example.com"),
        ("call (555) 123-4567", "123-4567"),
        ("text me at 001-814-539-0116x4479", "539-0116"),
        ("I live at 742 Evergreen Terrace, Springfield, IL 62704", "Evergreen"),
        ("come visit, USNS Lane, FPO AA 13400", "13400"),
        ("my address is 906 Lane Manors Apt. 971, West Jimmyport, PR 02382", "Manors"),
    ],
)
def test_scrubber_removes_each_kind_of_pii(text, secret):
    assert secret not in make_scrubber().clean(text)


def test_filters_drop_unsafe_reported_violating_and_abandoned_replies():
    turns = _turns()
    turns.loc[0, "unsafe"] = True
    turns.loc[1, "reported"] = True
    turns.loc[2, "violates_any"] = True
    turns.loc[3, "continued"] = False
    turns.loc[4, "follows_all"] = False
    data = curate(
        turns,
        np.random.default_rng(0),
        CurationConfig(require_follows_all=True, held_out_share=0.0),
        system_prompts=SYSTEM,
    )
    kept = set(zip(data.train["session_id"], data.train["turn_index"], strict=True))
    for i in range(5):
        assert (turns.loc[i, "session_id"], turns.loc[i, "turn_index"]) not in kept
    assert len(data.train) == len(turns) - 5
    assert data.dropped["unsafe"] == 1
    assert data.dropped["reported"] == 1
    assert data.dropped["violates a prohibition"] == 1
    assert data.dropped["user left after it"] == 1
    assert data.dropped["misses an instruction"] == 1
    assert "gold_satisfaction" not in data.train.columns


def test_duplicates_and_overused_replies_are_dropped():
    turns = _turns(n_users=10, turns_per_session=1)
    turns["user_message"] = "same question"
    turns["bot_reply"] = "Same   Answer"  # normalised: case and whitespace ignored
    turns.loc[5:, "user_message"] = [f"question {i}" for i in range(5)]
    data = curate(
        turns,
        np.random.default_rng(0),
        CurationConfig(max_copies_per_reply=3, held_out_share=0.0),
        system_prompts=SYSTEM,
    )
    # The 5 rows sharing a question: exact duplicates up to the system prompt (2 characters)
    # leave 2; the remaining reply copies are capped at 3 overall.
    assert len(data.train) == 3
    assert data.dropped["duplicate context and reply"] == 3


def test_split_is_by_user_and_seeded():
    turns = _turns(n_users=20)
    a = curate(turns, np.random.default_rng(5), system_prompts=SYSTEM)
    b = curate(turns, np.random.default_rng(5), system_prompts=SYSTEM)
    assert set(a.train["user_id"]).isdisjoint(a.held_out["user_id"])
    assert a.held_out["user_id"].nunique() == 4  # 20% of 20 users
    assert list(a.held_out["user_id"]) == list(b.held_out["user_id"])


def test_prompt_is_the_session_so_far_with_the_system_prompt():
    turns = _turns(n_users=2).sample(frac=1.0, random_state=0)  # logged order does not matter
    data = curate(
        turns, np.random.default_rng(0), CurationConfig(held_out_share=0.0), system_prompts=SYSTEM
    )
    row = data.train[(data.train["user_id"] == "u1") & (data.train["turn_index"] == 2)].iloc[0]
    assert [m["role"] for m in row["prompt"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert row["prompt"][0]["content"] == SYSTEM["pirate"]
    assert row["prompt"][2]["content"] == "reply number 0 to user 1"
    assert row["prompt"][-1]["content"] == "user 1 says thing 2"
    assert row["completion"] == "reply number 2 to user 1"
    record = sft_records(data.train.iloc[[0]])[0]
    assert record["completion"][0]["role"] == "assistant"
    json.dumps(record)


def test_errors_name_the_missing_field_and_the_fix():
    turns = _turns().drop(columns=["continued"])
    with pytest.raises(ValueError, match="continued"):
        curate(turns, np.random.default_rng(0), system_prompts=SYSTEM)
    with pytest.raises(ValueError, match="system_prompts"):
        curate(_turns(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="held_out_share"):
        CurationConfig(held_out_share=1.5)
