"""Run the multi-turn benchmark against a server: every method on the same conversations.

A conversation is run once per (question position, method): each turn is one
chat request (SGLang's frontend with the model's chat template, the
LoopServe settings in ``custom_params``) whose history holds the earlier turns'
prompts and the model's own answers (``gold_history``: the gold answers), so
the radix cache serves the history and only the new turn is prefilled.  Per
turn the record keeps the answer and its score, prompt and cached tokens,
client-side time to first token and decode rate, and LoopServe's prefill
density and decode KV read (``meta_info["loopserve"]``).

Results go to a JSONL file, one line per finished (conversation, position,
method); a rerun skips what the file already holds (resumable: an interrupted
conversation is redone whole).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import METHODS, PREFILL_PATTERNS, LoopServeConfig
from . import metrics
from .datasets import answer_tokens, first_line_only
from .published import Conversation, position_name

SYSTEM_PROMPT = "You are a helpful assistant. Answer from the documents in the conversation, briefly."


@dataclass
class TurnRecord:
    answer: str
    score: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None
    decode_tokens_per_s: float | None
    prefill_density: float | None
    decode_tokens_attended: float | None
    decode_tokens_cached: float | None


@dataclass
class RunRecord:
    dataset: str
    id: str
    position: str
    method: str
    turns: list[TurnRecord] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.dataset, self.id, self.position, self.method)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "RunRecord":
        return cls(d["dataset"], d["id"], d["position"], d["method"], [TurnRecord(**t) for t in d["turns"]])


def load_results(path) -> list[RunRecord]:
    """The records of a results file; a torn last line (an interrupted write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(RunRecord.from_dict(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return out


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line an interrupted run left unfinished, so appends start on a line of their own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


#: Positions of a key block that LoopServe's decode step adds to its selection
#: (``cache_policy.summaries.KeySummaries.block``).
QUERY_BLOCK_TOKENS = 8
_DEFAULTS = LoopServeConfig()
#: The least budget the server takes (sink + recent).
_BUDGET_FLOOR = _DEFAULTS.sink + _DEFAULTS.recent
#: What every compressing method's decode step reads by default: LoopServe's own defaults
#: (a 512-position selection plus 144 query blocks of 8: 1664).
DEFAULT_READ = _DEFAULTS.decode_budget + _DEFAULTS.decode_query_blocks * QUERY_BLOCK_TOKENS


def method_settings(method: str, read: int, query_blocks: int | None = None) -> dict:
    """Per-request settings under which every compressing method reads ``read`` cached positions per
    decode step: LoopServe's selection plus its query blocks (``query_blocks`` x 8 positions, the
    server's default when ``None``), a baseline's whole budget (matched per turn to LoopServe's
    measured read where it ran first: ``matched_decode_budget``).  ``full`` reads everything; the
    prefill patterns decode exactly (their prefill is matched per turn: ``matched_prefill_keys``)."""
    blocks = _DEFAULTS.decode_query_blocks if query_blocks is None else query_blocks
    if method == "full":
        return {"method": method}
    if method == "loopserve":
        budget = read - blocks * QUERY_BLOCK_TOKENS
        if budget < _BUDGET_FLOOR:
            raise ValueError(f"read must be >= {_BUDGET_FLOOR + blocks * QUERY_BLOCK_TOKENS} so LoopServe's "
                             f"selection keeps its sink + recent beside {blocks} query blocks, got {read}")
        return {"method": method, "decode_budget": budget, "decode_query_blocks": blocks}
    return {"method": method, "decode_budget": read}


def matched_prefill_keys(reference: TurnRecord) -> int | None:
    """Keys per query under which a static prefill pattern computes the share of a turn's causal
    pairs that LoopServe computed on it (``reference``: LoopServe's record of the same turn), or
    ``None`` when that turn has no measured density."""
    if reference.prefill_density is None:
        return None
    new = reference.prompt_tokens - reference.cached_tokens
    if new < 1:
        return None
    pairs = new * reference.cached_tokens + new * (new + 1) / 2  # causal pairs of the new rows
    return max(_BUDGET_FLOOR, round(reference.prefill_density * pairs / new))


def matched_decode_budget(reference: TurnRecord) -> int | None:
    """The budget under which a decode baseline reads per step, on the mean over the turn's answer,
    what LoopServe read on it (``reference``: LoopServe's record of the same turn), or ``None`` when
    that turn has no measured read.  LoopServe's read is not its budget alone: a long turn's first
    ``decode_first_interval`` tokens read every cached token (``decode_seed`` auto), so over a
    10-token answer it reads up to 1.5x its selection.  A baseline's step reads its budget plus the
    tokens generated so far in the turn, ``(n + 1) / 2`` on the mean over ``n`` (measured: SnapKV at
    budget 1200 read 1208.5 over 16-token answers)."""
    if reference.decode_tokens_attended is None:
        return None
    generated = (reference.completion_tokens + 1) / 2
    return max(_BUDGET_FLOOR, round(reference.decode_tokens_attended - generated))


#: The methods that compress the decode with a budget of their own (LoopServe aside).
DECODE_BASELINES = tuple(m for m in METHODS if m not in ("full", "loopserve") and m not in PREFILL_PATTERNS)


#: ``ask(history, message, max_tokens, settings) -> dict`` with the TurnRecord fields but the score:
#: one chat request; ``history`` is ``[(user, assistant), ...]``.
Ask = Callable[..., dict]  # (history, message, max_tokens, settings[, session_id]) -> record


def run_conversation(conv: Conversation, position: str, method: str, ask: Ask, *, settings: dict,
                     gold_history: bool = False, read: int = DEFAULT_READ,
                     reference: RunRecord | None = None) -> RunRecord:
    """One conversation at one question position under ``method``.  With ``reference`` (LoopServe's
    record of the same conversation and position), each turn is matched to LoopServe's: a static
    prefill pattern keeps as many keys per query as computes LoopServe's share of the turn's pairs
    (equal prefill compute), a decode baseline's budget reads what LoopServe read (equal reads)."""
    rec = RunRecord(conv.dataset, conv.id, position, method)
    history: list[tuple[str, str]] = []
    max_tokens = answer_tokens(conv.dataset, conv.metric)
    cut = first_line_only(conv.dataset)
    for turn in conv.turns:
        message = turn.prompt(position)
        turn_settings = dict(settings, **method_settings(method, read))
        same_turn = reference.turns[len(rec.turns)] if reference and len(reference.turns) > len(rec.turns) else None
        if same_turn is not None and method in PREFILL_PATTERNS + DECODE_BASELINES:
            match = matched_prefill_keys if method in PREFILL_PATTERNS else matched_decode_budget
            budget = match(same_turn)
            if budget is not None:
                turn_settings["decode_budget"] = budget
        got = ask(history, message, max_tokens, turn_settings)
        answer = got["answer"]
        score = metrics.score(conv.metric or "qa_f1", answer, turn.answers, all_classes=conv.all_classes,
                              first_line_only=cut) if turn.answers else 0.0
        rec.turns.append(TurnRecord(score=score, **got))
        history.append((message, turn.answers[0] if gold_history and turn.answers else answer))
    return rec


def run(conversations: Iterable[Conversation], positions: Iterable[str], methods: Iterable[str], ask: Ask,
        results_path, *, settings: dict | None = None, gold_history: bool = False, read: int = DEFAULT_READ,
        progress: Callable[[int], None] | None = None) -> list[RunRecord]:
    """Every (conversation, position, method) not yet in ``results_path``, appended as it finishes."""
    results_path = Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(results_path)
    records = {r.key: r for r in load_results(results_path)}
    done = set(records)
    positions = [position_name(p) for p in positions]
    # LoopServe first: the prefill patterns match its measured compute per turn.
    methods = sorted(methods, key=lambda m: m != "loopserve")
    new = []
    with results_path.open("a", encoding="utf-8") as out:
        for conv in conversations:
            for pos in positions:
                for method in methods:
                    if (conv.dataset, conv.id, pos, method) in done:
                        if progress:
                            progress(1)
                        continue
                    rec = run_conversation(conv, pos, method, ask, settings=settings or {},
                                           gold_history=gold_history, read=read,
                                           reference=records.get((conv.dataset, conv.id, pos, "loopserve")))
                    records[rec.key] = rec
                    out.write(rec.to_json() + "\n")
                    out.flush()
                    new.append(rec)
                    if progress:
                        progress(1)
    return new


def server_ask(url: str) -> Ask:
    """``ask`` through SGLang's frontend (the model's chat template, streamed for timing)."""
    import sglang as sgl

    from ..frontends.multiturn import connect

    @sgl.function
    def turn(s, history, message, max_tokens):
        s += sgl.system(SYSTEM_PROMPT)
        for user, assistant in history:
            s += sgl.user(user)
            s += sgl.assistant(assistant)
        s += sgl.user(message)
        s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=0.0))

    endpoints: dict[str, object] = {}

    def ask(history, message, max_tokens, settings, session_id=None):
        key = json.dumps([settings, session_id], sort_keys=True)
        if key not in endpoints:
            endpoints[key] = connect(url, loopserve=settings, timing=True, session_id=session_id)
        state = turn.run(history=history, message=message, max_tokens=max_tokens, backend=endpoints[key])
        if state.error() is not None:
            raise RuntimeError(f"request failed: {state.error()}")
        meta = state.get_meta_info("answer")
        client, ls = meta.get("client") or {}, meta.get("loopserve") or {}
        decode_s, n = client.get("decode_s"), meta["completion_tokens"]
        return {
            "answer": state["answer"].strip(), "prompt_tokens": meta["prompt_tokens"],
            "cached_tokens": meta.get("cached_tokens", 0), "completion_tokens": n,
            "time_to_first_token_s": client.get("time_to_first_token_s"),
            "decode_tokens_per_s": (n - 1) / decode_s if decode_s and n > 1 else None,
            "prefill_density": ls.get("prefill_density"),
            "decode_tokens_attended": ls.get("decode_tokens_attended"),
            "decode_tokens_cached": ls.get("decode_tokens_cached"),
        }

    return ask
