"""Shared fixtures: SGLang servers on the CPU, one per configuration per test run.

The stock server lives for the whole session (most modules ask it); a LoopServe server lives only
as long as the tests that ask it: each SmolLM2 server holds GBs (fp32 KV pool of 32K tokens,
model, three processes), and in CI three launches beside five of them (24 GB, no swap) ran past
300 s without a line of output.
"""

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


def _loopserve_server(model_path, name, extra):
    srv = SGLangServer(model_path, max_total_tokens=32768, extra_args=["--enable-loopserve", *extra],
                       log_path=LOG_DIR / f"server-{name}.log")
    return srv


#: The sparse prefill from 1024 tokens (plans under 0.6 of the pairs) and the decode compressed
#: wherever its selection is smaller than the cache: the gates this machine measured (``calibrate``;
#: a read of at most half the cache) may lie above the test conversations, which then would only run
#: the exact paths.  The decode kernel stays the measured one: the server measures once per machine.
GATES_FOR_SHORT_CONVERSATIONS = ["--loopserve-min-prefill-len", "1024", "--loopserve-decode-max-read", "1",
                                 "--loopserve-decode-min-len", "0", "--loopserve-prefill-max-density", "0.6"]


@pytest.fixture(scope="module")
def loopserve_server(model_path):
    """LoopServe at its default settings but the length gate, with SGLang's Prometheus metrics on."""
    with _loopserve_server(model_path, "loopserve", ["--enable-metrics", *GATES_FOR_SHORT_CONVERSATIONS]) as srv:
        yield srv


#: Keep-everything settings: every attention cell in prefill, a decode budget above the context.
KEEP_EVERYTHING = ["--loopserve-alpha", "1.0", "--loopserve-decode-budget", "100000"]


@pytest.fixture
def keep_all_server(model_path):
    with _loopserve_server(model_path, "keep-all", KEEP_EVERYTHING) as srv:
        yield srv


@pytest.fixture
def keep_all_chunked_server(model_path):
    """Keep-everything with a prefill chunk far below the prompts' length."""
    with _loopserve_server(model_path, "keep-all-chunked",
                           KEEP_EVERYTHING + ["--chunked-prefill-size", "512"]) as srv:
        yield srv


def user_turn(text: str) -> str:
    """A user message and the assistant's turn opening, in the embedded model's chat template."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def ask(url: str, text: str, custom: dict | None = None, max_new_tokens: int = 16, timeout: float = 900) -> dict:
    """A greedy ``/generate`` of ``text`` (LoopServe settings ``custom`` if given): the response body."""
    import requests

    params = {"max_new_tokens": max_new_tokens, "temperature": 0}
    if custom is not None:
        params["custom_params"] = {"loopserve": custom}
    r = requests.post(url + "/generate", json={"text": text, "sampling_params": params}, timeout=timeout)
    r.raise_for_status()
    return r.json()


def first_tokens(text: str, tokenizer, tokens: int) -> str:
    """The first ``tokens`` tokens of ``text``, as text."""
    return tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)[:tokens])
