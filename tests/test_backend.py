"""``LoopServeAttnBackend`` in-process, on a fake KV pool: mixed batches against references.

The backend only reads ``req_to_token``, the pool's key/value buffers and the
forward batch's lengths, so small stand-ins exercise the same code SGLang runs.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from sglang_loopserve.attention import build_block_mask
from sglang_loopserve.attention.kernels.reference import block_sparse_attention_reference, causal_attention
from sglang_loopserve.attention.sparse_prefill import SPARSE_BELOW, dense_is_cheaper
from sglang_loopserve.srt.backend import DenseLayers, LoopServeAttnBackend
from sglang_loopserve.cache_policy import decode_attention
from sglang_loopserve.calibrate import SAFE_GATES
from sglang_loopserve.config import LoopServeConfig
from sglang_loopserve.srt.request_state import live_requests, store
from sglang_loopserve.testing import (DenseBase, KVPool, Request, attention_layer, decode_batch,
                                      extend_batch, model_runner, provide_kv_write_loc)

H, HK, D, SLOTS = 4, 2, 16, 4096
#: ``decode_seed="estimate"``: the tests below check selections from the first step on (``auto``,
#: the default, has its own test).  Every gate is set (nothing measured): the prefill's density gate
#: is ``SPARSE_BELOW``'s, which ``expected_prefill`` applies, and a turn compresses from any length.
CONFIG = LoopServeConfig(alpha=0.5, q_window=16, block_size=16, min_prefill_len=64, decode_budget=40,
                         decode_interval=4, decode_window=4, sink=2, recent=4, decode_seed="estimate",
                         decode_query_blocks=2, decode_pyramid=0.0, decode_min_len=0,
                         prefill_max_density=SPARSE_BELOW["cpu"], calibration="off")
#: Positions each decode step's query adds to the selection under ``CONFIG`` (2 blocks of 8, every layer).
QUERY_EXTRA = 2 * 8


def read_set(comp, length, q, k_pool, row):
    """``[Hk, n]``: what the backend's decode step reads for ``comp`` at cache length ``length``
    with query ``q`` (the selection, the query's blocks, the tokens since)."""
    flat, counts = comp.attended(length, q.reshape(H, D), k_pool, row)
    return flat.view(len(counts), -1)


def expected_prefill(q, k, v, alpha=0.5):
    """What LoopServe's sparse prefill must return, from references: the reference kernel on the
    planned mask, or exact attention where the plan is too dense to pay (``SPARSE_BELOW``)."""
    mask, _ = build_block_mask(q, k, alpha=alpha, q_window=16, block_size=16, sink=2)
    if dense_is_cheaper(mask):
        return causal_attention(q, k, v)
    return block_sparse_attention_reference(q, k, v, mask)


@pytest.fixture
def setup():
    """The backend over SGLang's own torch-native backend (the CPU server's base)."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType

    pool = KVPool(SLOTS, HK, D)
    req_to_token = torch.zeros(4, 2048, dtype=torch.int32)
    runner = model_runner(pool, req_to_token, H)
    base = TorchNativeAttnBackend(runner)
    backend = LoopServeAttnBackend(runner, base, CONFIG)
    yield types.SimpleNamespace(pool=pool, req_to_token=req_to_token, base=base, backend=backend,
                                layer=attention_layer(H, HK, D, attn_type=AttentionType.DECODER), config=CONFIG)
    for rid in ("sparse", "dense", "off", "exact"):
        store.drop(rid)


def _batch(mode, rids, pool_idx, prefix, new, out_loc):
    """A batch with SGLang's own ForwardMode (the torch-native base asks it)."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    if mode == "extend":
        return extend_batch(rids, pool_idx, prefix, new, out_loc, mode=ForwardMode.EXTEND)
    return decode_batch(rids, pool_idx, [p + n for p, n in zip(prefix, new)], out_loc, mode=ForwardMode.DECODE)


def test_mixed_batch_extend_then_decode(setup):
    s, gen = setup, torch.Generator().manual_seed(0)
    cfg = s.config
    # "dense" keeps everything (alpha 1, a budget above the 4096-token context): the base runs it.
    reqs = [Request("sparse", cfg), Request("dense", cfg.override({"alpha": 1.0, "decode_budget": 4096}))]  # noqa: F841
    # Request 0: 160 cached + 96 new (sparse path); request 1: 40 new tokens (dense: short).
    prefix, new = [160, 0], [96, 40]
    s.req_to_token[0, :256] = torch.arange(256)
    s.req_to_token[1, :40] = torch.arange(1000, 1040)
    s.pool.k[:160] = torch.randn(160, HK, D, generator=gen)
    s.pool.v[:160] = torch.randn(160, HK, D, generator=gen)
    out_loc = torch.cat([torch.arange(160, 256), torch.arange(1000, 1040)])
    q = torch.randn(136, H * D, generator=gen)
    k = torch.randn(136, HK * D, generator=gen)
    v = torch.randn(136, HK * D, generator=gen)
    fb = _batch("extend", ["sparse", "dense"], [0, 1], prefix, new, out_loc)
    o = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)

    ref_sparse = expected_prefill(q[:96].view(-1, H, D), s.pool.k[:256], s.pool.v[:256])
    torch.testing.assert_close(o[:96], ref_sparse, atol=2e-5, rtol=1e-4)
    # The dense request is exactly what the base backend computes for it alone.
    alone = s.base.forward_extend(q[96:], k[96:], v[96:], s.layer,
                                  _batch("extend", ["dense"], [1], [0], [40], out_loc[96:]))
    assert torch.equal(o[96:].reshape(40, -1), alone)
    st = live_requests["sparse"].loopserve_stats.summary()
    assert 0 < st["prefill_density"] <= 1 and st["seeded_from"] == "prefill"  # decode_seed estimate
    assert live_requests["dense"].loopserve_stats.summary()["prefill_density"] == 1.0

    # Decode: the sparse request reads its 40-token selection; the other request reads everything.
    s.req_to_token[0, 256] = 256
    s.req_to_token[1, 40] = 1040
    for step in range(6):
        fb = _batch("decode", ["sparse", "dense"], [0, 1], [256 + step, 40 + step], [1, 1],
                    torch.tensor([256 + step, 1040 + step]))
        s.req_to_token[0, 256 + step] = 256 + step
        s.req_to_token[1, 40 + step] = 1040 + step
        qd = torch.randn(2, H * D, generator=gen)
        kd = torch.randn(2, HK * D, generator=gen)
        vd = torch.randn(2, HK * D, generator=gen)
        comp = store.get("sparse").compressor(0)
        idx = read_set(comp, 257 + step, qd[0], s.pool.k, s.req_to_token[0])
        # Selection + the query's blocks + every token since it (re-selected after the 4th step, at length 260).
        fresh = step + 1 if step < 4 else step - 3
        assert idx.shape == (HK, cfg.decode_budget + QUERY_EXTRA + fresh)
        o = s.backend.forward(qd, kd, vd, s.layer, fb).view(2, H, D)
        rows = s.req_to_token[0, :257 + step].long()
        ref = decode_attention(qd[0].view(H, D), s.pool.k[rows], s.pool.v[rows], idx)
        torch.testing.assert_close(o[0], ref, atol=1e-5, rtol=1e-4)
        rows1 = s.req_to_token[1, :41 + step].long()
        dense = decode_attention(qd[1].view(H, D), s.pool.k[rows1], s.pool.v[rows1], None)
        torch.testing.assert_close(o[1], dense, atol=1e-5, rtol=1e-4)
    st = live_requests["sparse"].loopserve_stats.summary()
    assert st["reselections"] == 1 and st["decode_steps"] == 6
    assert st["decode_tokens_attended"] < st["decode_tokens_cached"]


