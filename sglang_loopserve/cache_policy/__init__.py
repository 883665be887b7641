"""Decode-time KV compression (and, later, radix-cache eviction policies).

Engine-agnostic: torch tensors in, tensors out; the SGLang backend drives it.
"""

from .batched import batched_decode_attention, select_decode_kv_batched
from .decode import DecodeCompressor, decode_attention, select_decode_kv, select_decode_kv_pruned
from .scoring import attention_mass, keep_top
from .summaries import KeySummaries
from .methods import METHODS, AdaKV, FullAttention, KVScorer, LoopServe, ScoreContext, SnapKV, StreamingLLM

__all__ = [
    "AdaKV", "DecodeCompressor", "FullAttention", "KVScorer", "LoopServe", "METHODS", "ScoreContext", "SnapKV",
    "StreamingLLM", "attention_mass", "batched_decode_attention", "decode_attention", "keep_top",
    "select_decode_kv", "select_decode_kv_batched", "select_decode_kv_pruned", "KeySummaries",
]
