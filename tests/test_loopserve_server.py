"""``--enable-loopserve`` end to end: SGLang servers on this CPU with the embedded model.

What it checks: keep-everything = stock; the sparse path over a
long conversation; per-request control and 400s; concurrent conversations with
client aborts leave no state and no KV behind; chunked = unchunked; flags.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time

import pytest
import requests
import torch

from sglang_loopserve.config import FLAGS, METHODS, PREFILL_PATTERNS
from sglang_loopserve.frontends import (GROWING_CONVERSATION, connect, module_doc, python_docs,
                                        run_document_chat, run_growing_chat)
from sglang_loopserve.server import loopserve_state

DOC_TOKENS = 2500
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def document():
    return python_docs(DOC_TOKENS)


def flush_cache(url, deadline=120):
    """Empty the radix cache: greedy outputs are compared between servers with the same
    history (a prefix cached by a differently shaped forward differs in bf16's last bits)."""
    end = time.monotonic() + deadline
    while requests.post(url + "/flush_cache", timeout=30).status_code != 200:
        if time.monotonic() > end:
            raise AssertionError("radix cache could not be flushed")
        time.sleep(1)


@pytest.fixture(scope="module")
def stock_turns(server, document):
    flush_cache(server.url)
    return run_document_chat(connect(server.url), document, max_tokens=MAX_TOKENS)


def answers(turns):
    return [t.answer for t in turns]


# 1 ---------------------------------------------------------------------------
def test_keep_everything_is_identical_to_stock(keep_all_server, stock_turns, document):
    flush_cache(keep_all_server.url)
    turns = run_document_chat(connect(keep_all_server.url), document, max_tokens=MAX_TOKENS)
    assert answers(turns) == answers(stock_turns)
    for prev, cur in zip(turns, turns[1:]):
        assert cur.cached_tokens >= prev.prompt_tokens  # radix reuse across turns
    for t in turns:
        assert t.loopserve["enabled"] is True
        assert t.loopserve["prefill_density"] == 1.0
        assert t.loopserve["decode_tokens_attended"] == t.loopserve["decode_tokens_cached"]


# 5 ---------------------------------------------------------------------------
def test_chunked_prefill_matches_unchunked(keep_all_chunked_server, stock_turns, document):
    flush_cache(keep_all_chunked_server.url)
    turns = run_document_chat(connect(keep_all_chunked_server.url), document, max_tokens=MAX_TOKENS)
    assert turns[0].prompt_tokens > 4 * 512  # really chunked
    assert answers(turns) == answers(stock_turns)


# 2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def growing_turns(loopserve_server):
    return run_growing_chat(connect(loopserve_server.url, timing=True),
                            GROWING_CONVERSATION[:3], max_tokens=MAX_TOKENS)


def test_sparse_prefill_and_compressed_decode_over_a_long_conversation(growing_turns):
    """Defaults but the length gate (sparse from 1024 tokens, ``GATES_FOR_SHORT_CONVERSATIONS``): the layers
    whose plan pays run sparse, the others the exact rectangle (density 1 there)."""
    turns = growing_turns
    assert turns[2].cached_tokens > 4000  # > 2,000 tokens of history
    for t in turns[1:]:
        ls = t.loopserve
        assert t.cached_tokens > 1800
        assert 0.0 < ls["prefill_density"] < 1.0, ls
        assert ls["prefill_sparse_fraction"] > 0, ls
        assert ls["decode_tokens_attended"] < ls["decode_tokens_cached"], ls
        assert ls["seeded_from"] == "full"  # a long turn (decode_seed auto): everything until step 16
        assert ls["select_time_s"] > 0
        assert t.answer.strip()
        assert t.time_to_first_token_s > 0 and t.decode_tokens_per_s > 0
    # Steps 1-16 read everything, steps 17-24 a budget of 1024 out of > 4000 cached tokens.
    ls = turns[2].loopserve
    assert ls["reselections"] >= 1
    assert ls["decode_tokens_attended"] < (16 + 8 * 0.4) / MAX_TOKENS * ls["decode_tokens_cached"]


def test_stats_exported_to_prometheus(loopserve_server, growing_turns):
    text = requests.get(loopserve_server.url + "/metrics", timeout=30).text
    for name in ("sglang:loopserve_prefill_density", "sglang:loopserve_select_seconds",
                 "sglang:loopserve_decode_tokens_attended", "sglang:loopserve_decode_tokens_cached",
                 "sglang:loopserve_reselections"):
        assert name in text, name
    attended = _metric(text, "sglang:loopserve_decode_tokens_attended_total")
    cached = _metric(text, "sglang:loopserve_decode_tokens_cached_total")
    assert 0 < attended < cached


def _metric(text, name):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


# 3 ---------------------------------------------------------------------------
def test_request_disabled_is_identical_to_stock(loopserve_server, stock_turns, document, growing_turns):
    # No flush: the sparse turns above cached this document's prefix under LoopServe's
    # namespace; an exact request must not reuse it.
    backend = connect(loopserve_server.url, loopserve={"enabled": False})
    turns = run_document_chat(backend, document, max_tokens=MAX_TOKENS)
    assert answers(turns) == answers(stock_turns)
    assert all(t.loopserve["enabled"] is False for t in turns)
    assert all(t.loopserve["prefill_density"] is None for t in turns)


def _generate(url, custom_params=None, **kw):
    params = {"max_new_tokens": 4, "temperature": 0}
    if custom_params is not None:
        params["custom_params"] = custom_params
    return requests.post(url + "/generate", json={"text": "Hello there", "sampling_params": params},
                         timeout=120, **kw)


@pytest.mark.parametrize("bad,field", [({"alpha": 1.5}, "alpha"), ({"alpha": 0}, "alpha"),
                                       ({"decode_budget": 0}, "decode_budget"), ({"nope": 1}, "nope"),
                                       ({"decode_max_interval": 2}, "decode_max_interval"),
                                       ({"method": "h2o"}, "method"),
                                       ({"decode_seed": "random"}, "decode_seed"),
                                       ({"decode_pooling": "mean"}, "decode_pooling"),
                                       ({"decode_query_blocks": -3}, "decode_query_blocks"),
                                       ({"decode_pyramid": 1.5}, "decode_pyramid"),
                                       ({"decode_max_read": 2}, "decode_max_read")])
def test_invalid_request_settings_get_400(loopserve_server, bad, field):
    r = _generate(loopserve_server.url, {"loopserve": bad})
    assert r.status_code == 400, r.text
    assert f"custom_params.loopserve.{field}" in r.text
    ok = _generate(loopserve_server.url, {"loopserve": {"alpha": 0.9}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["loopserve"]["enabled"] is True


def test_every_method_is_served_and_named(loopserve_server, document):
    """Each method of ``--loopserve-method`` answers per request and says so in ``meta_info``;
    ``full`` reads every cached token and answers as stock (LoopServe disabled) does; the decode
    baselines read their budget plus the tokens generated since; the prefill patterns compute
    part of the prefill and decode over everything."""
    prompt = document[:5000] + "\n\nIn one sentence, what is this text about?"
    out = {}
    for method in (None,) + METHODS:
        settings = {"enabled": False} if method is None else {"method": method, "decode_budget": 128}
        if method == "loopserve":  # a selection from the first token on, as the baselines; 4 query blocks of 8
            settings.update(decode_seed="estimate", decode_query_blocks=4)
        r = requests.post(loopserve_server.url + "/generate", timeout=600, json={
            "text": prompt, "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True,
                                                "custom_params": {"loopserve": settings}}})
        assert r.status_code == 200, (method, r.text)
        out[method] = r.json()
        meta = out[method]["meta_info"]["loopserve"]
        assert meta["method"] == method, meta
        if method is None:
            continue
        attended, cached = meta["decode_tokens_attended"], meta["decode_tokens_cached"]
        if method in PREFILL_PATTERNS:
            assert meta["prefill_density"] < 1 and meta["prefill_sparse_fraction"] == 1, (method, meta)
        if method == "full" or method in PREFILL_PATTERNS:
            assert attended == cached and meta["reselections"] == 0
        else:
            assert attended < 128 + (32 if method == "loopserve" else 0) + 20 < cached, (method, meta)
            assert (meta["reselections"] > 0) == (method == "loopserve"), (method, meta)
    assert out["full"]["text"] == out[None]["text"]


def test_a_turn_that_would_read_most_of_its_cache_decodes_exactly(loopserve_server, document, tokenizer):
    """The decode gate (``decode_max_read``): a selection of 256 + 16 blocks of 8 reads 384 positions,
    about 0.3 of this prompt's cache.  Allowed at most 0.25, the turn decodes exactly: it reads every
    cached token (on SGLang's path, or from the measured ``exact_decode_min_len`` on LoopServe's
    kernel, rounded differently) and with an exact prefill (alpha 1) its answers are as close to
    stock's as stock's own by SGLang's KL measure; allowed 0.5, it compresses."""
    prompt = document[:5000] + "\n\nIn one sentence, what is this text about?"

    def ask(settings):
        r = requests.post(loopserve_server.url + "/generate", timeout=600, json={
            "text": prompt, "sampling_params": {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True,
                                                "custom_params": {"loopserve": settings}}})
        assert r.status_code == 200, r.text
        return r.json()

    flush_cache(loopserve_server.url)
    small = {"alpha": 1.0, "decode_budget": 256, "decode_query_blocks": 16, "decode_pyramid": 0.0}
    gated = dict(small, decode_max_read=0.25)
    meta = ask(gated)["meta_info"]["loopserve"]
    assert 0.25 < 384 / meta["decode_tokens_cached"] < 0.5, meta  # the prompt is as sized
    assert meta["decode_tokens_attended"] == meta["decode_tokens_cached"] and meta["reselections"] == 0, meta
    ids = tokenizer.encode(prompt)
    stock, seeds = {"enabled": False}, range(4)  # means over four seeds, as the full method's test
    floor = sum(_sampled_kl(loopserve_server.url, ids, stock, stock, seed=s) for s in seeds) / len(seeds)
    kl = sum(_sampled_kl(loopserve_server.url, ids, gated, stock, seed=s) for s in seeds) / len(seeds)
    assert kl <= max(2 * floor, 1e-6), (kl, floor)
    meta = ask(dict(small, decode_max_read=0.5))["meta_info"]["loopserve"]
    assert meta["decode_tokens_attended"] < 0.5 * meta["decode_tokens_cached"], meta


def _sampled_kl(url, prompt_ids, sample_settings, replay_settings, n_tokens=32, seed=0):
    """SGLang's KL estimate (``sglang.test.kl_test_utils``): sample at temperature 1 with one
    setting, replay the same tokens as a prefill with the other (cache flushed), mean over tokens of
    ``exp(r) - 1 - r``, ``r`` = replayed minus sampled log-probability."""
    def post(body):
        r = requests.post(url + "/generate", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()

    requests.post(url + "/flush_cache", timeout=120).raise_for_status()
    out = post({"input_ids": prompt_ids, "return_logprob": True, "sampling_params": {
        "temperature": 1.0, "max_new_tokens": n_tokens, "ignore_eos": True, "sampling_seed": seed,
        "custom_params": {"loopserve": sample_settings}}})
    sampled = [x[0] for x in out["meta_info"]["output_token_logprobs"]]
    requests.post(url + "/flush_cache", timeout=120).raise_for_status()
    replay = post({"input_ids": prompt_ids + out["output_ids"], "return_logprob": True, "logprob_start_len": 0,
                   "sampling_params": {"max_new_tokens": 0, "custom_params": {"loopserve": replay_settings}}})
    replayed = [x[0] for x in replay["meta_info"]["input_token_logprobs"]][-len(sampled):]
    r = [a - b for a, b in zip(replayed, sampled)]
    return sum(math.exp(x) - 1 - x for x in r) / len(r)


def test_full_method_is_exact_by_sglangs_kl_measure(loopserve_server, document, tokenizer):
    """``method: full`` sampled and replayed on stock attention is as close as stock to itself."""
    ids = tokenizer.encode(document[:4000])
    stock = {"enabled": False}
    # One 32-token sample's estimate varies 2-3x from seed to seed in bf16 (0.0008-0.0026 for the
    # floor on two CPUs), so both sides are means over the same four seeds (within 10% of each
    # other on this CPU); in fp32 both are at rounding level, which 1e-6 bounds.
    seeds = range(4)
    floor = sum(_sampled_kl(loopserve_server.url, ids, stock, stock, seed=s) for s in seeds) / len(seeds)
    full = sum(_sampled_kl(loopserve_server.url, ids, {"method": "full"}, stock, seed=s) for s in seeds) / len(seeds)
    print(f"KL full vs stock {full:.3g}, stock vs stock {floor:.3g}")
    assert full <= max(2 * floor, 1e-6), (full, floor)


def test_benchmark_runner_against_the_server(loopserve_server, tmp_path):
    """``python -m sglang_loopserve.bench``'s runner: three turns per method, the history served from
    the radix cache, LoopServe's figures recorded per turn."""
    from sglang_loopserve.bench import datasets, runner

    convs = datasets.build("kv_retrieval", 1, seed=0, scale=0.15)
    recs = runner.run(convs, ["back"], ["full", "snapkv", "tri_shape"], runner.server_ask(loopserve_server.url),
                      tmp_path / "results.jsonl", read=64)
    assert [r.method for r in recs] == ["full", "snapkv", "tri_shape"]
    for r in recs:
        assert len(r.turns) == 3 and all(t.answer for t in r.turns), r
        assert r.turns[0].prompt_tokens < r.turns[1].prompt_tokens < r.turns[2].prompt_tokens
        assert all(t.cached_tokens > 0 for t in r.turns[1:]), r  # the history came from the cache
        assert all(t.time_to_first_token_s is not None for t in r.turns)
    tri = recs[2].turns[2]
    assert tri.prefill_density < 1 and tri.decode_tokens_attended == tri.decode_tokens_cached
    snap = recs[1].turns[2]
    assert snap.prefill_density == 1 and snap.decode_tokens_attended < snap.decode_tokens_cached


def _chat(url, custom_params):
    return requests.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
        "temperature": 0, "custom_params": custom_params})


def test_openai_requests_take_the_same_settings(loopserve_server):
    """OpenAI requests' top-level ``custom_params`` go through the same validation."""
    r = _chat(loopserve_server.url, {"loopserve": {"alpha": 1.5}})
    assert r.status_code == 400, r.text
    assert "custom_params.loopserve.alpha" in r.text
    ok = _chat(loopserve_server.url, {"loopserve": {"alpha": 0.9, "decode_budget": 64}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"]


# 4 ---------------------------------------------------------------------------
SMALL_MODULES = ("fnmatch", "glob", "reprlib", "pprint", "shlex", "bisect", "copy", "string")


def _state(url):
    return loopserve_state(url, timeout=30)


def _flush_and_count(url, deadline=120):
    """Free KV tokens after the radix cache is flushed (waits for running requests)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if requests.post(url + "/flush_cache", timeout=30).status_code == 200:
            state = _state(url)
            if state["kv_evictable_tokens"] == 0:
                return state
        time.sleep(1)
    raise AssertionError("server did not become idle")


def _conversation(url, shared_doc, own_doc, i, abort, results):
    """Three turns by raw /generate; ``abort``: drop the connection in turn 2."""
    try:
        results[i] = _turns(url, shared_doc, own_doc, i, abort)
    except Exception as e:  # reported by the assertion on ``results``, not lost in a thread
        results[i] = f"{type(e).__name__}: {e}"


def _turns(url, shared_doc, own_doc, i, abort):
    text = (f"<|im_start|>user\nDocument:\n\n{shared_doc}\n\nQuestion {i}: what is this document "
            f"about?<|im_end|>\n<|im_start|>assistant\n")
    messages = [f"Another document:\n\n{own_doc}\n\nSummarise it.", "Name one function from it."]
    for turn in range(3):
        params = {"max_new_tokens": 16, "temperature": 0}
        if abort and turn == 1:
            with requests.post(url + "/generate", json={"text": text, "sampling_params": params | {
                    "max_new_tokens": 200}, "stream": True}, stream=True, timeout=300) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n >= 2:
                        break  # client disconnect mid-generation
            return "aborted"
        r = requests.post(url + "/generate", json={"text": text, "sampling_params": params}, timeout=600)
        r.raise_for_status()
        text += r.json()["text"] + "<|im_end|>\n"
        if turn < 2:
            text += f"<|im_start|>user\n{messages[turn]}<|im_end|>\n<|im_start|>assistant\n"
    return "done"


def test_concurrent_conversations_with_aborts_leave_nothing_behind(loopserve_server):
    url = loopserve_server.url
    idle = _flush_and_count(url)
    assert idle["tracked_requests"] == 0
    shared = module_doc("textwrap")
    results = {}
    threads = [threading.Thread(target=_conversation,
                                args=(url, shared, module_doc(SMALL_MODULES[i]), i, i in (1, 4, 6), results))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert results == {i: ("aborted" if i in (1, 4, 6) else "done") for i in range(8)}
    after = _flush_and_count(url)
    assert after["tracked_requests"] == 0
    assert after["kv_available_tokens"] == idle["kv_available_tokens"]
    assert _generate(url).status_code == 200  # still serving


def test_the_server_reports_the_gates_it_measured_or_was_given(loopserve_server):
    """Gates set by flags are the flags' (``GATES_FOR_SHORT_CONVERSATIONS``); the decode kernel is
    this machine's measured one, from a calibration cached under the machine's key."""
    from sglang_loopserve import calibrate
    from sglang_loopserve.models import cache_dir

    gates = _state(loopserve_server.url)["gates"]
    assert (gates["min_prefill_len"], gates["decode_min_len"], gates["prefill_max_density"]) == (1024, 0, 0.6)
    assert gates["decode_kernel"] in calibrate.decode_kernels("cpu", torch.float32, torch.float32)
    assert gates["source"] in ("measured+flags", "cached+flags")
    cached = [json.loads(p.read_text()) for p in (cache_dir() / "calibration").glob("*.json")]
    assert any(doc["gates"]["decode_kernel"] == gates["decode_kernel"] and doc["key"]["heads"] == [9, 3, 64]
               for doc in cached)


# 6 ---------------------------------------------------------------------------
def test_every_flag_in_launch_server_help():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in FLAGS.values():
        assert flag in out.stdout, flag


def test_invalid_flag_fails_startup(model_path):
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                          "--device", "cpu", "--enable-loopserve", "--loopserve-alpha", "1.5"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "--loopserve-alpha must be a number in (0, 1], got 1.5" in out.stderr