def _prefill_a_turn(s, gen, rid):
    """A 96-token turn of request ``rid`` over 160 cached positions (slots 0-255)."""
    s.req_to_token[0, :256] = torch.arange(256)
    s.pool.k[:160] = torch.randn(160, HK, D, generator=gen)
    s.pool.v[:160] = torch.randn(160, HK, D, generator=gen)
    q, k, v = (torch.randn(96, n * D, generator=gen) for n in (H, HK, HK))
    s.backend.forward(q, k, v, s.layer, _batch("extend", [rid], [0], [160], [96], torch.arange(160, 256)))


def _decode_after_a_turn(s, gen, rid, steps):
    """``_prefill_a_turn``, then ``steps`` decode steps: each step's output through the backend,
    and the base backend's for its inputs."""
    _prefill_a_turn(s, gen, rid)
    for step in range(steps):
        s.req_to_token[0, 256 + step] = 256 + step
        fb = _batch("decode", [rid], [0], [256 + step], [1], torch.tensor([256 + step]))
        qd, kd, vd = (torch.randn(1, n * D, generator=gen) for n in (H, HK, HK))
        yield s.backend.forward(qd, kd, vd, s.layer, fb), s.base.forward_decode(qd, kd, vd, s.layer, fb)


@pytest.mark.parametrize("wanted", [False, True])
def test_a_long_exact_turn_measures_importance_for_the_pruning_cache(setup, monkeypatch, wanted):
    """A turn longer than ``q_window`` prefilled exactly reads everything until its first
    re-selection (a full seed: no attention to measure for the decode).  Under the pruning radix
    cache (``importance_wanted``) its last queries' attention is still observed as token importance:
    without it a turn below the gates gave the cache nothing to rank."""
    s, gen = setup, torch.Generator().manual_seed(5)
    monkeypatch.setattr(store, "importance_wanted", wanted)
    req = Request("exact", s.config.override({"decode_seed": "auto", "min_prefill_len": 1 << 20}))  # noqa: F841
    _prefill_a_turn(s, gen, "exact")
    assert store.get("exact").compressor(0).seeded_from == "full"
    scores = store.importance_scores("exact")
    if wanted:
        assert scores is not None and scores.shape[-1] >= 256 and bool((scores[:256] > 0).any())
    else:
        assert scores is None


@pytest.mark.parametrize("gate,on_base", [({"decode_max_read": 0.2}, True), ({"decode_max_read": 0.25}, False),
                                          ({"decode_min_len": 258}, True), ({"decode_min_len": 257}, False)])
