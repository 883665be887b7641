"""Test support: stand-ins for SGLang's batch objects, and the fuzzed request settings.

The backend reads only ``req_to_token``, the pool's per-layer key/value
buffers, the model config's head counts and a forward batch's lengths, so the
tests and ``benchmarks/backend_turn.py`` build those here, on any device (the
GPU image has no SGLang).  ``fuzzed_settings`` is the sweep of
``custom_params.loopserve`` values the server tests and ``benchmarks/soak.py`` send.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LoopServeConfig, LoopServeConfigError, request_field_name
from .srt.request_state import RequestStats, live_requests


class KVPool:
    """One layer's KV pool in SGLang's layout: ``[slots, kv_heads, head_dim]``."""

    def __init__(self, slots: int, kv_heads: int, head_dim: int, device="cpu", dtype=torch.float32):
        self.k = torch.zeros(slots, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v, *scales):
        self.k[loc.loc] = k.reshape(-1, *self.k.shape[1:]).to(self.k.dtype)
        self.v[loc.loc] = v.reshape(-1, *self.v.shape[1:]).to(self.v.dtype)


def provide_kv_write_loc() -> None:
    """Where SGLang is not installed, a stand-in for the one SGLang type the backend
    imports (``KVWriteLoc``, when it writes a batch's KV itself)."""
    name = "sglang.srt.mem_cache.memory_pool"
    if name in sys.modules or importlib.util.find_spec("sglang") is not None:
        return
    class KVWriteLoc(types.SimpleNamespace):
        @classmethod
        def for_batch(cls, forward_batch, *, swa_loc=None, full_loc=None):
            return cls(loc=forward_batch.out_cache_loc)

    module = types.ModuleType(name)
    module.KVWriteLoc = KVWriteLoc
    sys.modules[name] = module


class Mode:
    """SGLang's ``ForwardMode``, as far as the backend asks."""

    def __init__(self, name: str):
        self.name = name

    def is_idle(self):
        return False

    def is_decode(self):
        return self.name == "decode"

    def __eq__(self, other):
        return isinstance(other, Mode) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


Mode.EXTEND, Mode.DECODE = Mode("extend"), Mode("decode")


class Request:
    """A live request as the plugin's ``Req.__init__`` hook leaves it; keep a reference while in use."""

    def __init__(self, rid: str, options: LoopServeConfig):
        self.rid, self.loopserve_options = rid, options
        self.loopserve_stats = RequestStats(enabled=options.enabled, method=options.method)
        live_requests[rid] = self

    def finished(self):
        return False


def model_runner(pool: KVPool, req_to_token: torch.Tensor, num_heads: int, dtype=torch.float32,
                 context_len: int = 4096):
    """What the backend reads of SGLang's ``ModelRunner`` (one layer)."""
    kv_heads, head_dim = pool.k.shape[1:]
    return types.SimpleNamespace(
        device=str(req_to_token.device), req_to_token_pool=types.SimpleNamespace(req_to_token=req_to_token),
        token_to_kv_pool=pool, dtype=dtype, tp_size=1,
        model_config=types.SimpleNamespace(num_hidden_layers=1, num_attention_heads=num_heads,
                                           hidden_size=num_heads * head_dim, head_dim=head_dim,
                                           context_len=context_len, get_num_kv_heads=lambda tp: kv_heads))


def attention_layer(num_heads: int, kv_heads: int, head_dim: int, layer_id: int = 0, attn_type=None):
    """SGLang's ``RadixAttention`` fields the backend reads (plain causal self-attention)."""
    return types.SimpleNamespace(layer_id=layer_id, tp_q_head_num=num_heads, tp_k_head_num=kv_heads,
                                 qk_head_dim=head_dim, v_head_dim=head_dim, scaling=head_dim**-0.5,
                                 is_cross_attention=False, sliding_window_size=-1, logit_cap=0,
                                 attn_type=attn_type)


def extend_batch(rids, pool_indices, prefix_lens, new_lens, out_cache_loc, mode=Mode.EXTEND):
    """An extend ``ForwardBatch``: each request brings ``new_lens`` tokens after ``prefix_lens`` cached."""
    seq = [p + n for p, n in zip(prefix_lens, new_lens)]
    return types.SimpleNamespace(
        forward_mode=mode, rids=list(rids), req_pool_indices=torch.tensor(pool_indices),
        seq_lens=torch.tensor(seq), seq_lens_cpu=torch.tensor(seq),
        extend_prefix_lens=torch.tensor(prefix_lens), extend_prefix_lens_cpu=list(prefix_lens),
        extend_seq_lens=torch.tensor(new_lens), extend_seq_lens_cpu=list(new_lens),
        out_cache_loc=out_cache_loc, out_cache_loc_is_physical=False, encoder_lens=None)


def decode_batch(rids, pool_indices, seq_lens, out_cache_loc, mode=Mode.DECODE):
    """A decode ``ForwardBatch``: one new token per request, ``seq_lens`` counting it."""
    return types.SimpleNamespace(
        forward_mode=mode, rids=list(rids), req_pool_indices=torch.tensor(pool_indices),
        seq_lens=torch.tensor(seq_lens), seq_lens_cpu=torch.tensor(seq_lens), out_cache_loc=out_cache_loc,
        out_cache_loc_is_physical=False, encoder_lens=None)


def dense_sdpa(q, k, v):
    """Exact causal attention of the last ``n_new`` queries over ``n_ctx`` keys (SDPA).

    ``q`` [n_new, H, D], ``k``/``v`` [n_ctx, Hk, D]; queries sit at the end
    (bottom-right causal), as a turn's new tokens after its cached history.
    """
    n_new, n_ctx = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1),
                                             attn_mask=causal_lower_right(n_new, n_ctx))
    else:
        # CPU: SDPA's flash kernel takes a boolean mask and GQA directly.
        pos = torch.arange(n_ctx)
        mask = pos[None, :] <= (n_ctx - n_new + torch.arange(n_new))[:, None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1)


