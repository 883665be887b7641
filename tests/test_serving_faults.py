"""A LoopServe server under bad input, injected faults and load: it refuses, fails one request,
or answers, and serves on with nothing leaked.

One server for the module: ``--radix-eviction-policy loopserve`` over a small KV pool (so the soak
prunes and evicts), the short-conversation gates (the sparse paths run), and the fault hook armed
for request ids starting ``fault-`` (``srt/faults.py``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from sglang_loopserve.testing import fuzzed_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402

from conftest import GATES_FOR_SHORT_CONVERSATIONS, LOG_DIR  # noqa: E402

FAULT_PREFIX = "fault-"
CASES = fuzzed_settings()


@pytest.fixture(scope="module")
def faulty_server(model_path):
    from sglang_loopserve.server import SGLangServer

    import os

    env = dict(os.environ, SGLANG_LOOPSERVE_INJECT_FAULT=f"decode:{FAULT_PREFIX}")
    srv = SGLangServer(model_path, max_total_tokens=soak.POOL_TOKENS, env=env,
                       extra_args=soak.server_args(GATES_FOR_SHORT_CONVERSATIONS),
                       log_path=LOG_DIR / "server-faults.log")
    with srv:
        yield srv


def _generate(url, loopserve, **kw):
    body = {"text": "Say hello.", "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                     "custom_params": {"loopserve": loopserve}}}
    return requests.post(url + "/generate", data=json.dumps(body | kw), timeout=120,
                         headers={"Content-Type": "application/json"})


def _chat(url, loopserve, stream=False, **kw):
    body = {"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
            "temperature": 0, "stream": stream, "custom_params": {"loopserve": loopserve}} | kw
    return requests.post(url + "/v1/chat/completions", data=json.dumps(body), timeout=120, stream=stream,
                         headers={"Content-Type": "application/json"})


def _completion(url, loopserve, stream=False):
    body = {"model": "default", "prompt": "Say hello.", "max_tokens": 4, "temperature": 0, "stream": stream,
            "custom_params": {"loopserve": loopserve}}
    return requests.post(url + "/v1/completions", data=json.dumps(body), timeout=120, stream=stream,
                         headers={"Content-Type": "application/json"})


ENDPOINTS = {"generate": _generate, "chat": _chat, "completion": _completion,
             "chat_stream": lambda url, ls: _chat(url, ls, stream=True)}


def _refused_naming(response, field):
    assert 400 <= response.status_code < 500, (field, response.status_code, response.text[:300])
    assert field in response.text, (field, response.text[:300])


def test_every_fuzzed_setting_is_refused_naming_its_field_or_served(faulty_server):
    url = faulty_server.url
    before = soak.server_state(url)
    refused = [c for c in CASES if c.field is not None]
    for case in refused:
        for send in ENDPOINTS.values():
            _refused_naming(send(url, case.value), case.field)
    after = soak.server_state(url)
    # Nothing reached the scheduler: no prompt token computed, nothing tracked or allocated.
    assert after["radix"]["reprefilled_tokens"] == before["radix"]["reprefilled_tokens"]
    assert after["tracked_requests"] == 0 and after["idle_check"]["kv_balanced"]
    for case in (c for c in CASES if c.field is None):  # valid, however extreme: answered
        r = _generate(url, case.value)
        assert r.status_code == 200 and r.json()["meta_info"]["finish_reason"]["type"] == "length", (
            case.value, r.text[:300])
    assert _chat(url, {"alpha": 0.5}).json()["choices"][0]["message"]["content"]
    soak.assert_idle(url)


def test_max_tokens_0_is_a_prefill_only_request_as_on_stock(faulty_server):
    """SGLang serves ``max_tokens`` 0 (a prefill that warms the cache), so LoopServe does too."""
    r = _chat(faulty_server.url, {"alpha": 0.5}, max_tokens=0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 0, r.text[:300]
    soak.assert_idle(faulty_server.url)


@pytest.mark.parametrize("shape", ["empty_messages", "past_context", "bad_json", "not_object"])
def test_bad_request_shapes_are_refused_and_the_server_serves_on(faulty_server, shape):
    url = faulty_server.url
    if shape == "empty_messages":
        r = _chat(url, {}, messages=[])
    elif shape == "past_context":
        r = _chat(url, {}, messages=[{"role": "user", "content": "word " * soak.CONTEXT_TOKENS}])
    elif shape == "bad_json":
        r = requests.post(url + "/v1/chat/completions", data="{not json", timeout=60,
                          headers={"Content-Type": "application/json"})
    else:
        r = _generate(url, {}, sampling_params=[1, 2])
    assert 400 <= r.status_code < 500, r.text[:300]
    assert r.json()  # a JSON error body, not a dropped connection
    assert _generate(url, {}).status_code == 200
    soak.assert_idle(url)


def test_an_injected_fault_fails_its_request_and_not_the_others(faulty_server):
    url = faulty_server.url
    failed_before = soak.server_state(url)["faults"]["requests_failed"]
    results = {}

    def ask(name, rid):
        body = {"text": f"Count from one to twenty ({name}).", "rid": rid,
                "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
        results[name] = requests.post(url + "/generate", json=body, timeout=300)

    threads = [threading.Thread(target=ask, args=(f"ok{i}", f"ok-{i}-{time.time()}")) for i in range(3)]
    threads.append(threading.Thread(target=ask, args=("fault", f"{FAULT_PREFIX}{time.time()}")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    fault = results["fault"]
    assert fault.status_code == 500 and "LoopServe failed on this request" in fault.text, fault.text[:300]
    for i in range(3):
        ok = results[f"ok{i}"]
        assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 24
    # The OpenAI chat endpoint, streamed: an error event, then the end of the stream.
    with _chat(url, {}, stream=True, rid=f"{FAULT_PREFIX}chat-{time.time()}", max_tokens=16) as r:
        events = [line for line in r.iter_lines() if line]
    assert any(b"LoopServe failed" in e for e in events) and events[-1] == b"data: [DONE]"
    assert soak.server_state(url)["faults"]["requests_failed"] == failed_before + 2
    assert _generate(url, {}).status_code == 200
    soak.assert_idle(url)


def test_the_openai_client_reads_loopserve_stats(faulty_server):
    from openai import OpenAI

    client = OpenAI(base_url=faulty_server.url + "/v1", api_key="none")
    extra = {"custom_params": {"loopserve": {"decode_budget": 64, "recent": 8}}}
    messages = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0,
                                          extra_body=extra)
    stats = chat.sglext["loopserve"]
    assert stats["enabled"] is True and stats["method"] == "loopserve" and stats["decode_steps"] == 11
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=12,
                                                 temperature=0, stream=True, extra_body=extra))
    assert chunks[-1].choices == [] and chunks[-1].sglext["loopserve"] == stats  # same request, same work
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    done = client.completions.create(model="default", prompt="Colours:", max_tokens=6, temperature=0,
                                     extra_body=extra)
    assert done.sglext["loopserve"]["decode_steps"] == 5
    streamed = list(client.completions.create(model="default", prompt="Colours:", max_tokens=6, temperature=0,
                                              stream=True, extra_body=extra))
    assert streamed[-1].sglext["loopserve"]["decode_steps"] == 5
    soak.assert_idle(faulty_server.url)


def test_a_short_soak_keeps_every_invariant(faulty_server, tmp_path):
    summary = soak.run(faulty_server.url, seconds=60, clients=3, seed=1, check_every_s=30,
                       out=tmp_path / "soak.json", doc_tokens=(100, 400))
    assert summary["violations"] == [], summary["violations"]
    kinds = summary["requests_by_kind"]
    assert all(kinds.get(kind, 0) > 0 for kind in ("generate", "openai_stream", "frontend", "disconnect",
                                                   "malformed", "too_long")), kinds
    assert summary["invariant_checks"]["passed"] >= 2 and summary["invariant_checks"]["failed"] == 0