def test_the_decode_gate_sends_a_turn_to_the_base_path(setup, gate, on_base):
    """The decode gate, decided at a turn's first step, over 257 positions (256 cached and the step's
    own).  ``decode_max_read``: each step would read 56 of them (0.22: a budget of 40 and 2 query
    blocks of 8); ``decode_min_len``:
    the machine's break-even (``calibrate``).  A turn over the request's share, or below the length,
    decodes on the base path, bit for bit what the base backend computes, reading everything and never
    re-selecting; otherwise it compresses."""
    s, gen = setup, torch.Generator().manual_seed(1)
    req = Request("sparse", s.config.override(gate))  # noqa: F841 (held: a weak registry)
    for o, alone in _decode_after_a_turn(s, gen, "sparse", 6):
        if on_base:
            assert torch.equal(o, alone)
    st = live_requests["sparse"].loopserve_stats.summary()
    assert store.get("sparse").base_decode == on_base
    if on_base:
        assert st["decode_tokens_attended"] == st["decode_tokens_cached"] and st["reselections"] == 0
    else:
        assert st["decode_tokens_attended"] < st["decode_tokens_cached"] and st["reselections"] == 1


@pytest.mark.parametrize("exact_from,keep_everything,on_kernel", [(0, False, True), (257, False, True),
                                                                   (1 << 20, False, False), (0, True, False)])
