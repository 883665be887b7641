"""LoopServe's Prometheus metrics, next to SGLang's own on ``/metrics``.

Created in the scheduler process only when SGLang's metrics are on
(``--enable-metrics``): SGLang then runs prometheus_client in multiprocess
mode, so values recorded here are served by the HTTP process.
"""

from __future__ import annotations


RADIX_COUNTERS = {
    "pruned_tokens": "Cached tokens whose KV the radix tree pruned (tombstoned) under pressure.",
    "freed_slots": "KV slots the radix tree gave back: pruned tokens and evicted leaves.",
    "evicted_leaves": "Whole radix-tree leaves evicted (LoopServe's policy).",
    "evicted_tokens": "Live KV slots of the evicted leaves.",
    "reprefilled_tokens": "Prompt tokens computed by prefill, not served from the radix cache.",
}


class LoopServeMetrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.prefill_density = Histogram(
            "sglang:loopserve_prefill_density",
            "Fraction of causal (query, key) pairs a sparse prefill computed, per layer forward.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
        self.select_seconds = Histogram(
            "sglang:loopserve_select_seconds",
            "Time spent selecting: prefill estimate + index per layer, decode re-selection per layer.",
            ["phase"], buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0))
        self.decode_attended = Counter(
            "sglang:loopserve_decode_tokens_attended",
            "Cached tokens read by decode attention (per layer step, mean over KV heads).")
        self.decode_cached = Counter(
            "sglang:loopserve_decode_tokens_cached",
            "Cached tokens available to decode attention (per layer step).")
        self.reselections = Counter(
            "sglang:loopserve_reselections", "Decode re-selections (per layer).")
        # The radix tree's pressure handling (srt/radix.py), labelled by eviction policy.
        self.radix = {name: Counter(f"sglang:loopserve_radix_{name}", doc, ["policy"])
                      for name, doc in RADIX_COUNTERS.items()}
        self._radix_seen: dict[str, int] = {}

    def observe_prefill(self, density: float, select_s: float) -> None:
        self.prefill_density.observe(density)
        self.select_seconds.labels("prefill").observe(select_s)

    def observe_decode(self, attended: float, cached: int) -> None:
        self.decode_attended.inc(attended)
        self.decode_cached.inc(cached)

    def observe_reselection(self, seconds: float) -> None:
        self.reselections.inc()
        self.select_seconds.labels("decode").observe(seconds)

    def sync_radix(self, stats) -> None:
        """Bring the radix counters up to ``stats`` (a ``srt.radix.RadixStats``)."""
        for name, counter in self.radix.items():
            value = getattr(stats, name)
            delta = value - self._radix_seen.get(name, 0)
            if delta > 0:
                counter.labels(stats.policy).inc(delta)
                self._radix_seen[name] = value
