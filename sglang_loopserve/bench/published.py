"""The published layout of LoopServe's multi-turn benchmark, read and written.

A row holds a list ``multi_turn``; each turn holds, per question position,
``prompt_<pos>`` and ``question_at_<pos>`` (``pos``: ``front``, ``middle``,
``back``; the question is part of the prompt at that place, for ``back`` an
exact suffix of it), and its gold ``answers``.  Only ``back`` is confirmed by
a public loader; the loader here therefore discovers the positions a file has
(any ``prompt_X`` with a ``question_at_X``) and fails naming the keys it found
when a turn has none.  Files: JSON (a list of rows, or ``{"data": [...]}``),
JSONL, or parquet.  Our generator writes the same layout plus ``dataset``,
``id``, ``metric`` and ``all_classes``, which the loader keeps when present.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Question positions, in the published names; the benchmark's flags also take start/end.
POSITIONS = ("front", "middle", "back")
_ALIASES = {"start": "front", "beginning": "front", "begin": "front", "end": "back"}
_PROMPT_KEY = re.compile(r"^prompt_(\w+)$")


def position_name(name: str) -> str:
    """``front``/``middle``/``back`` (or an alias: start, begin, end)."""
    pos = _ALIASES.get(name, name)
    if pos not in POSITIONS:
        raise ValueError(f"question position must be one of {POSITIONS} (or start/end), got {name!r}")
    return pos


@dataclass
class Turn:
    prompts: dict[str, str]  # position -> the turn's prompt with the question there
    questions: dict[str, str]  # position -> the question
    answers: list[str]

    def prompt(self, position: str) -> str:
        pos = position_name(position)
        if pos not in self.prompts:
            raise KeyError(f"this turn has no {pos!r} position (it has {sorted(self.prompts)})")
        return self.prompts[pos]

    def to_dict(self) -> dict:
        out: dict = {}
        for pos in self.prompts:
            out[f"prompt_{pos}"] = self.prompts[pos]
            out[f"question_at_{pos}"] = self.questions[pos]
        out["answers"] = list(self.answers)
        return out


@dataclass
class Conversation:
    turns: list[Turn]
    dataset: str = "unknown"
    id: str = ""
    metric: str | None = None  # None: the loader's caller decides (the real set does not say)
    all_classes: list[str] = field(default_factory=list)

    @property
    def positions(self) -> list[str]:
        """The positions every turn has."""
        common = set(POSITIONS)
        for t in self.turns:
            common &= set(t.prompts)
        return [p for p in POSITIONS if p in common]

    def to_row(self) -> dict:
        row = {"id": self.id, "dataset": self.dataset, "multi_turn": [t.to_dict() for t in self.turns]}
        if self.metric is not None:
            row["metric"] = self.metric
        if self.all_classes:
            row["all_classes"] = list(self.all_classes)
        return row


def check_question_placement(turn: Turn, where: str = "turn") -> None:
    """The layout's invariant: each question sits in its prompt where its position says (``back``:
    an exact suffix; ``front``: a prefix; ``middle``: neither, strictly inside)."""
    for pos, prompt in turn.prompts.items():
        q = turn.questions[pos]
        if not q:
            raise ValueError(f"{where}: question_at_{pos} is empty")
        if pos == "back" and not prompt.endswith(q):
            raise ValueError(f"{where}: question_at_back is not a suffix of prompt_back")
        if pos == "front" and not prompt.startswith(q):
            raise ValueError(f"{where}: question_at_front is not a prefix of prompt_front")
        if pos == "middle":
            at = prompt.find(q)
            if at <= 0 or at + len(q) >= len(prompt):
                raise ValueError(f"{where}: question_at_middle is not strictly inside prompt_middle")


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value]  # list, tuple, numpy array (parquet)


def _turn_from(record: dict, row_answers, index: int, where: str) -> Turn:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a turn must be an object, got {type(record).__name__}")
    prompts, questions = {}, {}
    for key, value in record.items():
        m = _PROMPT_KEY.match(key)
        if m and f"question_at_{m.group(1)}" in record:
            pos = m.group(1)
            prompts[pos], questions[pos] = str(value), str(record[f"question_at_{pos}"])
    if not prompts:
        raise ValueError(f"{where}: no question-position fields (prompt_<pos> with question_at_<pos>); "
                         f"keys found: {sorted(record)}")
    answers = _as_list(record.get("answers", record.get("answer")))
    if not answers and row_answers is not None:
        per_turn = _as_list(row_answers)
        if per_turn and not isinstance(per_turn[0], str) and len(per_turn) > index:
            answers = _as_list(per_turn[index])  # one list of answers per turn
        elif per_turn and isinstance(per_turn[0], str) and index == 0:
            answers = per_turn
    return Turn(prompts, questions, [str(a) for a in answers])


def conversation_from_row(row: dict, where: str = "row") -> Conversation:
    if not isinstance(row, dict) or "multi_turn" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: no 'multi_turn' list; keys found: {keys}")
    turns = [_turn_from(t, row.get("answers"), i, f"{where}, turn {i}")
             for i, t in enumerate(_as_list(row["multi_turn"]))]
    if not turns:
        raise ValueError(f"{where}: 'multi_turn' is empty")
    for i, t in enumerate(turns):
        check_question_placement(t, f"{where}, turn {i}")
    return Conversation(turns, dataset=str(row.get("dataset", "unknown")), id=str(row.get("id", "")),
                        metric=row.get("metric"), all_classes=[str(c) for c in _as_list(row.get("all_classes"))])


def _rows(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            for key in ("data", "rows", "train"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise ValueError(f"{path}: a JSON object without a list of rows; keys found: {sorted(data)}")
        return data
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    raise ValueError(f"{path}: unknown file type {suffix!r} (use .json, .jsonl or .parquet)")


def load(path, limit: int | None = None) -> list[Conversation]:
    """Conversations of a file in the published layout (real data set or ours)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data set at {path}")
    rows = _rows(path)
    if limit is not None:
        rows = rows[:limit]
    out = []
    for r, row in enumerate(rows):
        if isinstance(row, dict):
            row = {k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in row.items()}
        out.append(conversation_from_row(row, f"{path.name}, row {r}"))
    return out


def write(conversations: list[Conversation], path) -> Path:
    """Write ``conversations`` in the published layout (.jsonl: one row per line; .json: a list)."""
    path = Path(path)
    rows = [c.to_row() for c in conversations]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        raise ValueError(f"{path}: write .json or .jsonl")
    return path
