"""``make run``: the same multi-turn conversation on stock SGLang and on LoopServe.

Prepares the model (``--model``, default the embedded SmolLM2), then for each configuration starts
``sglang.launch_server`` on this CPU (bounded KV pool), runs the program of
``frontends.multiturn`` (a new document every turn: about 2K, 4K and 7K
tokens of history before turns 2, 3 and 4, or 2K, 9K and 17K for a 32K model; radix reuse on), stops the server,
and finally prints a side-by-side table per turn: time to first token and
decode rate (measured by the client, streaming), prefill density and decode
KV attended / cached (``meta_info["loopserve"]``), and whether the greedy
answers agree.  Servers are stopped on success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
import time

from . import models
from .cpu_runtime.cpu_info import cpu_kind
from .frontends import GROWING_CONVERSATION, LONG_GROWING_CONVERSATION, connect, run_growing_chat
from .frontends.documents import CHARS_PER_TOKEN, module_doc

#: Conversations by name: ``short`` fits an 8K model (history ~2K/4K/7K), ``long`` a 32K one (~2K/9K/17K).
CONVERSATIONS = {"short": GROWING_CONVERSATION, "long": LONG_GROWING_CONVERSATION}
from .server import DEFAULT_MAX_TOTAL_TOKENS, SGLangServer, ServerStartError, loopserve_state, raise_on_sigterm


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--model-path", dest="model",
                   help="a key of `python -m sglang_loopserve.models list` (e.g. qwen2.5-coder-0.5b) or a "
                        "checkpoint folder (default: the embedded SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per turn")
    p.add_argument("--conversation", choices=("auto", *CONVERSATIONS), default="auto",
                   help="short: history ~2K/4K/7K tokens; long: ~2K/9K/17K; auto (default): long for a model "
                        "with a context of 24K tokens or more")
    p.add_argument("--max-total-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                   help="KV pool size in tokens")
    p.add_argument("--only", choices=("stock", "loopserve"), help="run one configuration only")
    p.add_argument("--log-prefix", default="server", help="server logs: <prefix>-<config>.log")
    p.add_argument("--json", help="also write the turns of both servers to this file "
                                  "(default: <log-prefix>-turns.json)")
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="after '--': extra arguments for sglang.launch_server (both servers), "
                        "e.g. -- --loopserve-alpha 0.9")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.server_args[:1] == ["--"]:
        args.server_args = args.server_args[1:]
    return args


def run_config(name, model_path, args, gates=None):
    """Start a server, hold the conversation, stop it: the turns.  LoopServe's gates (what the
    server measured on this machine, or its flags set) go into ``gates`` (a dict) when given."""
    extra = list(args.server_args)
    if name == "loopserve":
        extra = ["--enable-loopserve"] + extra
    else:
        extra = [a for a in extra if not a.startswith("--loopserve")]
    log = f"{args.log_prefix}-{name}.log"
    server = SGLangServer(model_path, extra_args=extra, max_total_tokens=args.max_total_tokens,
                          log_path=log)
    t = time.monotonic()
    print(f"[{name}] starting server on {server.url} (log: {log}) ...", flush=True)
    with server:
        print(f"[{name}] server healthy after {time.monotonic() - t:.1f} s", flush=True)
        if name == "loopserve":
            found = server_gates(server.url)
            print(f"[{name}] gates: {found}", flush=True)
            if gates is not None:
                gates.update(found or {})
        warm_up(server.url)
        t = time.monotonic()
        turns = run_growing_chat(connect(server.url, timing=True), CONVERSATIONS[args.conversation],
                                 max_tokens=args.max_tokens)
        print(f"[{name}] conversation: {time.monotonic() - t:.1f} s; server stopped", flush=True)
    return turns


def warm_up(url: str, tokens: int = 1500) -> None:
    """One untimed request before the conversation, then the radix cache flushed: a server's first
    real request pays one-off costs (the allocator growing, oneDNN and SDPA kernels set up for new
    shapes) that moved turn 1's time to first token by up to 30% either way between runs of the
    same server.  Unrelated text (``pydoc`` of ``calendar``), and nothing of it stays cached."""
    import requests

    text = module_doc("calendar")[: int(tokens * CHARS_PER_TOKEN)]
    body = {"text": f"Summarise:\n{text}\n", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    requests.post(url + "/generate", json=body, timeout=600).raise_for_status()
    requests.post(url + "/flush_cache", timeout=60).raise_for_status()


def server_gates(url: str) -> dict | None:
    """A LoopServe server's gates (``calibrate``), or None."""
    import requests

    try:
        return loopserve_state(url, timeout=30)["gates"]
    except (requests.RequestException, ValueError, KeyError, IndexError, TypeError):
        return None


