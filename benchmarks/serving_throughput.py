"""Throughput under concurrency: SGLang's own ``bench_serving`` against a stock server and a LoopServe
server, one after the other, on multi-turn workloads.

    python benchmarks/serving_throughput.py --out benchmarks/results/serving_throughput

For each server (stock, then ``--enable-loopserve`` at its defaults) and each workload, at each
concurrency (``--concurrency``, default 1 4 8), with the radix cache flushed before each run:

    python -m sglang.benchmark.serving --backend sglang-oai-chat --max-concurrency C ...

Workloads (multi-turn, replayed with the server's own answers in the history):
* ``gsp``: ``--dataset-name generated-shared-prefix --gsp-num-turns 2``: groups of conversations
  sharing a 2.5K-token system prompt, 32 tokens out per turn (``GSP``);
* ``trace``: the paper benchmark's conversations (``sglang_loopserve.bench``, the same as its
  ``--export-trace``) at ``--scale`` 0.3 (about 2.5K tokens each), three turns, 32 tokens out per
  turn, as ``--dataset-name agentic-trace``.

Writes ``raw.jsonl`` (bench_serving's lines, each tagged with server, workload and concurrency),
``table.md`` (output tok/s, TTFT p50/p99, TPOT p50/p99, and LoopServe/stock ratios) and
``throughput.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

SERVERS = {"stock": [], "loopserve": ["--enable-loopserve"]}
#: 2 groups x 4 conversations x 2 turns over a 2.5K-token shared system prompt (sized for a 2-core
#: CPU: stock's 4K-token turns took 8 minutes at concurrency 1).
GSP = ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4",
       "--gsp-system-prompt-len", "2500", "--gsp-question-len", "128", "--gsp-output-len", "32",
       "--gsp-num-turns", "2", "--num-prompts", "8"]
TRACE_DATASETS = ("single_doc_qa", "multi_doc_qa", "multi_hop_2", "passage_retrieval", "kv_retrieval",
                  "variable_tracking", "summarization", "few_shot")
METRICS = (("output_throughput", "output tok/s", 1), ("median_ttft_ms", "TTFT p50 ms", -1),
           ("p99_ttft_ms", "TTFT p99 ms", -1), ("median_tpot_ms", "TPOT p50 ms", -1),
           ("p99_tpot_ms", "TPOT p99 ms", -1))


def export_trace(path: Path, scale: float) -> None:
    """The benchmark's conversations (one per data set, question at the end) as an agentic trace."""
    from sglang_loopserve.bench import datasets, report

    convs = [c for name in TRACE_DATASETS for c in datasets.build(name, 1, seed=0, scale=scale)]
    path.write_text(json.dumps(report.agentic_trace(convs, "back")))


def workloads(trace: Path) -> dict[str, list[str]]:
    return {"gsp": GSP, "trace": ["--dataset-name", "agentic-trace", "--dataset-path", str(trace),
                                  "--sharegpt-output-len", "32", "--num-prompts", str(len(TRACE_DATASETS))]}


