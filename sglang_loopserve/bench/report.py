"""Tables and plots of a results file: score per data set x position x method, agreement with
``full``, speed per turn."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from statistics import mean

from . import metrics
from .published import POSITIONS
from .runner import RunRecord


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return mean(xs) if xs else None


def summarize(records: list[RunRecord], tokenize: Callable[[str], list] = str.split) -> dict:
    """Scores (LongBench's ``round(100 * mean, 2)`` over turns), agreement with ``full`` (share of
    turns with the same greedy answer; mean index of the first differing token where they differ)
    and per-turn speed, per method."""
    scores = defaultdict(list)  # (dataset, position, method) -> turn scores
    for r in records:
        scores[(r.dataset, r.position, r.method)] += [t.score for t in r.turns]
    table = {f"{d}|{p}|{m}": metrics.dataset_score(s) for (d, p, m), s in scores.items()}
    methods = sorted({r.method for r in records}, key=lambda m: (m != "full", m != "loopserve", m))
    datasets = sorted({r.dataset for r in records})
    positions = [p for p in POSITIONS if any(r.position == p for r in records)]
    per_position = {m: {p: _mean([table.get(f"{d}|{p}|{m}") for d in datasets]) for p in positions}
                    for m in methods}
    full = {(r.dataset, r.id, r.position): r for r in records if r.method == "full"}
    agreement = {}
    for m in methods:
        same, first = defaultdict(list), defaultdict(list)
        for r in records:
            ref = full.get((r.dataset, r.id, r.position))
            if r.method != m or ref is None:
                continue
            for t, t_ref in zip(r.turns, ref.turns):
                equal, at = metrics.agreement(tokenize(t_ref.answer), tokenize(t.answer))
                same[r.position].append(float(equal))
                if at is not None:
                    first[r.position].append(at)
        agreement[m] = {p: {"same": _mean(same[p]), "first_difference": _mean(first[p])} for p in positions}
    speed = {}
    for m in methods:
        rows = [r for r in records if r.method == m]
        n_turns = max((len(r.turns) for r in rows), default=0)
        speed[m] = [{
            "turn": i + 1,
            "prompt_tokens": _mean([r.turns[i].prompt_tokens for r in rows if len(r.turns) > i]),
            "cached_tokens": _mean([r.turns[i].cached_tokens for r in rows if len(r.turns) > i]),
            "ttft_s": _mean([r.turns[i].time_to_first_token_s for r in rows if len(r.turns) > i]),
            "decode_tok_s": _mean([r.turns[i].decode_tokens_per_s for r in rows if len(r.turns) > i]),
            "prefill_density": _mean([r.turns[i].prefill_density for r in rows if len(r.turns) > i]),
            "kv_read": _mean([t.decode_tokens_attended / t.decode_tokens_cached for r in rows
                              if len(r.turns) > i for t in [r.turns[i]]
                              if t.decode_tokens_attended is not None and t.decode_tokens_cached]),
        } for i in range(n_turns)]
    cost = {}
    for m in methods:
        turns = [t for r in records if r.method == m for t in r.turns]
        cost[m] = {
            "decode_positions_read": _mean([t.decode_tokens_attended for t in turns]),
            "decode_positions_cached": _mean([t.decode_tokens_cached for t in turns]),
            "kv_read": _mean([t.decode_tokens_attended / t.decode_tokens_cached for t in turns
                              if t.decode_tokens_attended is not None and t.decode_tokens_cached]),
            "prefill_density": _mean([t.prefill_density for t in turns]),
        }
    return {"datasets": datasets, "positions": positions, "methods": methods, "scores": table,
            "mean_per_position": per_position, "agreement_with_full": agreement, "speed_per_turn": speed,
            "read_and_computed": cost, "runs": len(records)}


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    ms, ps = summary["methods"], summary["positions"]
    head = "| data set | position | " + " | ".join(ms) + " |\n|---|---|" + "---|" * len(ms) + "\n"
    rows = []
    for d in summary["datasets"]:
        for p in ps:
            rows.append(f"| {d} | {p} | " + " | ".join(_fmt(summary["scores"].get(f"{d}|{p}|{m}")) for m in ms)
                        + " |")
    for p in ps:
        rows.append(f"| **mean** | {p} | " + " | ".join(_fmt(summary["mean_per_position"][m][p]) for m in ms)
                    + " |")
    agree = ["", "Agreement with `full` (same greedy answer, share of turns; mean first differing token):", "",
             "| method | " + " | ".join(ps) + " |", "|---|" + "---|" * len(ps)]
    for m in ms:
        a = summary["agreement_with_full"][m]
        agree.append(f"| {m} | " + " | ".join(f"{_fmt(a[p]['same'], '.2f')} ({_fmt(a[p]['first_difference'])})"
                                              for p in ps) + " |")
    speed = ["", "Speed per turn (mean over runs): TTFT s / decode tok/s / prefill density / KV read:", "",
             "| method | " + " | ".join(f"turn {t['turn']}" for t in summary["speed_per_turn"][ms[0]]) + " |",
             "|---|" + "---|" * len(summary["speed_per_turn"][ms[0]])] if ms else []
    for m in ms:
        speed.append(f"| {m} | " + " | ".join(
            f"{_fmt(t['ttft_s'], '.2f')} / {_fmt(t['decode_tok_s'])} / {_fmt(t['prefill_density'], '.2f')} / "
            f"{_fmt(t['kv_read'], '.2f')}" for t in summary["speed_per_turn"][m]) + " |")
    cost = ["", "What each method read and computed (mean over turns): decode positions read per step and KV "
            "head / cached; share of the cache read; prefill pairs computed / causal pairs:", "",
            "| method | read / cached | KV read | prefill pairs |", "|---|---|---|---|"]
    for m in ms:
        c = summary.get("read_and_computed", {}).get(m)
        if c:
            read = f"{_fmt(c['decode_positions_read'], '.0f')} / {_fmt(c['decode_positions_cached'], '.0f')}"
            cost.append(f"| {m} | {read} | {_fmt(c['kv_read'], '.2f')} | {_fmt(c['prefill_density'], '.2f')} |")
    return head + "\n".join(rows) + "\n" + "\n".join(agree + speed + cost) + "\n"


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(summary: dict, out_dir) -> list[Path]:
    """Score by position per method, and time to first token / decode rate per turn (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install 'sglang-loopserve[bench]')")
        return []
    out_dir = Path(out_dir)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in summary["methods"]:
        ys = [summary["mean_per_position"][m][p] for p in summary["positions"]]
        ax.plot(summary["positions"], [y if y is not None else float("nan") for y in ys], marker="o", label=m)
    ax.set_xlabel("question position")
    ax.set_ylabel("mean score over data sets")
    ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "score_by_position.png"))
    against = [m for m in ("snapkv", "adakv") if m in summary["methods"]]
    if "loopserve" in summary["methods"] and against:
        fig, ax = plt.subplots(figsize=(6, 4))
        ls = summary["mean_per_position"]["loopserve"]
        for m in against:
            other = summary["mean_per_position"][m]
            ys = [ls[p] - other[p] if ls[p] is not None and other[p] is not None else float("nan")
                  for p in summary["positions"]]
            ax.bar([i + 0.4 * against.index(m) for i in range(len(ys))], ys, width=0.4, label=f"loopserve - {m}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.2 * (len(against) - 1) for i in range(len(summary["positions"]))], summary["positions"])
        ax.set_xlabel("question position")
        ax.set_ylabel("score difference (points)")
        ax.legend(fontsize=7)
        paths.append(_save(plt, fig, out_dir / "loopserve_minus_window_methods.png"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for m in summary["methods"]:
        turns = summary["speed_per_turn"][m]
        xs = [t["turn"] for t in turns]
        axes[0].plot(xs, [t["ttft_s"] or float("nan") for t in turns], marker="o", label=m)
        axes[1].plot(xs, [t["decode_tok_s"] or float("nan") for t in turns], marker="o", label=m)
    axes[0].set_title("time to first token (s)")
    axes[1].set_title("decode tokens/s")
    for ax in axes:
        ax.set_xlabel("turn")
    axes[1].legend(fontsize=7)
    paths.append(_save(plt, fig, out_dir / "speed_per_turn.png"))
    return paths


def write(summary: dict, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "table.md").write_text(markdown(summary))
    return [out_dir / "summary.json", out_dir / "table.md"] + plots(summary, out_dir)


def agentic_trace(conversations, position: str = "back") -> dict:
    """The conversations in the ``agentic-trace`` JSON that ``sglang.bench_serving --backend
    sglang-oai-chat --dataset-name agentic-trace --dataset-path FILE`` replays: per turn only the new
    messages (the system prompt, then the user's); the server's answers become the history."""
    from .runner import SYSTEM_PROMPT

    out = []
    for conv in conversations:
        turns = [{"messages": [{"role": "user", "content": t.prompt(position)}]} for t in conv.turns]
        turns[0]["messages"].insert(0, {"role": "system", "content": SYSTEM_PROMPT})
        out.append(turns)
    return {"metadata": {"source": "sglang-loopserve bench", "position": position}, "conversations": out}