def _context_length(model_path) -> int:
    import json
    from pathlib import Path

    try:
        return int(json.loads((Path(model_path) / "config.json").read_text())["max_position_embeddings"])
    except (OSError, ValueError, KeyError):
        return 0


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_report(results: dict, conversation=GROWING_CONVERSATION) -> None:
    stock, loop = results.get("stock"), results.get("loopserve")
    ref = stock or loop
    for i, (_, question) in enumerate(conversation):
        print(f"\n=== turn {i + 1}: {question}")
        for name, turns in results.items():
            print(f"  [{name}]")
            print(textwrap.indent(turns[i].answer or "(empty)", "    "))
    print("\nhistory = cached tokens of the turn (radix reuse); ttft = time to first token;"
          "\ndensity = prefill pairs computed / causal pairs (mean over layers and heads);"
          "\nKV = decode tokens attended / cached (mean per step over layers and KV heads)\n")
    head = (f"{'turn':>4} {'prompt':>6} {'history':>7} | {'stock ttft':>10} {'tok/s':>6} | "
            f"{'loopserve ttft':>14} {'tok/s':>6} {'density':>7} {'KV attended/cached':>19} | same")
    print(head)
    print("-" * len(head))
    for i, r in enumerate(ref):
        s = stock[i] if stock else None
        lp = loop[i] if loop else None
        ls = (lp.loopserve or {}) if lp else {}
        kv = "-"
        if ls.get("decode_tokens_cached"):
            kv = f"{ls['decode_tokens_attended']:.0f} / {ls['decode_tokens_cached']:.0f}"
        same = "-" if not (s and lp) else ("yes" if s.answer == lp.answer else "no")
        print(f"{i + 1:>4} {r.prompt_tokens:>6} {r.cached_tokens:>7} | "
              f"{_fmt(s and s.time_to_first_token_s, '10.2f')} {_fmt(s and s.decode_tokens_per_s, '6.1f')} | "
              f"{_fmt(lp and lp.time_to_first_token_s, '14.2f')} {_fmt(lp and lp.decode_tokens_per_s, '6.1f')} "
              f"{_fmt(ls.get('prefill_density'), '7.3f')} {kv:>19} | {same}")


def write_turns(path: str, results: dict, model_path: str, conversation: str, gates: dict | None = None) -> None:
    """The per-turn figures of every configuration, for plots and results folders."""
    doc = {"model": str(model_path), "conversation": conversation, "cpu": cpu_kind(), "gates": gates or None,
           "configs": {name: [dataclasses.asdict(t) for t in turns] for name, turns in results.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    t0 = time.monotonic()
    try:
        model_path = models.resolve_model_path(args.model)
    except models.ModelPreparationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.conversation == "auto":
        args.conversation = "long" if _context_length(model_path) >= 24576 else "short"
    print(f"model: {model_path}  [{time.monotonic() - t0:.1f} s]; conversation: {args.conversation}", flush=True)
    configs = [args.only] if args.only else ["stock", "loopserve"]
    results, gates = {}, {}
    try:
        for name in configs:
            results[name] = run_config(name, model_path, args, gates)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130
    print_report(results, CONVERSATIONS[args.conversation])
    json_path = args.json or f"{args.log_prefix}-turns.json"
    write_turns(json_path, results, model_path, args.conversation, gates)
    print(f"\nturns written to {json_path}")
    print(f"\ntotal {time.monotonic() - t0:.1f} s; servers stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
