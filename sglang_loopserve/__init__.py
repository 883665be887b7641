"""sglang-loopserve: LoopServe sparse prefill and decode KV compression for SGLang.

Importing this package imports neither SGLang nor torch; the SGLang glue is
loaded through entry points (see pyproject.toml).
"""

__version__ = "0.1.0"
