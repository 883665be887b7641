"""Capture real per-layer q/k/v of the embedded model on a long multi-turn conversation.

Shared by the attention studies in this folder.  The conversation: a system
prompt, a first turn holding a long document (Python's own documentation) and
a question, an assistant answer, a second exchange, then the *last turn*: a
new user message with another document section and a question placed at its
``start``, ``middle`` or ``end``.  The last turn's tokens are the "new tokens"
whose prefill LoopServe sparsifies; everything before them is cached history.

q and k are captured after RoPE, as SGLang's attention backend sees them,
through a transformers attention interface that records its inputs and then
runs SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_loopserve import models
from sglang_loopserve.frontends.documents import module_doc, python_docs

QUESTIONS = {
    "start": "Question: which function inserts an item into a sorted list and keeps it sorted? "
             "Answer using the documentation below.\n\n{doc}",
    "middle": "{doc_a}\n\nQuestion: which function inserts an item into a sorted list and keeps it "
              "sorted?\n\n{doc_b}",
    "end": "{doc}\n\nQuestion: which function inserts an item into a sorted list and keeps it sorted?",
}


@dataclass
class Conversation:
    input_ids: torch.Tensor  # [T]
    n_new: int  # tokens of the last turn (prompt of the new turn incl. the generation prompt)
    position: str


def build_conversation(tokenizer, position: str = "end", history_tokens: int = 5000,
                       turn_tokens: int = 700) -> Conversation:
    if position not in QUESTIONS:
        raise ValueError(f"position must be one of {sorted(QUESTIONS)}, got {position!r}")
    history = python_docs(history_tokens, modules=("json", "textwrap", "heapq", "shlex", "queue"))
    turn_doc = module_doc("bisect") + "\n\n" + module_doc("fractions")
    turn_doc = turn_doc[: int(turn_tokens * 4)]
    half = len(turn_doc) // 2
    last = QUESTIONS[position].format(doc=turn_doc, doc_a=turn_doc[:half], doc_b=turn_doc[half:])
    messages = [
        {"role": "system", "content": "You are a helpful assistant for Python programmers."},
        {"role": "user", "content": f"Documentation:\n\n{history}\n\nWhat does json.dumps do?"},
        {"role": "assistant", "content": "json.dumps serializes a Python object to a JSON "
                                         "formatted string."},
        {"role": "user", "content": "And which function of textwrap removes common indentation?"},
        {"role": "assistant", "content": "textwrap.dedent removes any common leading whitespace "
                                         "from every line."},
    ]
    before = tokenizer.apply_chat_template(messages, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "user", "content": last}],
                                         tokenize=False, add_generation_prompt=True)
    ids_before = tokenizer(before, add_special_tokens=False).input_ids
    ids = tokenizer(full, add_special_tokens=False).input_ids
    assert ids[: len(ids_before)] == ids_before, "history must be a token prefix"
    return Conversation(torch.tensor(ids), len(ids) - len(ids_before), position)


def load_model(dtype=torch.float32, model: str | None = None):
    """A served model (``models.MODELS`` key or folder; default the embedded one) in transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), tok


def capture_qkv(model, input_ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer: ``q [T, H, d]`` and ``k, v [T, Hk, d]`` (post-RoPE), in the model's dtype."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    captured: dict[int, dict[str, torch.Tensor]] = {}

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        captured[module.layer_idx] = {
            "q": query[0].transpose(0, 1).detach().clone(),  # [B=1, H, T, d] -> [T, H, d]
            "k": key[0].transpose(0, 1).detach().clone(),
            "v": value[0].transpose(0, 1).detach().clone(),
        }
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("loopserve_capture", recording_attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation("loopserve_capture")
    try:
        with torch.no_grad():
            model(input_ids[None], use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return [captured[i] for i in sorted(captured)]
