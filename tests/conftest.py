"""Shared fixtures: one SGLang server on the CPU for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sglang_loopserve import models
from sglang_loopserve.server import SGLangServer

LOG_DIR = Path(os.environ.get("SGLANG_LOOPSERVE_TEST_LOGS", Path(__file__).parent.parent / ".cache" / "test-logs"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    return models.prepare()


@pytest.fixture(scope="session")
def server(model_path):
    """The embedded model served by stock SGLang + the LoopServe CPU platform."""
    srv = SGLangServer(model_path, max_total_tokens=32768, log_path=LOG_DIR / "server.log")
    with srv:
        yield srv


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)
