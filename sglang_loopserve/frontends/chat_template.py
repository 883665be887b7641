"""The served model's own chat template, as an SGLang frontend ``ChatTemplate``.

SGLang's frontend picks a template by matching the model's *path* against
known names and falls back to ``default`` (``USER:`` / ``ASSISTANT:``) when
nothing matches: a model in a folder with any other name then writes on past
its turn.  The model's own template is a Jinja program in its tokenizer files;
``derive`` renders it on a probe conversation with sentinel contents and reads
each role's prefix and suffix off the text, checking that the template is
prefix-stable (each message appends to the rendering of the ones before) so
that SGLang's role-by-role concatenation reproduces it exactly.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from sglang.lang.chat_template import ChatTemplate, get_chat_template_by_model_path

logger = logging.getLogger(__name__)

#: ``render(messages, add_generation_prompt) -> str``: a chat template applied as text.
Render = Callable[[list, bool], str]

_SYSTEM, _USER, _ASSISTANT, _USER2 = "QXSYSTEMQX", "QXUSERQX", "QXASSISTANTQX", "QXSECONDUSERQX"


class ChatTemplateError(ValueError):
    """The model's template cannot be written as SGLang's role prefixes and suffixes."""


def _split(text: str, sentinel: str, where: str) -> tuple[str, str]:
    if text.count(sentinel) != 1:
        raise ChatTemplateError(f"the template does not render the {where} message's content once")
    before, after = text.split(sentinel)
    return before, after


def derive(render: Render, name: str = "model") -> ChatTemplate:
    """The ``ChatTemplate`` whose concatenation equals ``render`` on system / user / assistant turns."""
    msg = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER},
           {"role": "assistant", "content": _ASSISTANT}, {"role": "user", "content": _USER2}]
    texts = [render(msg[:n], False) for n in (1, 2, 3, 4)]
    for shorter, longer in zip(texts, texts[1:]):
        if not longer.startswith(shorter):
            raise ChatTemplateError("the template rewrites earlier messages when one is added (not prefix-stable)")
    sys_prefix, sys_suffix = _split(texts[0], _SYSTEM, "system")
    user_prefix, user_suffix = _split(texts[1][len(texts[0]):], _USER, "user")
    asst_prefix, asst_suffix = _split(texts[2][len(texts[1]):], _ASSISTANT, "assistant")
    second_prefix, second_suffix = _split(texts[3][len(texts[2]):], _USER2, "second user")
    if (second_prefix, second_suffix) != (user_prefix, user_suffix):
        raise ChatTemplateError("the template frames the second user message differently from the first")
    if render(msg[:2], True) != texts[1] + asst_prefix:
        raise ChatTemplateError("the generation prompt is not the assistant message's prefix")
    stop = asst_suffix.strip()
    return ChatTemplate(
        name=name, default_system_prompt=None,
        role_prefix_and_suffix={"system": (sys_prefix, sys_suffix), "user": (user_prefix, user_suffix),
                                "assistant": (asst_prefix, asst_suffix)},
        stop_str=(stop,) if stop else ())


def tokenizer_render(model_path: str | Path) -> Render:
    """``render`` with the tokenizer's own template (``chat_template.jinja`` / ``tokenizer_config.json``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    if not tok.chat_template:
        raise ChatTemplateError(f"{model_path}: the tokenizer has no chat template")

    def render(messages, add_generation_prompt):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


@functools.lru_cache(maxsize=16)
def for_model(model_path: str | Path) -> ChatTemplate:
    """The model's own template when its folder is readable here and the template is prefix-stable;
    otherwise SGLang's match by path (with a warning: a ``default`` match mis-frames most models)."""
    try:
        if not Path(model_path).is_dir():
            raise ChatTemplateError(f"{model_path} is not a folder on this machine")
        return derive(tokenizer_render(model_path), name=f"own:{Path(model_path).name}")
    except (ChatTemplateError, OSError, ValueError) as exc:
        fallback = get_chat_template_by_model_path(str(model_path))
        logger.warning("chat template of %s: %s; using SGLang's %r by path", model_path, exc, fallback.name)
        return fallback