class DenseBase:
    """A whole-batch base backend, as FlashInfer or Triton are on a GPU: it writes the
    batch's KV and computes exact causal attention for every request (``calls`` counts
    its forwards)."""

    def __init__(self, pool: KVPool, req_to_token: torch.Tensor):
        self.pool, self.req_to_token = pool, req_to_token
        self.calls = 0

    def init_forward_metadata(self, forward_batch):
        pass

    def _run(self, q, k, v, fb, decode):
        self.calls += 1
        kv_heads, dim = self.pool.k.shape[1:]
        self.pool.k[fb.out_cache_loc] = k.reshape(-1, kv_heads, dim).to(self.pool.k.dtype)
        self.pool.v[fb.out_cache_loc] = v.reshape(-1, kv_heads, dim).to(self.pool.v.dtype)
        q_ = q.view(q.shape[0], -1, dim)
        out, start = torch.empty_like(q_), 0
        for i, n in enumerate([1] * len(fb.rids) if decode else fb.extend_seq_lens_cpu):
            rows = self.req_to_token[int(fb.req_pool_indices[i]), :int(fb.seq_lens_cpu[i])].long()
            out[start:start + n] = dense_sdpa(q_[start:start + n], self.pool.k[rows].to(q.dtype),
                                              self.pool.v[rows].to(q.dtype))
            start += n
        return out.view(q.shape[0], -1)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, forward_batch, decode=False)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        return self._run(q, k, v, forward_batch, decode=True)


#: Values of every class a client may send by mistake: wrong types, nested junk, NaN/Inf,
#: out of range, huge.  Which are wrong for which field is for ``LoopServeConfig`` to say.
FUZZ_VALUES = ("0.5", "", [0.5], {"value": 1}, [[{}]], None, True, False, float("nan"), float("inf"),
               float("-inf"), -1, 0, 0.0, 0.5, 1.5, 3, 2**31 - 1, 2**31, 2**63, 10**30, 1e308, -1e308)


@dataclass(frozen=True)
class FuzzCase:
    """A ``custom_params.loopserve`` value; ``field``: what a 400 must name, the field's JSON path
    or ``json_invalid`` (NaN and Infinity are not JSON: SGLang's strict parser refuses the body,
    with its position, before any field is read); ``None``: a valid value, to be answered."""

    value: object
    field: str | None


def fuzzed_settings() -> list[FuzzCase]:
    """Every per-request field with every ``FUZZ_VALUES`` entry, unknown and misspelt keys, and
    a ``loopserve`` that is not an object; each judged by ``LoopServeConfig.override`` (the
    server's own rule), so the sweep holds both refusals and extreme values that must serve."""
    base = LoopServeConfig()

    def as_served(value):
        # SGLang's JSON parser reads an integer beyond 64 bits as a float.
        return float(value) if isinstance(value, int) and not -2**63 <= value < 2**64 else value

    cases = [FuzzCase(v, request_field_name("")) for v in ([0.5], "alpha=0.5", 7, True, [[{}]])]
    cases += [FuzzCase({key: 1}, request_field_name(key)) for key in ("nonsense", "Alpha", "block_size", "")]
    for field_name in LoopServeConfig.REQUEST_FIELDS:
        for value in FUZZ_VALUES:
            if isinstance(value, float) and not math.isfinite(value):
                cases.append(FuzzCase({field_name: value}, "json_invalid"))
                continue
            try:
                base.override({field_name: as_served(value)}, request_field_name)
                cases.append(FuzzCase({field_name: value}, None))
            except LoopServeConfigError as exc:
                cases.append(FuzzCase({field_name: value}, request_field_name(exc.field)))
    return cases
