"""``LoopServeEndpoint``: SGLang's ``RuntimeEndpoint`` for a LoopServe server.

``sgl.gen`` has no ``custom_params`` argument, so per-request LoopServe
settings ride on the endpoint: every request body it sends gets
``sampling_params.custom_params.loopserve``.  It can also stream each ``gen``
under the hood to time it from the client (time to first token, decode rate),
the same way on a stock server and on a LoopServe one.
"""

from __future__ import annotations

import time

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from ..config import REQUEST_KEY, LoopServeConfig, request_field_name


class LoopServeEndpoint(RuntimeEndpoint):
    """``RuntimeEndpoint`` + per-request LoopServe settings + client-side timing.

    Args:
        loopserve: settings for every request of this endpoint, e.g.
            ``{"alpha": 0.9, "decode_budget": 512}`` or ``{"enabled": False}``;
            ``None`` sends nothing (the server's flags apply).
        timing: stream each generation and add ``meta_info["client"]`` =
            ``{"time_to_first_token_s", "decode_s"}``.
        session_id: sent with every request (SGLang's radix-native sessions: a server with
            ``--enable-session-radix-cache`` evicts other requests' KV before a session's).
    """

    session_id: str | None = None

    def __init__(self, base_url: str, *, loopserve: dict | None = None, timing: bool = False,
                 session_id: str | None = None, **kwargs):
        if loopserve is not None:
            # Same checks as the server (against the default settings): fail
            # before sending anything.
            LoopServeConfig().override(loopserve, request_field_name)
        self.loopserve = dict(loopserve) if loopserve is not None else None
        self.timing = timing
        self.session_id = session_id
        super().__init__(base_url, **kwargs)

    def _add_images(self, s, data):
        # RuntimeEndpoint passes every request body through here just before
        # sending it: the one place to add our settings for gen and select.
        super()._add_images(s, data)
        if self.session_id is not None:
            data["session_id"] = self.session_id
        if self.loopserve is not None and "sampling_params" in data:
            params = data["sampling_params"]
            custom = dict(params.get("custom_params") or {})
            custom[REQUEST_KEY] = dict(self.loopserve)
            params["custom_params"] = custom

    def generate(self, s, sampling_params):
        if not self.timing:
            return super().generate(s, sampling_params)
        start = time.perf_counter()
        first = None
        parts, meta = [], {}
        for text, meta in self.generate_stream(s, sampling_params):
            if first is None:
                first = time.perf_counter()
            parts.append(text)
        end = time.perf_counter()
        meta = dict(meta)
        first = end if first is None else first
        meta["client"] = {"time_to_first_token_s": first - start, "decode_s": end - first}
        return "".join(parts), meta