def test_an_exact_turn_reads_everything_on_the_kernel_from_its_gate(setup, exact_from, keep_everything, on_kernel):
    """A turn the decode gate sends to exact decoding (``decode_min_len`` above its 257 positions)
    reads every position through LoopServe's decode kernel from ``exact_decode_min_len`` on (the
    calibration's: where that beats stock's gather and SDPA), equal to the base's output up to
    rounding; below it, and for a keep-everything request at any length, the base path bit for bit."""
    s, gen = setup, torch.Generator().manual_seed(3)
    s.backend.gates = dataclasses.replace(s.backend.gates, exact_decode_min_len=exact_from)
    options = {"decode_min_len": 1 << 20}
    if keep_everything:
        options.update(alpha=1.0, decode_budget=1 << 20)
    req = Request("exact", s.config.override(options))  # noqa: F841 (held: a weak registry)
    for o, alone in _decode_after_a_turn(s, gen, "exact", 3):
        if on_kernel:
            torch.testing.assert_close(o, alone, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(o, alone)
    # Equal outputs both ways; which path ran is what the base-path spy below tells apart.
    calls = []
    base_decode = s.base.forward_decode
    s.base.forward_decode = lambda *a, **kw: (calls.append(1), base_decode(*a, **kw))[1]
    s.req_to_token[0, 259] = 259
    fb = _batch("decode", ["exact"], [0], [259], [1], torch.tensor([259]))
    s.backend.forward(*(torch.randn(1, n * D, generator=gen) for n in (H, HK, HK)), s.layer, fb)
    st = live_requests["exact"].loopserve_stats.summary()
    assert store.get("exact").base_decode
    assert st["decode_tokens_attended"] == st["decode_tokens_cached"] and st["reselections"] == 0
    assert (not calls) == on_kernel


def _plant_turn(s, gen, prefix, n_new, hot_a, hot_b, a_rows):
    """A turn of ``n_new`` tokens over a cached ``prefix``: keys ``hot_a`` and ``hot_b`` lean along
    two directions, the turn's queries ``a_rows`` along the first and the others along the second;
    the prefix's KV written to the pool.  Returns ``(k_all, q, v_new)``."""
    total = prefix + n_new
    s.req_to_token[0, :total] = torch.arange(total)
    k_all = torch.randn(total, HK, D, generator=gen) * 0.1
    a, b = torch.randn(HK, D, generator=gen), torch.randn(HK, D, generator=gen)
    k_all[hot_a] += 3 * a
    k_all[hot_b] += 3 * b
    group = H // HK
    q = torch.randn(n_new, H, D, generator=gen) * 0.1 + 3 * b.repeat_interleave(group, 0)
    q[a_rows] += 3 * (a - b).repeat_interleave(group, 0)
    s.pool.k[:prefix] = k_all[:prefix]
    s.pool.v[:prefix] = torch.randn(prefix, HK, D, generator=gen)
    return k_all, q, torch.randn(n_new, HK * D, generator=gen)


@pytest.mark.parametrize("seed", ["last_queries", "estimate", "full"])
def test_decode_seed_after_a_sparse_prefill(setup, seed):
    """``decode_seed``: what a turn's first tokens read.  Planted: the turn's last
    ``decode_window`` queries look at keys 40-47, every earlier query of the turn at keys
    100-131.  ``last_queries`` keeps 40-47 (the budget of 40 then has no room for all of
    100-131); ``estimate`` is the prefill estimate's column mass over all its sampled rows;
    ``full`` reads everything until the first re-selection."""
    from sglang_loopserve.cache_policy import attention_mass, keep_top

    s, cfg = setup, setup.config
    gen = torch.Generator().manual_seed(3)
    req = Request("sparse", cfg.override({"decode_seed": seed}))  # noqa: F841 (alive)
    prefix, n_new, w = 160, 96, cfg.decode_window
    total = prefix + n_new
    k_all, q, v_new = _plant_turn(s, gen, prefix, n_new, slice(40, 48), slice(100, 132), slice(n_new - w, None))
    fb = _batch("extend", ["sparse"], [0], [prefix], [n_new], torch.arange(prefix, total))
    s.backend.forward(q.reshape(n_new, -1), k_all[prefix:].reshape(n_new, -1), v_new, s.layer, fb)
    comp = store.get("sparse").compressor(0)
    if seed == "full":
        assert comp.indices(total) is None and comp.seeded_from == "full"
        return
    kept = comp.indices(total)
    assert kept.shape == (HK, cfg.decode_budget)
    if seed == "estimate":
        assert comp.seeded_from == "prefill"
        return
    assert comp.seeded_from == "prompt"
    expected = keep_top(attention_mass(q[-w:], k_all), cfg.decode_budget, cfg.sink, cfg.recent)
    assert torch.equal(kept, expected)
    for h in range(HK):
        assert set(range(40, 48)) <= set(kept[h].tolist())


@pytest.mark.parametrize("chunks", [[12], [16], [17], [48], [40, 8]])
def test_auto_seed_follow_ups_choose_long_turns_read_everything(setup, chunks, monkeypatch):
    """``decode_seed`` ``auto``: a turn of at most ``q_window`` (16) new tokens is seeded from
    the attention of all its queries (planted: its first queries, the question, look at keys
    40-47, its last ones elsewhere); a longer turn, also one whose last chunk is short, reads
    everything until the first re-selection."""
    from sglang_loopserve.cache_policy import attention_mass, keep_top

    s, gen = setup, torch.Generator().manual_seed(5)
    cfg = s.config.override({"decode_seed": "auto", "min_prefill_len": 100_000})  # exact forwards
    req = Request("sparse", cfg)  # noqa: F841 (alive)
    prefix, turn = 200, sum(chunks)
    total = prefix + turn
    k_all, q, v_new = _plant_turn(s, gen, prefix, turn, slice(40, 48), slice(120, 200), slice(None, turn // 2))
    done = prefix
    for n in chunks:  # a chunked prefill: the same request, one forward per chunk
        sl = slice(done - prefix, done - prefix + n)
        fb = _batch("extend", ["sparse"], [0], [done], [n], torch.arange(done, done + n))
        s.backend.forward(q[sl].reshape(n, -1), k_all[done:done + n].reshape(n, -1), v_new[sl], s.layer, fb)
        done += n
    comp = store.get("sparse").compressor(0)
    assert store.get("sparse").turn_tokens == turn
    if turn > cfg.q_window:
        assert comp.seeded_from == "full" and comp.indices(total) is None
        # Its first decode step reads every position (on a CPU through the batched kernel): exact.
        s.req_to_token[0, total] = total
        qd, kd, vd = (torch.randn(1, h * D, generator=gen) for h in (H, HK, HK))
        fb = _batch("decode", ["sparse"], [0], [total], [1], torch.tensor([total]))
        import sglang_loopserve.srt.backend as backend_module

        calls = []
        kernel = backend_module.batched_decode_attention
        monkeypatch.setattr(backend_module, "batched_decode_attention",
                            lambda *a, **kw: calls.append(a[-1].numel()) or kernel(*a, **kw))
        o = s.backend.forward(qd, kd, vd, s.layer, fb).view(H, D)
        assert calls == [HK * (total + 1)]
        rows = s.req_to_token[0, :total + 1].long()
        dense = decode_attention(qd.view(H, D), s.pool.k[rows], s.pool.v[rows], None)
        torch.testing.assert_close(o, dense, atol=1e-5, rtol=1e-4)
        assert live_requests["sparse"].loopserve_stats.summary()["decode_tokens_attended"] == total + 1
        return
    assert comp.seeded_from == "prompt"
    kept = comp.indices(total)
    assert torch.equal(kept, keep_top(attention_mass(q, k_all), cfg.decode_budget, cfg.sink, cfg.recent))
    for h in range(HK):  # the question's keys, though its queries are not the turn's last ones
        assert set(range(40, 48)) <= set(kept[h].tolist())


@pytest.mark.parametrize("n_new", [1, 31, 700])
def test_forwards_below_the_gate_compute_exactly_their_new_rows(setup, n_new):
    """A LoopServe request that does not run sparse (shorter than a block, or than the length gate)
    computes its new rows over cached + new keys, exactly: the torch-native base would recompute
    the square of the whole sequence for it."""
    s, gen = setup, torch.Generator().manual_seed(n_new)
    req = Request("sparse", s.config.override({"min_prefill_len": 100_000}))  # noqa: F841 (alive)
    prefix = 900
    total = prefix + n_new
    s.req_to_token[0, :total] = torch.arange(total)
    s.pool.k[:prefix] = torch.randn(prefix, HK, D, generator=gen)
    s.pool.v[:prefix] = torch.randn(prefix, HK, D, generator=gen)
    q, k, v = (torch.randn(n_new, h * D, generator=gen) for h in (H, HK, HK))
    fb = _batch("extend", ["sparse"], [0], [prefix], [n_new], torch.arange(prefix, total))
    assert s.backend.extend_mode(req.loopserve_options, total, n_new) == "exact"
    o = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)
    assert torch.equal(s.pool.k[prefix:total], k.view(-1, HK, D))  # the new KV is written
    ref = causal_attention(q.view(-1, H, D).double(), s.pool.k[:total].double(), s.pool.v[:total].double(),
                           compute_dtype=torch.float64)
    assert (o.double() - ref).abs().max() < 2e-4
    st = live_requests["sparse"].loopserve_stats.summary()
    assert st["prefill_density"] == 1.0 and st["prefill_sparse_fraction"] == 0.0
    # The decode selection starts from the attention of the prompt's last queries, not everything.
    comp = store.get("sparse").compressor(0)
    assert st["seeded_from"] == comp.seeded_from == "prompt"
    assert comp.indices(total).shape == (HK, min(s.config.decode_budget, total))


def test_extend_modes(setup):
    """Which path each request takes: keep-everything and disabled requests on the base, short or
    below-the-gate ones exact, the rest sparse (a GPU base runs the exact ones itself)."""
    b, cfg = setup.backend, setup.config
    assert b.extend_mode(cfg.override({"enabled": False}), 5000, 2000) == "base"
    assert b.extend_mode(cfg.override({"alpha": 1.0, "decode_budget": 4096}), 5000, 2000) == "base"
    assert b.extend_mode(cfg.override({"alpha": 1.0}), 5000, 2000) == "exact"  # decode still compressed
    assert b.extend_mode(cfg, 5000, cfg.block_size - 1) == "exact"
    assert b.extend_mode(cfg, cfg.min_prefill_len - 1, 60) == "exact"
    assert b.extend_mode(cfg, 5000, 2000) == "sparse"
    # Set by the server's flag, the backend's gate is the flag's; options without it take that gate.
    assert b.gates.min_prefill_len == cfg.min_prefill_len and b.gates.source == "defaults+flags"
    assert b.gates.decode_min_len == 0 and b.gates.decode_kernel == SAFE_GATES.decode_kernel
    unset = dataclasses.replace(cfg, min_prefill_len=None)
    assert b.extend_mode(unset, b.gates.min_prefill_len - 1, 2000) == "exact"
    assert b.extend_mode(unset, b.gates.min_prefill_len, 2000) == "sparse"


def test_disabled_request_is_the_base_backend(setup):
    s, gen = setup, torch.Generator().manual_seed(1)
    req = Request("off", s.config.override({"enabled": False}))  # noqa: F841 (kept alive)
    s.req_to_token[2, :200] = torch.arange(2000, 2200)
    q = torch.randn(200, H * D, generator=gen)
    k = torch.randn(200, HK * D, generator=gen)
    v = torch.randn(200, HK * D, generator=gen)
    fb = _batch("extend", ["off"], [2], [0], [200], torch.arange(2000, 2200))
    o = s.backend.forward(q, k, v, s.layer, fb)
    assert torch.equal(o, s.base.forward_extend(q, k, v, s.layer, fb))
    assert "off" not in store


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _whole_batch(device):
    """The backend over a whole-batch ``DenseBase`` on ``device``."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    pool = KVPool(SLOTS, HK, D, device=device)
    req_to_token = torch.zeros(2, 2048, dtype=torch.int32, device=device)
    base = DenseBase(pool, req_to_token)
    backend = LoopServeAttnBackend(model_runner(pool, req_to_token, H, dtype), base, CONFIG)
    return types.SimpleNamespace(backend=backend, base=base, pool=pool, req_to_token=req_to_token,
                                 layer=attention_layer(H, HK, D), dtype=dtype,
                                 tol=dict(atol=3e-3, rtol=3e-3) if device == "cuda" else dict(atol=2e-5, rtol=1e-4))


def _cpu(x):
    return x.float().cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_whole_batch_base_path(device):
    """The GPU-shaped path: base runs the whole batch, LoopServe overwrites its requests' rows."""
    gen = torch.Generator().manual_seed(2)
    w = _whole_batch(device)
    backend, pool, req_to_token, layer, dt, tol = w.backend, w.pool, w.req_to_token, w.layer, w.dtype, w.tol
    reqs = [Request("gpu-sparse", CONFIG), Request("gpu-dense", CONFIG.override({"enabled": False}))]  # noqa: F841
    req_to_token[0, :300] = torch.arange(300)
    req_to_token[1, :50] = torch.arange(1000, 1050)
    q, k, v = (torch.randn(350, h * D, generator=gen).to(device, dt) for h in (H, HK, HK))
    fb = extend_batch(["gpu-sparse", "gpu-dense"], [0, 1], [0, 0], [300, 50],
                      torch.cat([torch.arange(300), torch.arange(1000, 1050)]).to(device))
    o = backend.forward(q, k, v, layer, fb).view(-1, H, D)
    ref = expected_prefill(_cpu(q[:300]).view(-1, H, D), _cpu(pool.k[:300]), _cpu(pool.v[:300]))
    torch.testing.assert_close(_cpu(o[:300]), ref, **tol)
    assert w.base.calls == 1  # a mixed batch: the base runs it whole
    dense = DenseBase(pool, req_to_token).forward_extend(q, k, v, layer, fb).view(-1, H, D)
    assert torch.equal(o[300:], dense[300:])  # the disabled request: the base's own numbers

    req_to_token[0, 300] = 300
    req_to_token[1, 50] = 1050
    fb = decode_batch(["gpu-sparse", "gpu-dense"], [0, 1], [301, 51], torch.tensor([300, 1050], device=device))
    qd, kd, vd = (torch.randn(2, h * D, generator=gen).to(device, dt) for h in (H, HK, HK))
    idx = read_set(store.get("gpu-sparse").compressor(0), 301, qd[0], pool.k, req_to_token[0])
    assert idx.shape[1] == 41 + QUERY_EXTRA  # budget + the query's blocks + the new token, out of 301
    o = backend.forward(qd, kd, vd, layer, fb).view(2, H, D)
    rows = req_to_token[0, :301].long()
    ref = decode_attention(_cpu(qd[0]).view(H, D), _cpu(pool.k[rows]), _cpu(pool.v[rows]), idx.cpu())
    torch.testing.assert_close(_cpu(o[0]), ref, **tol)
    for rid in ("gpu-sparse", "gpu-dense"):
        store.drop(rid)


@pytest.mark.parametrize("device", DEVICES)
def test_whole_batch_base_skipped_when_loopserve_takes_every_request(device):
    """A batch of sparse requests never reaches a whole-batch base: LoopServe writes the KV itself."""
    provide_kv_write_loc()
    gen = torch.Generator().manual_seed(3)
    w = _whole_batch(device)
    pool, req_to_token, dt = w.pool, w.req_to_token, w.dtype
    reqs = [Request("all-a", CONFIG), Request("all-b", CONFIG)]  # noqa: F841 (alive)
    # a: a radix hit of 200 cached tokens + 100 new; b: 260 new tokens.
    req_to_token[0, :300] = torch.arange(300)
    req_to_token[1, :260] = torch.arange(1000, 1260)
    pool.k[:200], pool.v[:200] = (torch.randn(200, HK, D, generator=gen).to(device, pool.k.dtype) for _ in "kv")
    q, k, v = (torch.randn(360, h * D, generator=gen).to(device, dt) for h in (H, HK, HK))
    out_loc = torch.cat([torch.arange(200, 300), torch.arange(1000, 1260)]).to(device)
    fb = extend_batch(["all-a", "all-b"], [0, 1], [200, 0], [100, 260], out_loc)
    o = w.backend.forward(q, k, v, w.layer, fb).view(-1, H, D)
    assert w.base.calls == 0
    assert torch.equal(pool.k[out_loc], k.view(-1, HK, D).to(pool.k.dtype))
    assert torch.equal(pool.v[out_loc], v.view(-1, HK, D).to(pool.v.dtype))
    for lo, hi, rows in ((0, 100, torch.arange(300)), (100, 360, torch.arange(1000, 1260))):
        ref = expected_prefill(_cpu(q[lo:hi]).view(-1, H, D), _cpu(pool.k[rows]), _cpu(pool.v[rows]))
        torch.testing.assert_close(_cpu(o[lo:hi]), ref, **w.tol)

    req_to_token[0, 300], req_to_token[1, 260] = 300, 1260
    fb = decode_batch(["all-a", "all-b"], [0, 1], [301, 261], torch.tensor([300, 1260], device=device))
    qd, kd, vd = (torch.randn(2, h * D, generator=gen).to(device, dt) for h in (H, HK, HK))
    o = w.backend.forward(qd, kd, vd, w.layer, fb).view(2, H, D)
    assert w.base.calls == 0
    assert torch.equal(pool.k[[300, 1260]], kd.view(2, HK, D).to(pool.k.dtype))
    for i, (rid, n) in enumerate((("all-a", 301), ("all-b", 261))):
        idx = read_set(store.get(rid).compressor(0), n, qd[i], pool.k, req_to_token[i])
        assert idx.shape[1] == CONFIG.decode_budget + QUERY_EXTRA + 1
        rows = req_to_token[i, :n].long()
        ref = decode_attention(_cpu(qd[i]).view(H, D), _cpu(pool.k[rows]), _cpu(pool.v[rows]), idx.cpu())
        torch.testing.assert_close(_cpu(o[i]), ref, **w.tol)
    for rid in ("all-a", "all-b"):
        store.drop(rid)


def test_translated_kv_ids_are_refused():
    """Hybrid SWA/Mamba pools translate token ids: start-up fails instead of reading wrong KV."""
    runner = types.SimpleNamespace(device="cpu", kv_index_translator=types.SimpleNamespace(is_translating=True))
    with pytest.raises(NotImplementedError, match="translates token ids"):
        LoopServeAttnBackend(runner, DenseBase(None, None), CONFIG)


def test_dense_layers_skip_planning_until_the_next_probe():
    layers = DenseLayers(probe_every=3)
    assert not layers.skip(5, 4000, 0.95)  # never planned: plan
    layers.observe(5, 0.9, 4000, 0.95)
    assert layers.skip(5, 4000, 0.95) and layers.skip(5, 3000, 0.95)
    assert not layers.skip(5, 4000, 0.95)  # every third forward plans again
    layers.observe(5, 0.3, 4000, 0.95)
    assert not layers.skip(5, 4000, 0.95) and not layers.skip(6, 4000, 0.95)
    # Too dense for the gate but below remember_from: whether it pays depends on the conversation.
    layers.observe(7, 0.7, 4000, 0.95)
    assert not layers.skip(7, 4000, 0.95)
    layers.observe(7, DenseLayers.REMEMBER_FROM, 4000, 0.95)
    assert layers.skip(7, 4000, 0.95)


def test_dense_layers_remember_per_length_octave_and_alpha():
    """A short first turn planned too dense says nothing about the next turn over twice the keys,
    nor about a lower alpha (sparser plans)."""
    layers = DenseLayers(probe_every=8)
    layers.observe(3, planned_density=0.85, n_ctx=1600, alpha=0.95)
    assert layers.skip(3, 1900, 0.95) and layers.skip(3, 1100, 0.99)  # same octave, alpha >= 0.95
    assert not layers.skip(3, 3600, 0.95)  # a longer octave: plan
    assert not layers.skip(3, 1600, 0.9)  # a lower alpha: plan
    assert not layers.skip(4, 1600, 0.95)  # another layer
    layers.observe(3, planned_density=0.4, n_ctx=1700, alpha=0.95)
    assert not layers.skip(3, 1600, 0.95)


def test_a_layer_planned_too_dense_runs_exact_without_planning(setup):
    """Random attention is diffuse: the first forward plans (too dense: exact), the next one of the
    same layer skips the plan (no estimate: the decode selection is seeded from the prompt's last
    queries)."""
    s, gen = setup, torch.Generator().manual_seed(9)
    req = Request("sparse", s.config.override({"alpha": 0.95}))  # noqa: F841 (alive)
    s.req_to_token[0, :400] = torch.arange(400)
    q, k, v = (torch.randn(400, h * D, generator=gen) for h in (H, HK, HK))
    fb = _batch("extend", ["sparse"], [0], [0], [400], torch.arange(400))
    o = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)
    first = live_requests["sparse"].loopserve_stats.summary()
    assert first["seeded_from"] == "prefill" and first["select_time_s"] > 0 and first["prefill_density"] == 1.0
    o2 = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)
    assert torch.equal(o, o2)  # both exact
    assert store.get("sparse").compressor(0).seeded_from == "prompt"  # not planned: the prompt's queries
    ref = causal_attention(q.view(-1, H, D).double(), k.view(-1, HK, D).double(), v.view(-1, HK, D).double(),
                           compute_dtype=torch.float64)
    assert (o.double() - ref).abs().max() < 2e-4


