"""One conversation turn through ``LoopServeAttnBackend`` against dense attention, per layer.

What a server spends in one attention layer when a new turn of ``--new``
tokens arrives over ``--histories`` cached tokens (a radix hit), and then per
decode step for a batch of ``--batch`` such conversations:

* LoopServe: the backend itself over a whole-batch base (as FlashInfer/Triton
  on a GPU), everything included: reading the request's KV from the pool,
  estimation, selection, the block-sparse kernel; in decode the gather of the
  selections, recording queries and re-selecting every ``interval`` steps.
* dense: exact attention on KV already laid out contiguously (SDPA's flash
  kernel on a GPU): a lower bound for a dense paged kernel, so the ratio
  understates LoopServe's gain, never overstates it.

Both run side by side in one process on the same inputs (planted vertical and
slash structure, ``attention.synthetic.planted_qkv``); ``err`` is the relative
L2 error of LoopServe's output against the exact one.

    python benchmarks/backend_turn.py                      # GPU: Llama-8B heads, 8K-64K history
    python benchmarks/backend_turn.py --device cpu --histories 2048,4096 --heads 9,3,64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_loopserve.attention.synthetic import planted_qkv  # noqa: E402
from sglang_loopserve.srt.backend import LoopServeAttnBackend  # noqa: E402
from sglang_loopserve.config import LoopServeConfig  # noqa: E402
from sglang_loopserve.srt.request_state import store  # noqa: E402
from sglang_loopserve.testing import (DenseBase, KVPool, Request, attention_layer, decode_batch,  # noqa: E402
                                      dense_sdpa, extend_batch, model_runner, provide_kv_write_loc)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def run_case(history, n_new, heads, batch, steps, config, device, dtype, reps):
    h, hk, d = heads
    n_ctx = history + n_new
    p = planted_qkv(n_new, n_ctx, h, hk, d, diagonals=(0, 1, 300), seed=history)
    q, k, v = (t.to(device, dtype) for t in (p.q, p.k, p.v))
    slots = n_ctx + batch * (steps + 1)
    pool = KVPool(slots, hk, d, device=device, dtype=dtype)
    pool.k[:history], pool.v[:history] = k[:history], v[:history]
    # Every conversation shares the history and the turn (a radix-shared prefix);
    # each decodes into slots of its own.
    req_to_token = torch.zeros(batch, n_ctx + steps + 1, dtype=torch.int32, device=device)
    req_to_token[:, :n_ctx] = torch.arange(n_ctx, device=device)
    for b in range(batch):
        req_to_token[b, n_ctx:] = n_ctx + b * (steps + 1) + torch.arange(steps + 1, device=device)
    runner = model_runner(pool, req_to_token, h, dtype)
    backend = LoopServeAttnBackend(runner, DenseBase(pool, req_to_token), config)
    layer = attention_layer(h, hk, d)
    rids = [f"turn-{history}-{b}" for b in range(batch)]
    reqs = [Request(rid, config) for rid in rids]  # noqa: F841 (alive while the case runs)

    # ---- the turn's prefill (one request; the others share its KV)
    fb = extend_batch(rids[:1], [0], [history], [n_new], torch.arange(history, n_ctx, device=device))
    flat = (q.reshape(n_new, -1), k[history:].reshape(n_new, -1), v[history:].reshape(n_new, -1))
    t_ls = timed(lambda: backend.forward(*flat, layer, fb), device, reps)
    out = backend.forward(*flat, layer, fb).view(n_new, h, d)
    t_dense = timed(lambda: dense_sdpa(q, k, v), device, reps)
    ref = dense_sdpa(q, k, v)
    row = dict(history=history, prefill_ms=t_ls * 1e3, dense_prefill_ms=t_dense * 1e3, prefill_x=t_dense / t_ls,
               density=reqs[0].loopserve_stats.summary()["prefill_density"], prefill_err=rel_err(out, ref))

    # ---- decode: every conversation's selection is seeded by the same turn (untimed)
    fb = extend_batch(rids, list(range(batch)), [history] * batch, [n_new] * batch,
                      torch.arange(history, n_ctx, device=device).repeat(batch))
    backend.forward(*(t.repeat(batch, 1) for t in flat), layer, fb)
    gen = torch.Generator(device="cpu").manual_seed(history)
    qd = (q[-1:].float().cpu() + 0.1 * torch.randn(batch, h, d, generator=gen)).to(device, dtype)
    kd, vd = (torch.randn(batch, steps, hk, d, generator=gen).to(device, dtype) for _ in "kv")
    times = []
    for step in range(steps):
        seq = n_ctx + step + 1
        loc = req_to_token[:, seq - 1].clone()
        fb = decode_batch(rids, list(range(batch)), [seq] * batch, loc)
        sync(device)
        t = time.perf_counter()
        o = backend.forward(qd.reshape(batch, -1), kd[:, step].reshape(batch, -1),
                            vd[:, step].reshape(batch, -1), layer, fb)
        sync(device)
        times.append(time.perf_counter() - t)
    # dense decode: one batched SDPA over contiguous KV of the final length
    rows = req_to_token[:, :seq].long()
    kb, vb = (pool.k[rows].transpose(1, 2), pool.v[rows].transpose(1, 2))  # [B, Hk, L, D]

    def dense_decode():
        return F.scaled_dot_product_attention(qd.unsqueeze(2), kb, vb, enable_gqa=True)

    t_dense_dec = timed(dense_decode, device, reps)
    err = rel_err(o.view(batch, h, d), dense_decode().squeeze(2))
    t_dec = sum(times[1:]) / (len(times) - 1)  # the first step pays the initial selection
    attended = sum(reqs[b].loopserve_stats.summary()["decode_tokens_attended"] for b in range(batch))
    cached = sum(reqs[b].loopserve_stats.summary()["decode_tokens_cached"] for b in range(batch))
    row.update(decode_ms=t_dec * 1e3, dense_decode_ms=t_dense_dec * 1e3, decode_x=t_dense_dec / t_dec,
               attended=attended / max(cached, 1), decode_err=err)
    for rid in rids:
        store.drop(rid)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--histories", default="8192,32768,65536", help="cached tokens before the turn")
    ap.add_argument("--new", type=int, default=2048, help="tokens of the new turn")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    ap.add_argument("--batch", type=int, default=8, help="conversations decoding together")
    ap.add_argument("--steps", type=int, default=48, help="decode steps timed")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=LoopServeConfig.alpha)
    ap.add_argument("--budget", type=int, default=LoopServeConfig.decode_budget)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = tuple(int(x) for x in args.heads.split(","))
    # decode_seed "estimate": every timed step reads a selection (the steady state; the default
    # "auto" reads everything until the first re-selection after a long turn).
    config = LoopServeConfig(alpha=args.alpha, decode_budget=args.budget, min_prefill_len=1, decode_min_len=0,
                             decode_seed="estimate")
    provide_kv_write_loc()
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# {name}, {str(dtype)[6:]}, heads {heads}, turn of {args.new} new tokens, batch {args.batch}, "
          f"alpha {args.alpha}, decode budget {args.budget}, one layer")
    print(f"{'history':>8} {'prefill ms':>10} {'dense ms':>9} {'x':>6} {'density':>7} {'err':>7} | "
          f"{'decode ms':>9} {'dense ms':>9} {'x':>6} {'attended':>8} {'err':>7}")
    for history in (int(x) for x in args.histories.split(",")):
        r = run_case(history, args.new, heads, args.batch, args.steps, config, device, dtype, args.reps)
        print(f"{r['history']:>8} {r['prefill_ms']:>10.2f} {r['dense_prefill_ms']:>9.2f} {r['prefill_x']:>5.2f}x "
              f"{r['density']:>7.3f} {r['prefill_err']:>7.4f} | {r['decode_ms']:>9.3f} {r['dense_decode_ms']:>9.3f} "
              f"{r['decode_x']:>5.2f}x {r['attended']:>8.3f} {r['decode_err']:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
