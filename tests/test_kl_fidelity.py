"""``benchmarks/kl_fidelity.py``'s pieces that need no server: the KL estimate, the settings,
the conversation (a cached first turn, the question where it is asked to be)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kl_fidelity  # noqa: E402


def test_per_token_kl_is_sglangs_estimate():
    sampled = [-0.5, -2.0, -1.0]
    replayed = [-0.5, -1.0, -3.0]
    kl = kl_fidelity.per_token_kl(sampled, replayed)
    assert kl[0] == 0.0
    assert kl[1] == pytest.approx(math.exp(1.0) - 2.0)
    assert kl[2] == pytest.approx(math.exp(-2.0) + 1.0)
    assert all(x >= 0 for x in kl)
    with pytest.raises(ValueError, match="differ in length"):
        kl_fidelity.per_token_kl([0.0], [0.0, 0.0])


def test_settings_always_have_the_floor_and_reject_unknown_names():
    s = kl_fidelity.parse_settings(["defaults", 'mine={"decode_budget": 512}'])
    assert list(s) == ["floor", "defaults", "mine"]
    assert s["floor"] == {"enabled": False} and s["mine"] == {"decode_budget": 512}
    with pytest.raises(SystemExit, match="unknown 'nope'"):
        kl_fidelity.parse_settings(["nope"])


@pytest.mark.parametrize("position", kl_fidelity.POSITIONS)
def test_conversation_caches_the_first_turn_and_places_the_question(tokenizer, position):
    first, prompt = kl_fidelity.conversation(tokenizer, 1, position, 2000)
    assert prompt[:len(first)] == first and 0.3 < len(first) / len(prompt) < 0.6
    assert 1500 < len(prompt) < 2300
    second = tokenizer.decode(prompt[len(first):])
    at = second.find("Question:") / len(second)
    assert {"start": at < 0.1, "middle": 0.3 < at < 0.7, "end": at > 0.9}[position], (position, at)


def _row(setting, position, kl, read=1.0):
    return {"setting": setting, "position": position, "kl": kl, "decode_read": read,
            "prefill_density": 1.0, "reselections": 0}


def test_table_gives_multiples_of_a_real_floor_and_none_of_a_rounding_floor():
    rows = [r for p in kl_fidelity.POSITIONS for r in
            (_row("floor", p, [0.002, 0.004]), _row("mine", p, [0.006, 0.012], read=0.5))]
    table = kl_fidelity.summarise(rows, ["floor", "mine"])
    mine = next(line for line in table.splitlines() if line.startswith("| mine"))
    assert mine.count("0.0090 (3.0x)") == 3 and "| 0.50 |" in mine
    fp32 = [dict(r, kl=[0.0, 1e-9]) if r["setting"] == "floor" else r for r in rows]
    mine = next(line for line in kl_fidelity.summarise(fp32, ["floor", "mine"]).splitlines()
                if line.startswith("| mine"))
    assert mine.count("0.0090 (floor ~0)") == 3
    # A run of some positions (--positions start): only their columns, no empty ones.
    start = [r for r in rows if r["position"] == "start"]
    head, _, _, mine = kl_fidelity.summarise(start, ["floor", "mine"]).splitlines()
    assert head.count("KL ") == 1 and "KL start" in head
    assert mine == "| mine | 0.0090 (3.0x) | 0.50 | 1.00 | 0.0 |"