# Faults and NaN/Inf ------------------------------------------------------------
def _prefill_two(s, gen, rids=("sparse", "dense")):
    """Request 0: 160 cached + 96 new (the sparse path); request 1: 40 new, keep-everything."""
    reqs = [Request(rids[0], s.config), Request(rids[1], s.config.override({"alpha": 1.0, "decode_budget": 4096}))]
    s.req_to_token[0, :256] = torch.arange(256)
    s.req_to_token[1, :40] = torch.arange(1000, 1040)
    s.pool.k[:160] = torch.randn(160, HK, D, generator=gen)
    s.pool.v[:160] = torch.randn(160, HK, D, generator=gen)
    out_loc = torch.cat([torch.arange(160, 256), torch.arange(1000, 1040)])
    q, k, v = (torch.randn(136, n * D, generator=gen) for n in (H, HK, HK))
    fb = _batch("extend", list(rids), [0, 1], [160, 0], [96, 40], out_loc)
    return reqs, q, k, v, fb


def _decode_two(s, gen, step, rids=("sparse", "dense")):
    s.req_to_token[0, 256 + step] = 256 + step
    s.req_to_token[1, 40 + step] = 1040 + step
    fb = _batch("decode", list(rids), [0, 1], [256 + step, 40 + step], [1, 1],
                torch.tensor([256 + step, 1040 + step]))
    return fb, (torch.randn(2, n * D, generator=gen) for n in (H, HK, HK))


