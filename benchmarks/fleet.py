"""A fleet: SGLang workers behind SGLang's router, conversations through it, per router policy and
worker kind.

For each worker kind (``--kinds``: stock SGLang, ``--enable-loopserve``, or either with another
radix eviction policy: ``KINDS``) and router policy
(``--policies``: ``cache_aware``, ``round_robin``), one fleet after the other: ``--workers``
single-rank servers (the cores split among them: ``OMP_NUM_THREADS``), SGLang's router over them,
each worker warmed up (one untimed request over unrelated text, then its cache flushed); then
``--conversations`` conversations of ``--turns`` turns at once, one client thread each, streaming.
Turn 1 brings a document, the next a follow-up question, the one after another document, and so on.

Reported per fleet: tokens prefilled (prompt tokens not found cached, every turn) and, of the
returning turns, the history prefilled again (a turn routed away from its worker recomputes it) and
the share of returning turns that found their whole history cached; time to first token p50 / p99;
the median decode rate of a request; output tokens over the wall time of all conversations.

    python benchmarks/fleet.py --out benchmarks/results/fleet
    python benchmarks/fleet.py --policies cache_aware --turns 4 --max-total-tokens 2600 \
        --kinds stock "stock, tlru" "stock, session" loopserve "loopserve, pruning" \
        --out benchmarks/results/fleet_pressure

The second is the radix pressure of ``benchmarks/radix_pressure.py`` through the router: each
worker's pool holds about half of its conversations' histories, and the eviction policies compete.

Writes ``rows.json``, ``table.md`` (printed too) and ``fleet.png`` to ``--out``.  On 2 cores the
workers share the cores, so the timings compare fleets on this machine only; the prefill counts do
not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve import models  # noqa: E402
from sglang_loopserve.cpu_runtime.cpu_info import cpu_kind  # noqa: E402
from sglang_loopserve.demo import warm_up  # noqa: E402
from sglang_loopserve.frontends import module_doc  # noqa: E402
from sglang_loopserve.server import Router, SGLangServer, loopserve_state  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from radix_pressure import TLRU_CONFIG  # noqa: E402

#: Documents of the conversations, a pair each (turn 1's, then the one a later turn brings).
DOCUMENTS = (("difflib", "shlex"), ("textwrap", "reprlib"), ("calendar", "fnmatch"), ("argparse", "glob"),
             ("json", "heapq"), ("string", "bisect"), ("logging", "queue"), ("typing", "copy"))
FOLLOW_UP = "Which of its functions would you use first, and why?"

#: Worker kinds: the servers' flags, and whether each conversation sends a ``session_id``.
KINDS = {
    "stock": ([], False),
    "stock, tlru": (["--radix-eviction-policy", "tlru", "--radix-eviction-policy-config", json.dumps(TLRU_CONFIG)],
                    False),
    "stock, session": (["--enable-session-radix-cache"], True),
    "loopserve": (["--enable-loopserve"], False),
    "loopserve, pruning": (["--enable-loopserve", "--radix-eviction-policy", "loopserve"], False),
}


def conversation_turns(c: int, turns: int, tokenizer, doc_tokens: int) -> list[str]:
    """The user messages of conversation ``c``."""
    def doc(name):
        return tokenizer.decode(tokenizer.encode(module_doc(name), add_special_tokens=False)[:doc_tokens])

    first, second = DOCUMENTS[c % len(DOCUMENTS)]
    messages = []
    for t in range(turns):
        if t == 0:
            messages.append(f"Document:\n\n{doc(first)}\n\nWhat does this module do?")
        elif t % 2:
            messages.append(FOLLOW_UP)
        else:
            messages.append(f"Another document:\n\n{doc(second)}\n\nHow does it relate to the first?")
    return messages


def stream_turn(url: str, text: str, max_tokens: int, session_id: str | None = None) -> dict:
    """One streamed ``/generate``: its answer, time to first token, decode rate, token counts."""
    body = {"text": text, "stream": True, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0}}
    if session_id is not None:
        body["session_id"] = session_id
    t0 = time.monotonic()
    first = meta = None
    answer = ""
    with requests.post(url + "/generate", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            first = first or time.monotonic()
            answer, meta = chunk["text"], chunk["meta_info"]
    end = time.monotonic()
    n = meta["completion_tokens"]
    return {"answer": answer, "ttft_s": first - t0, "decode_tokens_per_s": (n - 1) / (end - first) if n > 1 else None,
            "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta["cached_tokens"], "completion_tokens": n}


def hold_conversation(url, messages, apply_template, max_tokens, out, session_id=None):
    history = []
    for message in messages:
        history.append({"role": "user", "content": message})
        turn = stream_turn(url, apply_template(history), max_tokens, session_id)
        history.append({"role": "assistant", "content": turn["answer"]})
        out.append(turn)


def run_fleet(kind, policy, args, model_path, tokenizer):
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    extra, sessions = KINDS[kind]
    name = kind.replace(", ", "-")
    logs = Path(args.logs)
    workers = [SGLangServer(model_path, env=env, max_total_tokens=args.max_total_tokens, extra_args=extra,
                            log_path=logs / f"{name}-{policy}-worker{i}.log") for i in range(args.workers)]

    def apply_template(history):
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)

    try:
        starts = [threading.Thread(target=w.start) for w in workers]  # at once: start-up is mostly waiting
        for t in starts:
            t.start()
        for t in starts:
            t.join()
        for w in workers:
            if w.proc is None:
                raise RuntimeError(f"{kind}/{policy}: a worker did not start (logs under {logs})")
            warm_up(w.url)
        with Router([w.url for w in workers], policy=policy, log_path=logs / f"{name}-{policy}-router.log") as router:
            turns = [[] for _ in range(args.conversations)]
            t0 = time.monotonic()
            clients = [threading.Thread(target=hold_conversation, args=(
                router.url, conversation_turns(c, args.turns, tokenizer, args.doc_tokens), apply_template,
                args.max_tokens, turns[c], f"conversation-{c + 1}" if sessions else None))
                for c in range(args.conversations)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            wall = time.monotonic() - t0
        pruned = (sum(loopserve_state(w.url, timeout=30)["radix"]["pruned_tokens"] for w in workers)
                  if "--enable-loopserve" in extra else None)
    finally:
        for w in workers:
            w.stop()
    if any(len(t) != args.turns for t in turns):
        raise RuntimeError(f"{kind}/{policy}: a conversation failed (worker logs under {logs})")
    return {**summarise(kind, policy, turns, wall), "pruned_tokens": pruned}


def summarise(kind, policy, turns, wall):
    flat = [t for conv in turns for t in conv]
    returning = [(conv[i - 1], conv[i]) for conv in turns for i in range(1, len(conv))]
    # A returning turn's history: its previous prompt and answer (the template's few tokens aside).
    history = [prev["prompt_tokens"] + prev["completion_tokens"] for prev, _ in returning]
    again = [max(0, min(h, cur["prompt_tokens"]) - cur["cached_tokens"]) for h, (_, cur) in zip(history, returning)]
    ttft = sorted(t["ttft_s"] for t in flat)
    return {
        "kind": kind, "policy": policy, "requests": len(flat),
        "prefilled_tokens": sum(t["prompt_tokens"] - t["cached_tokens"] for t in flat),
        "history_prefilled_again": sum(again),
        "returning_turns_hit": (sum(cur["cached_tokens"] >= 0.9 * h for h, (_, cur) in zip(history, returning))
                                / len(returning)),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
        "decode_tokens_per_s_median": statistics.median(
            t["decode_tokens_per_s"] for t in flat if t["decode_tokens_per_s"]),
        "output_tokens_per_s": sum(t["completion_tokens"] for t in flat) / wall,
        "wall_s": wall,
        "turns": turns,
    }


def table(rows) -> str:
    head = ("| workers | router policy | prefilled tokens | history prefilled again | returning turns hit | "
            "TTFT p50 / p99 s | decode tok/s (median) | output tok/s | pruned tokens |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['kind']} | {r['policy']} | {r['prefilled_tokens']:,} | {r['history_prefilled_again']:,} | "
        f"{r['returning_turns_hit']:.0%} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
        f"{r['decode_tokens_per_s_median']:.1f} | {r['output_tokens_per_s']:.1f} | "
        f"{'-' if r.get('pruned_tokens') is None else format(r['pruned_tokens'], ',')} |\n" for r in rows)


def plot(rows, out, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    names = [f"{r['kind']}\n{r['policy']}" for r in rows]
    colours = ["tab:blue" if r["kind"].startswith("loopserve") else "tab:gray" for r in rows]
    for ax, key, label in ((axes[0], "history_prefilled_again", "history prefilled again (tokens), lower is better"),
                           (axes[1], "ttft_p50_s", "TTFT p50 (s), lower is better"),
                           (axes[2], "output_tokens_per_s", "output tokens/s, higher is better")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colours)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a key of `python -m sglang_loopserve.models list` or a folder "
                                                 "(default: the embedded SmolLM2)")
    p.add_argument("--kinds", nargs="+", default=["stock", "loopserve"], choices=list(KINDS))
    p.add_argument("--policies", nargs="+", default=["cache_aware", "round_robin"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--doc-tokens", type=int, default=1200, help="tokens of each document")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per turn")
    p.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool of each worker")
    p.add_argument("--out", required=True)
    p.add_argument("--logs", default=".cache/fleet-logs", help="the workers' and routers' logs")
    args = p.parse_args(argv)
    for name, value in (("--workers", args.workers), ("--conversations", args.conversations), ("--turns", args.turns)):
        if value < 1:
            p.error(f"{name} must be at least 1, got {value}")
    from transformers import AutoTokenizer

    model_path = models.resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds:
        for policy in args.policies:
            t = time.monotonic()
            rows.append(run_fleet(kind, policy, args, model_path, tokenizer))
            print(f"[{kind} / {policy}] {time.monotonic() - t:.0f} s", flush=True)
    title = (f"{args.workers} workers behind the router, {args.conversations} conversations x {args.turns} turns, "
             f"{Path(model_path).name}, CPU: {cpu_kind()}")
    text = f"{title}\n\n{table(rows)}"
    print(text)
    (Path(args.out) / "table.md").write_text(text)
    (Path(args.out) / "rows.json").write_text(json.dumps({"cpu": cpu_kind(), "args": vars(args), "rows": rows},
                                                         indent=1))
    plot(rows, Path(args.out) / "fleet.png", title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
