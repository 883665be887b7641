"""The runtime under the CPU loops of ``attention/`` and ``cache_policy/``: numba's configuration
(``numba_setup``), the row helpers both loops inline (``numba_rows``) and ``parallel_for`` on
torch's own OpenMP team (``torch_threads``).  Engine-agnostic: never imports SGLang."""
