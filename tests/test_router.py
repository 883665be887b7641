"""SGLang's router (``sglang-router``, policy ``cache_aware``) in front of two LoopServe workers.

Two single-rank servers (one core's thread each) behind one router. Four multi-turn conversations
through the router: every second turn lands on the worker that holds its first (the worker reports
the whole first turn as cached tokens; the other worker holds none of it). Then the worker holding
most of them is killed: every later request gets an answer from the other worker or an error,
within a bound, and the router does fail over.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from conftest import GATES_FOR_SHORT_CONVERSATIONS, LOG_DIR, first_tokens, user_turn
from sglang_loopserve.frontends import module_doc
from sglang_loopserve.server import Router, SGLangServer

#: Every request through the router returns within this many seconds, killed worker or not.
BOUND_S = 180


@pytest.fixture(scope="module")
def fleet(model_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two servers on two cores: one thread each
    workers = [SGLangServer(model_path, max_total_tokens=8192, env=env, log_path=LOG_DIR / f"server-worker{i}.log",
                            extra_args=["--enable-loopserve", *GATES_FOR_SHORT_CONVERSATIONS]) for i in range(2)]
    try:
        for worker in workers:
            worker.start()
        with Router([w.url for w in workers], policy="cache_aware", log_path=LOG_DIR / "router.log",
                    extra_args=["--request-timeout-secs", str(BOUND_S), "--health-check-interval-secs", "5"]) as router:
            yield router.url, workers
    finally:
        for worker in workers:
            worker.stop()


def _generate(url, text, max_new_tokens=12, timeout=BOUND_S):
    r = requests.post(url + "/generate", timeout=timeout, json={
        "text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}})
    return r


def _cached_on(worker_url, text):
    """Tokens of ``text`` a worker finds cached (asked directly, one token generated)."""
    r = _generate(worker_url, text, max_new_tokens=1)
    r.raise_for_status()
    return r.json()["meta_info"]["cached_tokens"]


def test_each_conversation_returns_to_its_worker_then_a_killed_worker_fails_over(fleet, tokenizer):
    url, workers = fleet
    modules = ("textwrap", "shlex", "heapq", "bisect")
    turns = {}
    for i, name in enumerate(modules):
        doc = first_tokens(module_doc(name), tokenizer, 500)
        first = user_turn(f"Conversation {i}. Text:\n\n{doc}\n\nWhat is this text about?")
        r = _generate(url, first)
        r.raise_for_status()
        out = r.json()
        assert out["meta_info"]["loopserve"]["enabled"] is True
        turns[name] = (out["meta_info"]["prompt_tokens"], first + out["text"] + "<|im_end|>\n")
    for name, (prompt1, history) in turns.items():
        second = history + user_turn("Name one function it describes.")
        r = _generate(url, second)
        r.raise_for_status()
        # The router sent the second turn where the first is: its prompt and answer are cached.
        assert r.json()["meta_info"]["cached_tokens"] >= prompt1, (name, r.json()["meta_info"])
    # Each conversation is held by one worker alone (the other finds only the template's start).
    holders = []
    for name, (prompt1, history) in turns.items():
        cached = [_cached_on(w.url, history) for w in workers]
        assert sorted(cached)[0] < 16 and sorted(cached)[1] >= prompt1, (name, cached)
        holders.append(cached.index(max(cached)))
    # The worker holding most of the conversations is killed: the router answers from the other one
    # (their history prefilled again there), or says it could not; nothing hangs.
    victim = workers[max((0, 1), key=holders.count)]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(30)
    statuses = []
    for name, (_, history) in turns.items():
        t = time.monotonic()
        r = _generate(url, history + user_turn("One more sentence about it, please."))
        assert time.monotonic() - t < BOUND_S
        assert r.status_code == 200 or (500 <= r.status_code < 600 and r.text), (r.status_code, r.text)
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.json()["text"] is not None
    print(f"conversations per worker {[holders.count(w) for w in (0, 1)]}; after the kill: {statuses}")
    assert 200 in statuses, statuses  # the router fails over to the live worker
