"""A multi-turn conversation over a long document, in SGLang's frontend language.

Each turn appends to one growing state, so the prompt of turn ``i`` is the
whole history; SGLang's radix cache should serve everything but the new
question from cache, which ``TurnResult.cached_tokens`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from .documents import python_docs

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

# Templates for models whose path SGLang's frontend cannot match by itself.
_CHAT_TEMPLATE_BY_PATH = {"smollm": "chatml"}


@dataclass
class TurnResult:
    question: str
    answer: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float


def connect(url: str, chat_template_name: str | None = None) -> RuntimeEndpoint:
    """A ``RuntimeEndpoint`` whose chat template matches the served model.

    SmolLM2's own template (from its GGUF) is plain ChatML; SGLang's frontend
    does not recognise the model path, so name the template here.
    """
    backend = RuntimeEndpoint(url)
    if chat_template_name is None:
        path = backend.get_model_name().lower()
        chat_template_name = next(
            (name for key, name in _CHAT_TEMPLATE_BY_PATH.items() if key in path), None
        )
    if chat_template_name:
        backend = RuntimeEndpoint(url, chat_template_name=chat_template_name)
    return backend


@sgl.function
def document_chat(s, document, questions, max_tokens):
    s += sgl.system(SYSTEM_PROMPT)
    for i, question in enumerate(questions):
        content = f"Document:\n\n{document}\n\nQuestion: {question}" if i == 0 else question
        s += sgl.user(content)
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0.0))


def run_document_chat(
    backend: RuntimeEndpoint,
    document: str | None = None,
    questions: tuple[str, ...] = DEFAULT_QUESTIONS,
    max_tokens: int = 64,
) -> list[TurnResult]:
    """Run the conversation greedily; one ``TurnResult`` per question."""
    if len(questions) < 1:
        raise ValueError("questions must not be empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    document = python_docs() if document is None else document
    state = document_chat.run(
        document=document, questions=list(questions), max_tokens=max_tokens, backend=backend
    )
    if state.error() is not None:
        raise RuntimeError(f"conversation failed: {state.error()}")
    results = []
    for i, question in enumerate(questions):
        meta = state.get_meta_info(f"answer_{i}")
        results.append(
            TurnResult(
                question=question,
                answer=state[f"answer_{i}"].strip(),
                prompt_tokens=meta["prompt_tokens"],
                cached_tokens=meta.get("cached_tokens", 0),
                completion_tokens=meta["completion_tokens"],
                latency_s=meta.get("e2e_latency", float("nan")),
            )
        )
    return results