def _exact_decode(s, q_row, length, pool_row):
    rows = s.req_to_token[pool_row, :length].long()
    return causal_attention(q_row.view(1, H, D), s.pool.k[rows], s.pool.v[rows])[0]


def test_nan_in_a_prefill_falls_back_to_exact_and_counts(setup):
    from sglang_loopserve.srt.faults import stats as fault_stats

    s, gen = setup, torch.Generator().manual_seed(1)
    before = fault_stats.nonfinite_exact_layers
    reqs, q, k, v, fb = _prefill_two(s, gen)
    s.pool.k[17, 1, 3] = float("nan")  # a cached key of the sparse request's history
    o = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)
    ref = causal_attention(q[:96].view(-1, H, D), s.pool.k[:256], s.pool.v[:256])
    torch.testing.assert_close(o[:96], ref, equal_nan=True)  # what stock attention gives: the exact rectangle
    assert o[:96].isnan().any()
    stats = reqs[0].loopserve_stats.summary()
    assert stats["nonfinite_exact_layers"] == 1 and stats["prefill_density"] == 1.0
    assert fault_stats.nonfinite_exact_layers == before + 1
    assert not hasattr(reqs[0], "to_finish")  # NaN is not a fault: the request goes on
    assert not o[96:].isnan().any()


