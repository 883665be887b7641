"""What the offline KL tools share: their options, the replayed model, the sampled answers.

``decode_kl_offline.py`` and ``prefill_kl_offline.py`` both sample an answer
with full attention on ``kl_fidelity``'s conversations (question at the start,
middle or end) and replay it teacher-forced through a transformers attention
function that applies one setting; this module holds that scaffolding.
"""

from __future__ import annotations

import argparse

import torch

from capture import load_model
from kl_fidelity import POSITIONS, conversation


def arguments(doc: str, settings: dict) -> argparse.ArgumentParser:
    """The options both tools take (``--settings`` names ``settings`` or ``name=JSON``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=list(settings), help="names above, or name=JSON")
    p.add_argument("--docs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=3800)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a key of `python -m sglang_loopserve.models list` or a folder (default: "
                                   "the embedded SmolLM2)")
    return p


def replayed_model(attention, name: str, seed: int, model_name: str | None = None):
    """A served model (fp32; default the embedded one) with ``attention`` as its attention function,
    and its tokenizer."""
    from transformers import AttentionInterface

    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    model, tok = load_model(model=model_name)
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)
    return model, tok


def conversations(tok, docs: int, prompt_tokens: int):
    """``(doc, position, first_turn_ids, prompt_ids)`` for every document and question position."""
    for doc in range(docs):
        for position in POSITIONS:
            first_ids, prompt_ids = conversation(tok, doc, position, prompt_tokens)
            yield doc, position, first_ids, prompt_ids


def sample_answer(model, prompt: torch.Tensor, tokens: int, seed: int, doc: int, position: str) -> torch.Tensor:
    """``[1, tokens]``: an answer sampled at temperature 1 from the whole distribution, from a
    generator seeded per conversation: the same answers whatever settings ran before (the replay's
    kernels may draw from the global generator)."""
    torch.manual_seed(seed * 1000 + 10 * doc + POSITIONS.index(position))
    return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0)[:, prompt.shape[1]:]


def position_means(got: list[tuple]) -> list[float]:
    """Mean of each row's second field per question position (``got``: ``(position, kl, ...)``)."""
    by = [[r[1] for r in got if r[0] == pos] for pos in POSITIONS]
    return [sum(x) / len(x) for x in by]
