"""A multi-turn conversation over a long document, in SGLang's frontend language.

Each turn appends to one growing state, so the prompt of turn ``i`` is the
whole history; SGLang's radix cache should serve everything but the new
message from cache, which ``TurnResult.cached_tokens`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from . import chat_template
from .documents import module_doc, python_docs
from .endpoint import LoopServeEndpoint

SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer questions about the document the user gives you, "
    "briefly and only from the document."
)

#: Turn 3 refers back to the answer of turn 1.
DEFAULT_QUESTIONS = (
    "Which function of the textwrap module removes any common leading whitespace from "
    "every line of a text? Name the function and say in one sentence what it does.",
    "According to the document, what does heapq.nsmallest return?",
    "Look back at your first answer. Write a short Python example that calls the function "
    "you named there.",
)


@dataclass
class TurnResult:
    question: str
    answer: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float
    #: Client-side, when the endpoint streams (``LoopServeEndpoint(timing=True)``).
    time_to_first_token_s: float | None = None
    decode_tokens_per_s: float | None = None
    #: ``meta_info["loopserve"]`` on a LoopServe server, else ``None``.
    loopserve: dict | None = None


def connect(url: str, chat_template_name: str | None = None, *, loopserve: dict | None = None,
            timing: bool = False, session_id: str | None = None) -> LoopServeEndpoint:
    """An endpoint whose chat template is the served model's own, whatever its folder is called.

    ``chat_template_name`` picks one of SGLang's named templates instead.
    ``loopserve``, ``timing`` and ``session_id``: see ``LoopServeEndpoint``.
    """
    backend = LoopServeEndpoint(url, chat_template_name=chat_template_name, loopserve=loopserve, timing=timing,
                                session_id=session_id)
    if chat_template_name is None:
        backend.chat_template = chat_template.for_model(backend.get_model_name())
    return backend


@sgl.function
def chat(s, messages, max_tokens):
    """One user message per turn, each answered greedily into ``answer_<i>``."""
    s += sgl.system(SYSTEM_PROMPT)
    for i, content in enumerate(messages):
        s += sgl.user(content)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0.0))


def document_messages(document: str, questions) -> list[str]:
    """The document comes with the first question; later turns are questions only."""
    return [f"Document:\n\n{document}\n\nQuestion: {q}" if i == 0 else q
            for i, q in enumerate(questions)]


#: A conversation whose history grows by a document per turn: about 2K, 4K and
#: 7K tokens of history before turns 2, 3 and 4 (SmolLM2's tokenizer); turn 4
#: refers back to turn 1.  Each entry: (modules documented in the turn, question).
GROWING_CONVERSATION = (
    (("textwrap",), "Which function of the textwrap module removes any common leading whitespace "
                    "from every line of a text? Name it and say in one sentence what it does."),
    (("heapq", "bisect", "shlex"), "According to this second document, what does heapq.nsmallest "
                                   "return?"),
    (("fractions", "copy"), "According to this third document, what does "
                            "Fraction.limit_denominator do?"),
    ((), "Look back at your first answer. Write a short Python example that calls the function "
         "you named there."),
)


#: The same questions over longer documents, for a 32K-context model: about 2K, 9K and 17K tokens
#: of history before turns 2, 3 and 4 (Qwen2.5's tokenizer).
LONG_GROWING_CONVERSATION = (
    (("textwrap",), GROWING_CONVERSATION[0][1]),
    (("heapq", "bisect", "shlex", "queue"), GROWING_CONVERSATION[1][1]),
    (("fractions", "copy", "json"), GROWING_CONVERSATION[2][1]),
    ((), GROWING_CONVERSATION[3][1]),
)


def growing_messages(conversation=GROWING_CONVERSATION) -> list[str]:
    messages = []
    for modules, question in conversation:
        if modules:
            doc = "\n\n".join(module_doc(m) for m in modules)
            messages.append(f"Document:\n\n{doc}\n\nQuestion: {question}")
        else:
            messages.append(question)
    return messages


def run_chat(backend: RuntimeEndpoint, messages, max_tokens: int = 64,
             questions=None) -> list[TurnResult]:
    """Run ``chat`` greedily; one ``TurnResult`` per message."""
    messages = list(messages)
    if len(messages) < 1:
        raise ValueError("messages (questions) must not be empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    state = chat.run(messages=messages, max_tokens=max_tokens, backend=backend)
    if state.error() is not None:
        raise RuntimeError(f"conversation failed: {state.error()}")
    results = []
    for i, message in enumerate(messages):
        meta = state.get_meta_info(f"answer_{i}")
        client = meta.get("client") or {}
        decode_s = client.get("decode_s")
        tps = ((meta["completion_tokens"] - 1) / decode_s
               if decode_s and meta["completion_tokens"] > 1 else None)
        results.append(TurnResult(
            question=questions[i] if questions else message,
            answer=state[f"answer_{i}"].strip(),
            prompt_tokens=meta["prompt_tokens"],
            cached_tokens=meta.get("cached_tokens", 0),
            completion_tokens=meta["completion_tokens"],
            latency_s=meta.get("e2e_latency", float("nan")),
            time_to_first_token_s=client.get("time_to_first_token_s"),
            decode_tokens_per_s=tps,
            loopserve=meta.get("loopserve"),
        ))
    return results


def run_document_chat(
    backend: RuntimeEndpoint,
    document: str | None = None,
    questions: tuple[str, ...] = DEFAULT_QUESTIONS,
    max_tokens: int = 64,
) -> list[TurnResult]:
    """The document with the first question, then the other questions."""
    if len(questions) < 1:
        raise ValueError("questions must not be empty")
    document = python_docs() if document is None else document
    return run_chat(backend, document_messages(document, questions), max_tokens, questions=questions)


def run_growing_chat(backend: RuntimeEndpoint, conversation=GROWING_CONVERSATION,
                     max_tokens: int = 64) -> list[TurnResult]:
    """``GROWING_CONVERSATION``: a new document each turn, then a question on the first."""
    return run_chat(backend, growing_messages(conversation), max_tokens,
                    questions=[q for _, q in conversation])