def test_nan_in_a_decode_query_reads_everything_from_then_on(setup):
    s, gen = setup, torch.Generator().manual_seed(2)
    reqs, q, k, v, fb = _prefill_two(s, gen)
    s.backend.forward(q, k, v, s.layer, fb)
    for step in range(3):
        fb, (qd, kd, vd) = _decode_two(s, gen, step)
        if step == 1:
            qd[0, 5] = float("inf")
        o = s.backend.forward(qd, kd, vd, s.layer, fb).view(2, H, D)
        if step >= 1:  # exact over every cached token, as the base computes it
            torch.testing.assert_close(o[0], _exact_decode(s, s.backend._scaled(qd[0].view(H, D), s.layer),
                                                           257 + step, 0), equal_nan=True)
    stats = reqs[0].loopserve_stats.summary()
    assert stats["nonfinite_exact_layers"] == 2  # steps 1 and 2 (one layer each)
    assert stats["decode_tokens_attended"] < stats["decode_tokens_cached"]  # step 0 read its selection


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_fault_in_loopserve_fails_that_request_only(setup, phase):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    from sglang_loopserve.srt.faults import FaultHook

    s, gen = setup, torch.Generator().manual_seed(3)
    s.backend.fault_hook = FaultHook((phase, "spar"))
    reqs, q, k, v, fb = _prefill_two(s, gen)
    o = s.backend.forward(q, k, v, s.layer, fb).view(-1, H, D)
    ref = causal_attention(q[:96].view(-1, H, D), s.pool.k[:256], s.pool.v[:256])
    torch.testing.assert_close(o[:96], ref, atol=2e-5, rtol=1e-4)  # exact, in either case
    fb, (qd, kd, vd) = _decode_two(s, gen, 0)
    o = s.backend.forward(qd, kd, vd, s.layer, fb).view(2, H, D)
    torch.testing.assert_close(o[0], _exact_decode(s, s.backend._scaled(qd[0].view(H, D), s.layer), 257, 0),
                               atol=2e-5, rtol=1e-4)
    finish = reqs[0].to_finish
    assert isinstance(finish, FINISH_ABORT) and "LoopServe failed" in finish.message
    assert finish.status_code == 500 and "InjectedFault" in finish.message
    assert not hasattr(reqs[1], "to_finish")  # the other request goes on
    dense = s.base.forward_decode(qd[1:], kd[1:], vd[1:], s.layer,
                                  _batch("decode", ["dense"], [1], [40], [1], torch.tensor([1040])))
    assert torch.equal(o[1].reshape(1, -1), dense)