def bench(url: str, model_path: str, args: list[str], concurrency: int, out_file: Path) -> dict:
    cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai-chat", "--base-url", url,
           "--model", model_path, "--tokenizer", model_path, "--max-concurrency", str(concurrency),
           "--request-rate", "inf", "--seed", "0", "--disable-tqdm", "--output-file", str(out_file), *args]
    if out_file.exists():
        out_file.unlink()
    # Offline: the model is local (asked of the hub, bench_serving retries for a minute per run).
    subprocess.run(cmd, check=True, timeout=3600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    return json.loads(out_file.read_text().splitlines()[-1])


def run(out: Path, concurrencies, scale: float, pool_tokens: int) -> list[dict]:
    from sglang_loopserve import models
    from sglang_loopserve.cpu_runtime.cpu_info import cpu_kind
    from sglang_loopserve.server import SGLangServer

    out.mkdir(parents=True, exist_ok=True)
    trace = out / "trace.json"
    export_trace(trace, scale)
    model_path = str(models.prepare())
    rows = []
    for server_name, extra in SERVERS.items():  # one after the other: two servers halve each one's speed
        with SGLangServer(model_path, max_total_tokens=pool_tokens, extra_args=extra,
                          log_path=out / f"server-{server_name}.log") as server:
            for workload, args in workloads(trace).items():
                for c in concurrencies:
                    requests.post(server.url + "/flush_cache", timeout=60)
                    t = time.monotonic()
                    line = bench(server.url, model_path, args, c, out / "last.jsonl")
                    row = {"server": server_name, "workload": workload, "concurrency": c, "cpu": cpu_kind(),
                           "wall_s": round(time.monotonic() - t, 1)} | {k: line.get(k) for k in (
                               "completed", "duration", "total_input_tokens", "total_output_tokens",
                               "cache_hit_rate_pct", *[m for m, _, _ in METRICS])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    with open(out / "raw.jsonl", "a") as f:
                        scalars = {k: v for k, v in line.items() if not isinstance(v, (list, dict))}
                        f.write(json.dumps(row | {"bench_serving": scalars}) + "\n")
    (out / "last.jsonl").unlink(missing_ok=True)
    return rows


def table(rows: list[dict]) -> str:
    key = {(r["server"], r["workload"], r["concurrency"]): r for r in rows}
    lines = ["| workload | concurrency | " + " | ".join(f"{label} stock / LoopServe (ratio)" for _, label, _ in METRICS)
             + " |", "|---|---|" + "---|" * len(METRICS)]
    for workload, c in sorted({(r["workload"], r["concurrency"]) for r in rows}):
        stock, ls = key.get(("stock", workload, c)), key.get(("loopserve", workload, c))
        if not stock or not ls:
            continue
        cells = []
        for metric, _, better in METRICS:
            a, b = stock[metric], ls[metric]
            ratio = (b / a if better > 0 else a / b) if a and b else float("nan")
            cells.append(f"{a:.1f} / {b:.1f} ({ratio:.2f}x)")
        lines.append(f"| {workload} | {c} | " + " | ".join(cells) + " |")
    return ("\n".join(lines)
            + "\n\nRatio: LoopServe's gain (output tok/s: LoopServe / stock; times: stock / LoopServe).\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads_ = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(len(workloads_), 2, figsize=(9, 3.2 * len(workloads_)), squeeze=False)
    for i, w in enumerate(workloads_):
        for j, (metric, label) in enumerate((("output_throughput", "output tok/s (higher is better)"),
                                             ("median_ttft_ms", "TTFT p50 ms (lower is better)"))):
            ax = axes[i][j]
            for server, color in (("stock", "tab:gray"), ("loopserve", "tab:blue")):
                pts = sorted((r["concurrency"], r[metric]) for r in rows
                             if r["workload"] == w and r["server"] == server)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=server)
            ax.set_title(f"{w}: {label}", fontsize=9)
            ax.set_xlabel("concurrency")
            ax.set_xticks(sorted({r["concurrency"] for r in rows}))
            ax.legend(fontsize=8)
    fig.suptitle(f"sglang.benchmark.serving, SmolLM2-135M, {rows[0]['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--scale", type=float, default=0.3, help="trace turn length relative to ~2K/2K/3K tokens")
    p.add_argument("--max-total-tokens", type=int, default=32768)
    p.add_argument("--report-only", action="store_true", help="redraw table and plot from raw.jsonl")
    a = p.parse_args(argv)
    if any(c < 1 for c in a.concurrency):
        p.error("--concurrency values must be >= 1")
    if a.report_only:
        rows = [json.loads(line) for line in (a.out / "raw.jsonl").read_text().splitlines()]
    else:
        (a.out / "raw.jsonl").unlink(missing_ok=True)
        rows = run(a.out, a.concurrency, a.scale, a.max_total_tokens)
    (a.out / "table.md").write_text(table(rows))
    plot(rows, a.out / "throughput.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
