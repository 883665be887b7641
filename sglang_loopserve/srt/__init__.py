"""The SGLang runtime glue (SGLang's own name for its runtime): the CPU platform, the plugin and
its hooks, the attention backend, per-request state, the radix-cache policy and metrics.

Thin by design: it translates SGLang's batches and trees into the engine-agnostic algorithms of
``attention/`` and ``cache_policy/``; only this package imports SGLang's runtime.
"""
