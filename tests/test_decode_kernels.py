"""Decode attention kernels equal the torch reference: fast CPU path and Triton.

Triton runs under ``TRITON_INTERPRET=1`` on this CPU, in a child process
(the interpreter is chosen when a kernel is decorated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

CHECK = r"""
import json, torch
from sglang_loopserve.cache_policy import batched_decode_attention, select_decode_kv_batched
from sglang_loopserve.cache_policy.triton_decode import batched_decode_attention_triton
dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
res = []
dtypes = ["float32", "float16"] + (["bfloat16"] if dev == "cuda" else [])  # numpy has no bf16
for n_heads, n_kv, d, lengths, budget in [(6, 2, 64, [300, 40, 130], 70), (9, 3, 48, [90], 200),
                                          (4, 4, 32, [65, 64], 40)]:
    pool_k = torch.randn(1000, n_kv, d, generator=g); pool_v = torch.randn(1000, n_kv, d, generator=g)
    slots = torch.stack([torch.randperm(1000, generator=g)[:max(lengths)] for _ in lengths])
    lens = torch.tensor(lengths)
    rq = torch.randn(len(lengths), 8, n_heads, d, generator=g)
    q = torch.randn(len(lengths), n_heads, d, generator=g)
    indptr, pos = select_decode_kv_batched(rq, pool_k, slots, lens, budget=budget, sink=2, recent=8)
    ref = batched_decode_attention(q.double(), pool_k.double(), pool_v.double(), slots, indptr, pos)
    for dt in dtypes:
        t = lambda x: x.to(dev, getattr(torch, dt))
        out = batched_decode_attention_triton(t(q), t(pool_k), t(pool_v), slots.to(dev), indptr.to(dev),
                                              pos.to(dev))
        res.append({"dtype": dt, "err": float((out.double().cpu() - ref).abs().max())})
print("RESULT" + json.dumps(res))
"""


def test_triton_decode_matches_reference():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in json.loads(res.stdout.split("RESULT", 1)[1]):
        assert r["err"] < (2e-4 if r["dtype"] == "float32" else 2e-2), r


def test_cpu_batched_path_matches_float64():
    from sglang_loopserve.cache_policy import batched_decode_attention, decode_attention

    g = torch.Generator().manual_seed(1)
    k = torch.randn(500, 2, 64, generator=g)
    v = torch.randn(500, 2, 64, generator=g)
    q = torch.randn(1, 6, 64, generator=g)
    slots = torch.arange(500)[None]
    idx = torch.stack([torch.randperm(500, generator=g)[:77].sort().values for _ in range(2)])
    indptr = torch.tensor([0, 77, 154])
    out = batched_decode_attention(q, k, v, slots, indptr, idx.reshape(-1))
    ref = decode_attention(q[0].double(), k.double(), v.double(), idx, compute_dtype=torch.float64)
    assert (out[0].double() - ref).abs().max() < 2e-4
    # bf16 (the fused kernel on a CPU): the inputs' and the output's rounding
    ref16 = decode_attention(q[0].bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), idx,
                             compute_dtype=torch.float64)
    out16 = batched_decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), slots, indptr, idx.reshape(-1))
    assert out16.dtype == torch.bfloat16 and (out16[0].double() - ref16).abs().max() < 1e-2
