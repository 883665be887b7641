"""``make run``: serve the embedded model on this CPU and hold a long conversation.

Prepares the model, starts ``sglang.launch_server`` with a bounded KV pool,
waits for ``/health``, runs the multi-turn program of
``sglang_loopserve.frontends.multiturn`` and prints, per turn, the answer,
prompt tokens, cached tokens (radix reuse) and latency.  The server is
stopped on success, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

from . import models
from .frontends import connect, python_docs, run_document_chat
from .server import DEFAULT_MAX_TOTAL_TOKENS, SGLangServer, ServerStartError, raise_on_sigterm


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--doc-tokens", type=int, default=3000,
                   help="minimum length of the document, in tokens (default 3000)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per turn")
    p.add_argument("--max-total-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                   help="KV pool size in tokens")
    p.add_argument("--log", default="server.log", help="server log file")
    p.add_argument("server_args", nargs=argparse.REMAINDER,
                   help="after '--': extra arguments for sglang.launch_server")
    args = p.parse_args(argv)
    if args.doc_tokens < 1:
        p.error("--doc-tokens must be >= 1")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    if args.server_args[:1] == ["--"]:
        args.server_args = args.server_args[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    raise_on_sigterm()
    t0 = time.monotonic()
    model_path = args.model_path or str(models.prepare())
    print(f"model: {model_path}  [{time.monotonic() - t0:.1f} s]", flush=True)
    server = SGLangServer(model_path, extra_args=args.server_args,
                          max_total_tokens=args.max_total_tokens, log_path=args.log)
    t1 = time.monotonic()
    print(f"starting server on {server.url} (log: {args.log}) ...", flush=True)
    try:
        with server:
            print(f"server healthy after {time.monotonic() - t1:.1f} s", flush=True)
            turns = run_document_chat(connect(server.url), python_docs(args.doc_tokens),
                                      max_tokens=args.max_tokens)
    except ServerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; server stopped", file=sys.stderr)
        return 130
    for i, t in enumerate(turns, 1):
        print(f"\n=== turn {i}: {t.question}")
        print(textwrap.indent(t.answer or "(empty)", "    "))
        print(f"    prompt tokens {t.prompt_tokens}, cached tokens {t.cached_tokens}, "
              f"generated {t.completion_tokens}, latency {t.latency_s:.2f} s")
    print(f"\n{'turn':>4} {'prompt':>7} {'cached':>7} {'gen':>5} {'latency s':>10}")
    for i, t in enumerate(turns, 1):
        print(f"{i:>4} {t.prompt_tokens:>7} {t.cached_tokens:>7} {t.completion_tokens:>5} "
              f"{t.latency_s:>10.2f}")
    print(f"total {time.monotonic() - t0:.1f} s; server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
