"""Which serving dtype is faster on this CPU: bf16 or fp32?

Starts the embedded model once per dtype with the LoopServe CPU platform and
times, through ``/generate``, a cold prefill of a long document and greedy
decoding of a fixed number of tokens (``ignore_eos``).  Prints the ratio
fp32/bf16 for each phase, measured side by side in one run.

    python benchmarks/cpu_dtype.py [--doc-tokens 2000] [--decode 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import requests

from sglang_loopserve import models
from sglang_loopserve.frontends import python_docs
from sglang_loopserve.server import SGLangServer


def time_request(url, text, max_new_tokens):
    t = time.perf_counter()
    r = requests.post(url + "/generate", json={
        "text": text,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
    }, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t, r.json()["meta_info"]


def measure(dtype, model_path, doc, decode, repeats):
    prefill, per_token = [], []
    with SGLangServer(model_path, extra_args=["--dtype", dtype, "--disable-radix-cache"],
                      log_path=f"/tmp/cpu_dtype_{dtype}.log") as server:
        time_request(server.url, "warm up", 4)
        for i in range(repeats):
            text = f"[{dtype} run {i}]\n{doc}"
            t1, meta = time_request(server.url, text, 1)
            tn, _ = time_request(server.url, text, decode + 1)
            prefill.append(t1)
            per_token.append((tn - t1) / decode)
    return meta["prompt_tokens"], statistics.median(prefill), statistics.median(per_token)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc-tokens", type=int, default=2000)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    model_path = models.prepare()
    doc = python_docs(a.doc_tokens)
    rows = {d: measure(d, model_path, doc, a.decode, a.repeats) for d in ("bfloat16", "float32")}
    print(f"{'dtype':>9} {'prompt':>7} {'prefill s':>10} {'decode ms/tok':>14}")
    for d, (n, pf, dt) in rows.items():
        print(f"{d:>9} {n:>7} {pf:>10.2f} {dt * 1000:>14.1f}")
    (_, pb, db), (_, pf, df) = rows["bfloat16"], rows["float32"]
    print(f"fp32/bf16 time ratio: prefill {pf / pb:.2f}x, decode {df / db:.2f}x "
          f"(>1 means bf16 is faster)")


if __name__ == "__main__":
    main()
