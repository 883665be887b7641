"""``--tp-size 3`` with LoopServe on this CPU (gloo), and the cache decisions its ranks share.

The embedded model has 9 query and 3 KV heads, so 3 is the tensor-parallel size that divides
them (2 is refused at start-up, naming the flag). Three ranks share the 2 cores (one thread each,
``SGLANG_CPU_OMP_THREADS_BIND=0|1|0``). Two servers, one after the other: stock SGLang under TP,
then LoopServe under TP with ``--radix-eviction-policy loopserve``, a small KV pool and SGLang's
rank consensus checker on (a rank whose tree decides otherwise than the others stops the server).
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest
import requests
import torch

from conftest import LOG_DIR, ask, first_tokens, user_turn
from sglang_loopserve.frontends import module_doc
from sglang_loopserve.server import SGLangServer, loopserve_state

TP = ["--tp-size", "3", "--disable-custom-all-reduce"]
TP_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1|0", "OMP_NUM_THREADS": "1"}
POOL = 2400
KEEP_EVERYTHING = {"alpha": 1.0, "decode_budget": 100000}
#: LoopServe's own paths whatever this machine's measured gates say (a sparse plan, with the server's
#: ``--loopserve-prefill-max-density 1``, and a compressed decode reading under half the cache on
#: every turn), so each rank plans and selects over its own head shard.
SPARSE_ALWAYS = {"min_prefill_len": 0, "decode_min_len": 0, "decode_budget": 256, "decode_query_blocks": 16}


def _max_over_two_ranks(rank, path, scores, out):
    import torch.distributed as dist

    from sglang_loopserve.srt.radix_cache import agreed_over_tp

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    group = types.SimpleNamespace(world_size=2, cpu_group=dist.group.WORLD)
    got = agreed_over_tp(scores[rank], 6, group)
    torch.save(got, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("scores,expected", [
    # Each rank saw its own heads: the larger share wins, a shorter row counts as zeros past its end.
    ([torch.tensor([0.1, 0.5, 0.0, 0.2]), torch.tensor([0.3, 0.1, 0.0, 0.0, 0.7, 0.0, 0.9])],
     [0.3, 0.5, 0.0, 0.2, 0.7, 0.0]),
    # One rank observed nothing (it saw no scores): the other's are everyone's.
    ([None, torch.tensor([0.2, 0.0, 0.4])], [0.2, 0.0, 0.4, 0.0, 0.0, 0.0]),
    # No rank observed anything: no importance is stored on any rank.
    ([None, None], None),
])
def test_importance_is_the_maximum_over_the_tp_ranks_on_every_rank(tmp_path, scores, expected):
    import torch.multiprocessing as mp

    out = tmp_path / "agreed"
    mp.spawn(_max_over_two_ranks, args=(str(tmp_path / "store"), scores, str(out)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        if expected is None:
            assert got is None
        else:
            assert got.tolist() == pytest.approx(expected)


def test_a_tp_size_that_does_not_divide_the_heads_is_refused(model_path):
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--device", "cpu",
           "--tp-size", "2", "--enable-loopserve"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    tail = (out.stdout + out.stderr)[-3000:]
    assert "--tp-size 2 does not divide" in tail and "--tp-size 3" in tail, tail


def _server(model_path, name, extra, env=None):
    return SGLangServer(model_path, max_total_tokens=POOL, extra_args=TP + extra,
                        env=dict(os.environ, **TP_ENV, **(env or {})), log_path=LOG_DIR / f"server-tp-{name}.log")


def _two_turns(url, document, custom=None):
    """A two-turn conversation over ``document``: the answers and the second turn's cached tokens."""
    text = user_turn(f"Document:\n\n{document}\n\nWhat does the document describe first?")
    first = ask(url, text, custom)
    text += first["text"] + "<|im_end|>\n" + user_turn("And what comes after it?")
    second = ask(url, text, custom)
    return [first["text"], second["text"]], second["meta_info"]


@pytest.fixture(scope="module")
def document(tokenizer):
    return first_tokens(module_doc("textwrap"), tokenizer, 700)


@pytest.fixture(scope="module")
def stock_answers(model_path, document):
    with _server(model_path, "stock", []) as srv:
        answers, _ = _two_turns(srv.url, document)
    return answers


@pytest.fixture(scope="module")
def tp_server(model_path, stock_answers):  # after the stock server has stopped: one at a time
    with _server(model_path, "loopserve", ["--enable-loopserve", "--radix-eviction-policy", "loopserve",
                                                    "--loopserve-prefill-max-density", "1"],
                 env={"SGLANG_ENABLE_RANK_CONSENSUS_CHECKER": "1"}) as srv:
        yield srv


def test_keep_everything_under_tp_answers_as_stock_under_tp(tp_server, stock_answers, document):
    requests.post(tp_server.url + "/flush_cache", timeout=60).raise_for_status()
    answers, meta = _two_turns(tp_server.url, document, KEEP_EVERYTHING)
    assert answers == stock_answers
    assert meta["cached_tokens"] > 0  # the second turn reused the first's history


def test_the_defaults_under_tp_serve_a_conversation(tp_server, document):
    requests.post(tp_server.url + "/flush_cache", timeout=60).raise_for_status()
    answers, meta = _two_turns(tp_server.url, document)
    assert all(any(ch.isalpha() for ch in a) for a in answers), answers
    assert meta["cached_tokens"] > 0 and meta["loopserve"]["enabled"] is True


def test_sparse_turns_under_tp_serve_conversations_that_prune_under_pressure(tp_server, tokenizer, document):
    url = tp_server.url
    requests.post(url + "/flush_cache", timeout=60).raise_for_status()
    idle = loopserve_state(url, timeout=30)
    # Two conversations over long histories in a pool that cannot hold both: the pool pressure
    # prunes, each rank from the importance reduced over the group.
    texts = {}
    for c, other in (("A", "difflib"), ("B", "calendar")):
        another = first_tokens(module_doc(other), tokenizer, 1000)
        texts[c] = user_turn(f"Document:\n\n{document}\n\nAnother:\n\n{another}\n\nQuestion {c}: what do the two "
                             f"documents describe?")
    seen = []
    for turn in range(2):
        for c in texts:
            out = ask(url, texts[c], SPARSE_ALWAYS, max_new_tokens=24)
            ls = out["meta_info"]["loopserve"]
            assert ls["enabled"] is True and any(ch.isalpha() for ch in out["text"])
            seen.append((out["meta_info"]["cached_tokens"], ls["decode_tokens_attended"], ls["decode_tokens_cached"],
                         ls["prefill_density"]))
            texts[c] += out["text"] + "<|im_end|>\n" + user_turn("Say more about the second one.")
    assert all(attended < cached for _, attended, cached, _ in seen), seen  # every decode compressed
    assert any(density < 1.0 for *_, density in seen), seen  # a sparse prefill plan
    assert any(cached for cached, *_ in seen[2:]), seen  # returning turns hit the radix cache
    stats = loopserve_state(url, timeout=30)["radix"]
    assert stats["pruned_tokens"] > 0, stats
    # Every rank agreed on every cache decision, or the checker would have stopped the server.
    assert ask(url, user_turn("Hello"), max_new_tokens=4)["text"] is not None
    assert requests.get(url + "/health", timeout=30).status_code == 200
    requests.post(url + "/flush_cache", timeout=60).raise_for_status()
    assert loopserve_state(url, timeout=30)["tracked_requests"] == idle["tracked_requests"] == 0
