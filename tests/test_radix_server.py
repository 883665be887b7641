"""``--radix-eviction-policy loopserve`` on a served model under pool pressure.

One server (embedded model, a KV pool smaller than the conversations' sum, SGLang's KV page
invariants checked): two conversations branch off one document; pruning and whole-leaf
evictions happen; the pruned branch continues (its prefix served from the cache, the pruned
positions masked); a LoopServe-disabled request over the document answers as before the
pressure; an aborted request and ``/flush_cache`` give back every slot.  And the start-up
errors naming the flag.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from conftest import LOG_DIR, ask, first_tokens, user_turn
from test_loopserve_server import _flush_and_count
from sglang_loopserve.frontends import module_doc
from sglang_loopserve.server import SGLangServer, loopserve_state

POOL = 2400


@pytest.fixture(scope="module")
def radix_server(model_path):
    env = dict(os.environ, SGLANG_CHECK_KV_PAGE_INVARIANTS="1", SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY="1")
    srv = SGLangServer(model_path, max_total_tokens=POOL, env=env, log_path=LOG_DIR / "server-radix.log",
                       extra_args=["--enable-loopserve", "--radix-eviction-policy", "loopserve"])
    with srv:
        yield srv


def _radix(url):
    return loopserve_state(url, timeout=30)


def _idle_available(url):
    """Free KV tokens once the cache is flushed (waits for requests still running)."""
    return _flush_and_count(url)["kv_available_tokens"]


# The start-up checks first: a launch beside the pressure test's server (and the session's) has
# less memory to start in.
@pytest.mark.parametrize("extra,needle", [
    ([], "--enable-loopserve"),
    (["--enable-loopserve", "--disable-radix-cache"], "--disable-radix-cache"),
    (["--enable-loopserve", "--page-size", "2"], "--page-size"),
    (["--enable-loopserve", "--pp-size", "2"], "--pp-size"),
])
def test_start_up_stops_with_a_message_naming_the_flag(model_path, extra, needle):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--device", "cpu",
           "--radix-eviction-policy", "loopserve", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    tail = (out.stdout + out.stderr)[-3000:]
    assert "--radix-eviction-policy loopserve" in tail and needle in tail, tail


def test_the_policy_is_in_launch_server_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "loopserve" in out.stdout.split("--radix-eviction-policy", 1)[1][:400]


def test_pressure_prunes_branches_keeps_the_shared_prefix_exact_and_frees_every_slot(radix_server, tokenizer):
    url = radix_server.url
    idle = _idle_available(url)
    document = first_tokens(module_doc("textwrap"), tokenizer, 900)
    stock_q = user_turn(f"Document:\n\n{document}\n\nWhat is the document about?")
    stock_before = ask(url, stock_q, {"enabled": False})["text"]

    # Two conversations branch off the document, then each brings a document of its own.
    prompts = {c: [f"Document:\n\n{document}\n\nQuestion {c}: which function does the document describe "
                   f"first?", "And which function comes after it?",
                   f"Another document:\n\n{first_tokens(module_doc(other), tokenizer, 500)}\n\nSummarise it in one "
                   f"sentence."] for c, other in (("A", "reprlib"), ("B", "shlex"))}
    texts = {c: "" for c in prompts}
    for turn in range(3):
        for c in prompts:
            texts[c] += user_turn(prompts[c][turn])
            out = ask(url, texts[c])
            assert out["meta_info"]["loopserve"]["enabled"] is True
            texts[c] += out["text"] + "<|im_end|>\n"
    stats = _radix(url)["radix"]
    assert stats["policy"] == "loopserve"
    assert stats["pruned_tokens"] > 0 and stats["evicted_leaves"] > 0, stats

    # The branches continue: their history is served from the cache, pruned positions masked.
    pruned = 0
    for c in prompts:
        cont = ask(url, texts[c] + user_turn("Which of the two documents was longer?"))
        meta = cont["meta_info"]
        assert meta["cached_tokens"] > 0
        pruned += meta["loopserve"]["pruned_cached_tokens"]
        assert any(ch.isalpha() for ch in cont["text"])  # an answer in words, not noise
    assert pruned > 0

    # Stock attention over the shared document after all that: the same greedy answer.
    assert ask(url, stock_q, {"enabled": False})["text"] == stock_before

    # An aborted request (client gone mid-generation), then a flush: every slot is back.
    with requests.post(url + "/generate", json={"text": texts["B"], "stream": True, "sampling_params": {
            "max_new_tokens": 200, "temperature": 0}}, stream=True, timeout=300) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 2:
                break
    assert _idle_available(url) == idle
    assert _radix(url)["tracked_requests"] == 0
    assert ask(url, user_turn("Hello"), max_new_tokens=4)["text"] is not None  # still serving