def test_a_failing_decode_kernel_is_retried_per_request(setup, monkeypatch):
    """The batched decode call raises for one request: the other still reads its selection."""
    import sglang_loopserve.srt.backend as backend_module

    s, gen = setup, torch.Generator().manual_seed(4)
    cfg = s.config
    reqs = [Request("sparse", cfg), Request("off", cfg)]
    for row in (0, 1):
        s.req_to_token[row, :257] = torch.arange(257) + 2000 * row
    s.pool.k[:2300] = torch.randn(2300, HK, D, generator=gen)
    s.pool.v[:2300] = torch.randn(2300, HK, D, generator=gen)
    for rid in ("sparse", "off"):
        store.new_turn(rid, cfg, 0)
    real = backend_module.batched_decode_attention

    def fails_for_row_one(q, k, v, slots, indptr, positions, method="auto"):
        if q.shape[0] > 1 or int(slots[0, 0]) == 2000:
            raise RuntimeError("kernel failed")
        return real(q, k, v, slots, indptr, positions, method=method)

    monkeypatch.setattr(backend_module, "batched_decode_attention", fails_for_row_one)
    fb = _batch("decode", ["sparse", "off"], [0, 1], [256, 256], [1, 1], torch.tensor([256, 2256]))
    qd, kd, vd = (torch.randn(2, n * D, generator=gen) for n in (H, HK, HK))
    for rid in ("sparse", "off"):  # a seeded selection, so both read the kernel
        store.get(rid).compressor(0, 1).seed(torch.rand(HK, 257), 257)
    o = s.backend.forward(qd, kd, vd, s.layer, fb).view(2, H, D)
    assert not hasattr(reqs[0], "to_finish") and reqs[1].to_finish.status_code == 500
    torch.testing.assert_close(o[1], _exact_decode(s, s.backend._scaled(qd[1].view(H, D), s.layer), 257, 1),
                               atol=2e-5, rtol=1e-4)
    assert reqs[0].loopserve_stats.summary()["decode_tokens_attended"] < 257


@pytest.mark.parametrize("value", ["decode", "decode:", "prefil:x", ":x"])
def test_fault_injection_variable_is_checked(value):
    from sglang_loopserve.srt.faults import INJECT_ENV, injection_from_env

    with pytest.raises(ValueError, match=INJECT_ENV):
        injection_from_env(value)
    assert injection_from_env("decode:fault-") == ("decode", "fault-")
