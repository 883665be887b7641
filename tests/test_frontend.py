"""The multi-turn frontend program over a long document, against the test server."""

from __future__ import annotations

import pytest

from sglang_loopserve.frontends import DEFAULT_QUESTIONS, connect, python_docs, run_document_chat


def test_document_is_long_real_text(tokenizer):
    doc = python_docs(3000)
    assert "textwrap" in doc and "heapq" in doc and "dedent" in doc
    assert len(tokenizer(doc).input_ids) >= 3000


def test_bad_document_length():
    with pytest.raises(ValueError, match="min_tokens"):
        python_docs(0)


def test_multiturn_program_reuses_cache(server):
    turns = run_document_chat(connect(server.url), python_docs(3000), max_tokens=24)
    assert [t.question for t in turns] == list(DEFAULT_QUESTIONS)
    assert len(turns) >= 3
    assert turns[0].prompt_tokens >= 3000
    for prev, cur in zip(turns, turns[1:]):
        assert cur.prompt_tokens > prev.prompt_tokens + prev.completion_tokens
        # Later turns: the whole earlier conversation comes from the radix cache.
        assert cur.cached_tokens >= prev.prompt_tokens
    assert all(t.answer for t in turns)
    assert all(t.latency_s > 0 for t in turns)


def test_program_rejects_bad_arguments(server):
    backend = connect(server.url)
    with pytest.raises(ValueError, match="max_tokens"):
        run_document_chat(backend, "doc", max_tokens=0)
    with pytest.raises(ValueError, match="questions"):
        run_document_chat(backend, "doc", questions=())
