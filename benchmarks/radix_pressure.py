"""Radix-cache pressure: whole-leaf LRU eviction against LoopServe's importance-aware policy.

Eight conversations share one long document (their first turns begin with it) and go on for
four turns each, round robin (turn 1 of every conversation, then turn 2 of every one, ...),
so each returning turn finds its history in the radix cache only if the pool kept it.  The
pool holds about half of all histories.  One server after the other, same conversations:

* ``unconstrained``: a pool holding everything (the reference answers);
* ``lru``: SGLang's default eviction (whole leaves, least recently used first);
* ``tlru``: SGLang's tail-optimized LRU for conversations (``TLRU_CONFIG``: a conversation keeps
  what its next prefill needs to stay within ``threshold`` new tokens, the rest of its tail is
  evicted first);
* ``session``: ``lru`` with SGLang's session radix cache (``--enable-session-radix-cache``; each
  conversation's requests carry its ``session_id``): a session's KV is evicted after every
  unreferenced leaf, sessions holding fewer references first;
* ``loopserve, no pruning``: ``--radix-eviction-policy loopserve`` with
  ``{"prune": false}`` (whole leaves in ``prune.leaf_priority`` order);
* ``loopserve``: the policy with pruning (each private branch's least attended tokens
  freed first, down to ``keep_ratio``; whole leaves after);
* ``session, loopserve``: the policy with SGLang's session radix cache (it prunes no node a
  session references, so here it only orders whole leaves).

Per configuration: prompt tokens prefilled again on the returning turns (turns 2-4: prompt
minus cached), their mean time to first token, the server's pruned tokens and evicted leaves
(``/server_info``), and greedy agreement with ``unconstrained`` (answers identical; mean
first differing word).  Every server runs with ``SGLANG_CHECK_KV_PAGE_INVARIANTS=1``.

    python benchmarks/radix_pressure.py [--conversations 8] [--turns 4] [--prefix-tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sglang_loopserve import models  # noqa: E402
from sglang_loopserve.bench import sources  # noqa: E402
from sglang_loopserve.bench.datasets import approx_tokens  # noqa: E402
from sglang_loopserve.bench.metrics import agreement  # noqa: E402
from sglang_loopserve.bench.runner import server_ask  # noqa: E402
from sglang_loopserve.server import SGLangServer, loopserve_state  # noqa: E402

#: T-LRU's budget (tokens): the next turn brings about ``--turn-tokens`` (250) and its question, so
#: ``next_prompt_estimate`` 300; a returning turn may prefill up to ``threshold`` tokens again.
TLRU_CONFIG = {"threshold": 1024, "next_prompt_estimate": 300}

CONFIGS = {
    "unconstrained": [],
    "lru": ["--radix-eviction-policy", "lru"],
    "tlru": ["--radix-eviction-policy", "tlru", "--radix-eviction-policy-config", json.dumps(TLRU_CONFIG)],
    "session": ["--radix-eviction-policy", "lru", "--enable-session-radix-cache"],
    "loopserve, no pruning": ["--radix-eviction-policy", "loopserve",
                              "--radix-eviction-policy-config", json.dumps({"prune": False})],
    "loopserve": ["--radix-eviction-policy", "loopserve"],
    "session, loopserve": ["--radix-eviction-policy", "loopserve", "--enable-session-radix-cache"],
}


def conversations(n: int, turns: int, prefix_tokens: int, turn_tokens: int):
    """``n`` conversations of ``turns`` user messages; every first message starts with the same
    document of about ``prefix_tokens`` tokens; later messages bring ``turn_tokens`` new ones."""
    paras = sources.load().filler
    doc, i = [], 0
    while approx_tokens("\n\n".join(doc)) < prefix_tokens:
        doc.append(paras[i])
        i += 1
    document = "\n\n".join(doc)
    out = []
    for c in range(n):
        msgs = [f"{document}\n\nConversation {c + 1}: summarise what the text above says about its "
                f"topic number {c + 1}, in one sentence."]
        for t in range(1, turns):
            extra = []
            while approx_tokens("\n\n".join(extra)) < turn_tokens:
                extra.append(paras[i % len(paras)])
                i += 1
            msgs.append("\n\n".join(extra) + "\n\nHow does this relate to your previous answer? One sentence.")
        out.append(msgs)
    return out


def run_config(name, model_path, convs, *, pool, max_tokens):
    extra = ["--enable-loopserve"] + CONFIGS[name]
    sessions = "--enable-session-radix-cache" in extra
    env = dict(os.environ, SGLANG_CHECK_KV_PAGE_INVARIANTS="1")
    server = SGLangServer(model_path, extra_args=extra, max_total_tokens=pool, env=env,
                          log_path=f"server-radix-{name.replace(', ', '-').replace(' ', '-')}.log")
    records = {c: [] for c in range(len(convs))}
    with server:
        ask = server_ask(server.url)
        for t in range(len(convs[0])):
            for c, msgs in enumerate(convs):
                history = [(msgs[j], records[c][j]["answer"]) for j in range(t)]
                records[c].append(ask(history, msgs[t], max_tokens, {},
                                      session_id=f"conversation-{c + 1}" if sessions else None))
        radix = loopserve_state(server.url, timeout=30)["radix"]
    return records, radix


def summarize(name, records, radix, reference):
    returning = [r for recs in records.values() for r in recs[1:]]
    reprefilled = sum(r["prompt_tokens"] - r["cached_tokens"] for r in returning)
    ttft = statistics.mean(r["time_to_first_token_s"] for r in returning)
    same, firsts = 0, []
    for c, recs in records.items():
        for t, r in enumerate(recs):
            equal, diff = agreement(reference[c][t]["answer"].split(), r["answer"].split())
            same += equal
            if diff is not None:
                firsts.append(diff)
    total = sum(len(v) for v in records.values())
    return {"config": name, "reprefilled_tokens": reprefilled, "returning_ttft_s": round(ttft, 3),
            "pruned_tokens": radix["pruned_tokens"], "evicted_leaves": radix["evicted_leaves"],
            "same_answer": f"{same}/{total}",
            "first_difference_word": round(statistics.mean(firsts), 1) if firsts else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=2000)
    p.add_argument("--turn-tokens", type=int, default=250)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--pool", type=int, default=0, help="KV pool of the constrained runs (default: half the histories)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    for flag in ("conversations", "turns", "prefix_tokens", "turn_tokens", "max_tokens"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    convs = conversations(a.conversations, a.turns, a.prefix_tokens, a.turn_tokens)
    histories = a.prefix_tokens + a.conversations * (a.turns * (a.turn_tokens + a.max_tokens + 40))
    pool = a.pool or histories // 2
    model_path = str(models.prepare())
    print(f"{a.conversations} conversations x {a.turns} turns over a {a.prefix_tokens}-token shared prefix; "
          f"histories ~{histories} tokens; constrained pool {pool}", flush=True)
    results, reference = [], None
    configs = ["unconstrained"] + [c for c in a.configs if c != "unconstrained"]
    for name in configs:
        t = time.monotonic()
        records, radix = run_config(name, model_path, convs, pool=4 * histories if name == "unconstrained" else pool,
                                    max_tokens=a.max_tokens)
        reference = reference or records
        row = summarize(name, records, radix, reference)
        results.append(row)
        print(f"[{name}] {time.monotonic() - t:.0f} s: {row}", flush=True)
    cols = ["config", "reprefilled_tokens", "returning_ttft_s", "pruned_tokens", "evicted_leaves", "same_answer",
            "first_difference_word"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in results:
        print("| " + " | ".join(str(row[c]) for c in cols) + " |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
