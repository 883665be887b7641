"""``--dp-size 2 --enable-loopserve``: SGLang's own data-parallel controller in front of two
schedulers, each with its own KV pool, radix tree and LoopServe state.

One server for the module (two ranks on this machine's cores). Requests are pinned to a rank with
SGLang's ``routed_dp_rank``: a conversation's second turn is a radix hit on the rank that holds its
first and a miss on the other; an abort (which SGLang sends to every rank) stops its request on one
rank while the other rank's request runs to its end; afterwards both ranks are idle-clean (every KV
token and request slot back, nothing tracked).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import GATES_FOR_SHORT_CONVERSATIONS, LOG_DIR, first_tokens, user_turn
from sglang_loopserve.frontends import module_doc
from sglang_loopserve.server import SGLangServer, loopserve_states

POOL = 8192


@pytest.fixture(scope="module")
def dp_server(model_path):
    srv = SGLangServer(model_path, max_total_tokens=POOL, log_path=LOG_DIR / "server-dp.log",
                       extra_args=["--enable-loopserve", "--dp-size", "2", *GATES_FOR_SHORT_CONVERSATIONS])
    with srv:
        yield srv



def _generate(url, text, rank, max_new_tokens=16, rid=None):
    body = {"text": text, "routed_dp_rank": rank,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0}}
    if rid is not None:
        body["rid"] = rid
    r = requests.post(url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()



def _idle_ranks(url, deadline=120):
    """Each rank's state once the radix caches are flushed (SGLang sends the flush to every rank)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if requests.post(url + "/flush_cache", timeout=30).status_code == 200:
            states = loopserve_states(url, timeout=30)
            if all(s["kv_evictable_tokens"] == 0 and s["idle_check"] for s in states):
                return states
        time.sleep(1)
    raise AssertionError("the ranks did not become idle")


def _assert_idle_clean(states):
    assert [s["dp_rank"] for s in states] == [0, 1]
    for s in states:
        check = s["idle_check"]
        assert s["tracked_requests"] == 0 and s["stale_requests"] == 0, s
        assert check["kv_balanced"] and check["kv"]["available"] == check["kv"]["total"] == POOL, check
        assert check["req_slots_free"] == check["req_slots_total"] and check["radix_sanity"] == "ok", check


def test_each_rank_reports_its_own_state(dp_server):
    states = loopserve_states(dp_server.url)
    assert [s["dp_rank"] for s in states] == [0, 1]
    assert all(s["gates"] and s["gates"]["decode_min_len"] == 0 for s in states)  # the flag, on both ranks


def _cpu_seconds(pgid):
    """CPU time (user + system) so far of every process in the server's process group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ... utime (12), stime (13)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def test_an_idle_server_leaves_the_cores_alone(dp_server):
    """With ``--sleep-on-idle`` the schedulers sleep and the data-parallel controller waits on its
    socket (SGLang's own loop polls without pause: a whole core)."""
    _idle_ranks(dp_server.url)
    time.sleep(2)
    before = _cpu_seconds(dp_server.proc.pid)
    time.sleep(5)
    assert _cpu_seconds(dp_server.proc.pid) - before < 1.0


def test_a_pinned_conversation_is_a_radix_hit_on_its_rank_and_a_miss_on_the_other(dp_server, tokenizer):
    url = dp_server.url
    docs = {r: first_tokens(module_doc(name), tokenizer, 700) for r, name in enumerate(("textwrap", "shlex"))}
    first = {r: user_turn(f"Text {r}:\n\n{docs[r]}\n\nWhat is this text about?") for r in docs}
    results, errors = {}, []

    def converse(rank):
        try:
            out = _generate(url, first[rank], rank)
            history = first[rank] + out["text"] + "<|im_end|>\n"
            second = history + user_turn("Name one function it describes.")
            results[rank] = (out, _generate(url, second, rank), second)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(f"rank {rank}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=converse, args=(r,)) for r in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and set(results) == {0, 1}, errors
    for rank, (out1, out2, second) in results.items():
        prompt1 = out1["meta_info"]["prompt_tokens"]
        assert out1["meta_info"]["loopserve"]["enabled"] is True
        # The second turn finds its first turn (prompt and answer) cached on its own rank.
        assert out2["meta_info"]["cached_tokens"] >= prompt1, (rank, out2["meta_info"])
        # On the other rank only the chat template's first tokens match another conversation.
        other = _generate(url, second, 1 - rank, max_new_tokens=1)
        assert other["meta_info"]["cached_tokens"] < 16, (rank, other["meta_info"])
    _assert_idle_clean(_idle_ranks(url))


def test_an_abort_on_one_rank_leaves_the_other_ranks_request_intact(dp_server, tokenizer):
    url = dp_server.url
    text = user_turn(f"Text:\n\n{first_tokens(module_doc('heapq'), tokenizer, 600)}\n\nExplain it in detail.")
    outcome = {}

    def run(name, rank, max_new_tokens):
        try:
            outcome[name] = _generate(url, text, rank, max_new_tokens=max_new_tokens, rid=f"dp-{name}")
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            outcome[name] = exc

    long_run = threading.Thread(target=run, args=("aborted", 0, 2000))
    kept = threading.Thread(target=run, args=("kept", 1, 48))
    long_run.start()
    kept.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # until rank 0 decodes the request, then abort it
        states = loopserve_states(url, timeout=30)
        if states[0]["tracked_requests"] > 0:
            break
        time.sleep(0.5)
    requests.post(url + "/abort_request", json={"rid": "dp-aborted"}, timeout=30).raise_for_status()
    long_run.join(300)
    kept.join(300)
    aborted, done = outcome["aborted"], outcome["kept"]
    assert not isinstance(done, Exception), done
    assert done["meta_info"]["completion_tokens"] == 48 and done["meta_info"]["finish_reason"]["type"] == "length"
    if not isinstance(aborted, Exception):  # an aborted /generate answers with what it had
        assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
        assert aborted["meta_info"]["completion_tokens"] < 2000
    _assert_idle_clean(_idle_ranks(url))
    assert _generate(url, user_turn("Hello"), 0, max_new_tokens=4)["text"] is not None  # both still serve
    assert _generate(url, user_turn("Hello"), 1, max_new_tokens=4)["text"] is not None
