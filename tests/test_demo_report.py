"""The demo's turns file: what plots and results folders read (no server)."""

import json

from sglang_loopserve import demo
from sglang_loopserve.frontends.multiturn import TurnResult


def _turn(ttft, rate, density=None):
    ls = None if density is None else {"prefill_density": density, "decode_tokens_attended": 10.0,
                                       "decode_tokens_cached": 40.0}
    return TurnResult(question="q", answer="a", prompt_tokens=100, cached_tokens=20, completion_tokens=8,
                      latency_s=1.0, time_to_first_token_s=ttft, decode_tokens_per_s=rate, loopserve=ls)


def test_turns_file_holds_every_turn_of_both_servers(tmp_path):
    results = {"stock": [_turn(2.0, 5.0), _turn(4.0, 3.0)],
               "loopserve": [_turn(2.1, 6.0, 1.0), _turn(1.0, 4.5, 0.5)]}
    path = tmp_path / "turns.json"
    demo.write_turns(str(path), results, "/models/m", "short")
    doc = json.loads(path.read_text())
    assert doc["model"] == "/models/m" and doc["conversation"] == "short"
    assert doc["cpu"] == demo.cpu_kind()
    assert [t["time_to_first_token_s"] for t in doc["configs"]["stock"]] == [2.0, 4.0]
    assert doc["configs"]["loopserve"][1]["loopserve"]["prefill_density"] == 0.5
    assert doc["configs"]["loopserve"][1]["decode_tokens_per_s"] == 4.5


def test_json_flag_defaults_beside_the_logs():
    assert demo.parse_args(["--log-prefix", "x"]).json is None
    assert demo.parse_args(["--json", "t.json"]).json == "t.json"


def test_warm_up_sends_one_untimed_request_then_flushes_the_cache(monkeypatch):
    """Both servers of ``make run`` answer one request before the conversation, over text none of
    its turns holds, and the radix cache is flushed after it: nothing of it is found cached later."""
    import requests

    from sglang_loopserve.frontends.multiturn import GROWING_CONVERSATION

    calls = []

    class Ok:
        def raise_for_status(self):
            pass

    monkeypatch.setattr(requests, "post", lambda url, json=None, timeout=None: calls.append((url, json)) or Ok())
    demo.warm_up("http://h:1", tokens=200)
    assert [url for url, _ in calls] == ["http://h:1/generate", "http://h:1/flush_cache"]
    text = calls[0][1]["text"]
    assert 150 * demo.CHARS_PER_TOKEN < len(text) <= 220 * demo.CHARS_PER_TOKEN
    used = {m for modules, _ in GROWING_CONVERSATION for m in modules}
    assert "calendar" not in used and all(demo.module_doc(m)[:200] not in text for m in used)
