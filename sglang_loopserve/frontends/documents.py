"""Long documents of real text that every machine has: Python's own docs.

The multi-turn programs and benchmarks need thousands of tokens of natural
text without a download; ``pydoc`` renders the standard library's
documentation from the installed interpreter.
"""

from __future__ import annotations

import functools
import importlib
import pydoc
import threading

#: Modules concatenated in order until the document is long enough.  The
#: programs' questions are about the first two, which are always included.
DEFAULT_MODULES = ("textwrap", "heapq", "bisect", "shlex", "fractions", "queue", "json")

#: About 4 characters per token for this text with SmolLM2's tokenizer
#: (textwrap: 7855 chars -> 1935 tokens).
CHARS_PER_TOKEN = 4.0


# pydoc reads sources through inspect/linecache, which are not thread-safe:
# two threads rendering at once can fail inside inspect.findsource.
_render_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def module_doc(name: str) -> str:
    """Plain-text pydoc of a module, without the machine-specific FILE section.

    Safe to call from several threads; each module is rendered once.
    """
    with _render_lock:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
    lines, skip = [], False
    for line in text.splitlines():
        if line in ("FILE", "MODULE REFERENCE"):
            skip = True
            continue
        if skip and line and not line.startswith(" "):
            skip = False
        if not skip:
            lines.append(line.rstrip())
    return "\n".join(lines).strip()


def python_docs(min_tokens: int = 3000, modules: tuple[str, ...] = DEFAULT_MODULES) -> str:
    """At least ``min_tokens`` (estimated) tokens of Python documentation."""
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    parts: list[str] = []
    length = 0
    for name in modules:
        if parts and length >= min_tokens * CHARS_PER_TOKEN:
            break
        doc = module_doc(name)
        parts.append(doc)
        length += len(doc)
    else:
        if length < min_tokens * CHARS_PER_TOKEN:
            raise ValueError(f"modules {modules} give only ~{length / CHARS_PER_TOKEN:.0f} tokens")
    return "\n\n".join(parts)
