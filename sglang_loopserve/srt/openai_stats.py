"""LoopServe's per-request stats on SGLang's OpenAI-compatible endpoints.

``/generate`` carries them in ``meta_info["loopserve"]``. The OpenAI chat and completion
responses carry them in ``sglext.loopserve``: ``SglExt`` is the object SGLang keeps for its own
extensions of OpenAI responses (its docstring asks that future ones be added there, and it already
holds ``cached_tokens_details`` and ``spec_tokens_details``), it sits at response level, and
clients that do not know it ignore it. ``choices[].meta_info`` (``return_meta_info``) is not an
option: SGLang refuses it when streaming and it is opt-in.

* Non-streaming: the built response gets ``sglext.loopserve`` (one summary; a list per choice
  when ``n`` > 1).
* Streaming: one more chunk just before ``data: [DONE]``, with the stream's id, empty
  ``choices`` and ``sglext.loopserve``: the shape of SGLang's own sglext chunk. Its summary is
  the request's last, taken from the tokenizer manager's outputs while the stream runs
  (``StreamStats``).

The ``openai`` client reads it as ``response.sglext["loopserve"]`` (its models keep unknown
fields).
"""

from __future__ import annotations

import threading

from ..config import REQUEST_KEY

STREAM_END = "data: [DONE]\n\n"
_field_added = threading.Event()


def add_sglext_field() -> None:
    """Give SGLang's ``SglExt`` an optional ``loopserve`` field (once per process) and rebuild the
    response models that hold it, so that pydantic serialises the field."""
    if _field_added.is_set():
        return
    from typing import Any, Optional, Union

    from pydantic.fields import FieldInfo
    from sglang.srt.entrypoints.openai import protocol

    protocol.SglExt.model_fields[REQUEST_KEY] = FieldInfo(
        annotation=Optional[Union[dict[str, Any], list[Optional[dict[str, Any]]]]], default=None)
    protocol.SglExt.model_rebuild(force=True)
    for model in (protocol.ChatCompletionResponse, protocol.ChatCompletionStreamResponse,
                  protocol.CompletionResponse, protocol.CompletionStreamResponse):
        model.model_rebuild(force=True)
    _field_added.set()


def _per_request(summaries: list):
    """One summary for one choice; a list (choice order) for several; None when there is none."""
    if not any(s is not None for s in summaries):
        return None
    return summaries[0] if len(summaries) == 1 else summaries


def with_stats(response, ret: list[dict]):
    """``response`` (a chat or completion response SGLang built from ``ret``) with
    ``sglext.loopserve``; anything else (an error response) as it is."""
    stats = _per_request([(item.get("meta_info") or {}).get(REQUEST_KEY) for item in ret])
    if stats is None or not hasattr(response, "sglext"):
        return response
    add_sglext_field()
    from sglang.srt.entrypoints.openai.protocol import SglExt

    base = response.sglext.model_dump() if response.sglext is not None else {}
    response.sglext = SglExt(**base, **{REQUEST_KEY: stats})
    return response


class StreamStats:
    """The latest LoopServe summary of each choice of one streamed request.

    The streaming generator SGLang runs never sees ``meta_info``; the tokenizer manager's
    ``generate_request`` does, so the stream hangs this on its request and that generator's hook
    (``record_outputs``) fills it. It lives and dies with the request object."""

    ATTR = "_loopserve_stream_stats"

    def __init__(self):
        self.latest: dict[int, dict] = {}  # choice index -> summary

    def record(self, out) -> None:
        for item in out if isinstance(out, list) else [out]:
            summary = (item.get("meta_info") or {}).get(REQUEST_KEY) if isinstance(item, dict) else None
            if summary is not None:
                self.latest[int(item.get("index") or 0)] = summary

    def per_request(self):
        return _per_request([self.latest[i] for i in sorted(self.latest)])


async def record_outputs(outputs, sink: StreamStats):
    """``outputs`` (``generate_request``'s) passed on unchanged, their summaries kept in ``sink``."""
    async for out in outputs:
        sink.record(out)
        yield out


def stream_sink(adapted_request) -> StreamStats | None:
    return getattr(adapted_request, StreamStats.ATTR, None)


async def stream_with_stats(chunks, adapted_request, request, chunk_model):
    """``chunks`` (SGLang's SSE stream for ``adapted_request``) with a ``sglext.loopserve`` chunk
    before ``data: [DONE]``."""
    sink = StreamStats()
    setattr(adapted_request, StreamStats.ATTR, sink)
    last_id = None
    async for chunk in chunks:
        if chunk == STREAM_END:
            stats = sink.per_request()
            if stats is not None and last_id is not None:
                add_sglext_field()
                from sglang.srt.entrypoints.openai.protocol import SglExt

                tail = chunk_model(id=last_id, model=request.model, choices=[],
                                   sglext=SglExt(**{REQUEST_KEY: stats}))
                yield f"data: {tail.model_dump_json()}\n\n"
        elif last_id is None and chunk.startswith("data: {"):
            last_id = _chunk_id(chunk)
        yield chunk


def _chunk_id(chunk: str) -> str | None:
    """The response id of an SSE data chunk (every chunk of a stream carries the same one)."""
    import json

    try:
        return json.loads(chunk[len("data: "):]).get("id")
    except ValueError:
        return None
