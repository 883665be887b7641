"""``python -m sglang_loopserve.bench``: the multi-turn benchmark, every method on one server.

Against a running server (``--url``) or one it starts (``--enable-loopserve``
on this machine's device, bounded pool, ``--sleep-on-idle``) for ``--model``
(a key of ``python -m sglang_loopserve.models list`` or a folder; the
benchmark's model is ``qwen2.5-coder-1.5b``, installed by
``make quality-model``); conversations from a folder of published-layout
files (``--data``) or built from the committed snapshot (``--datasets``,
``--n``, ``--seed``, ``--scale``: 1.2 gives ~8K tokens by the last turn, 2.4
~16K).  LoopServe's decode step reads ``--read`` cached positions after a
turn's first re-selection; every decode baseline then reads per turn, on the
mean, what LoopServe read (LoopServe runs first).  Appends to ``<out>/results.jsonl`` (rerun to resume), then writes
``summary.json``, ``table.md`` and PNG plots there.  docs/benchmark.md has the
figures; e.g.::

    python -m sglang_loopserve.bench --model qwen2.5-coder-1.5b --out results/8k --n 2 --scale 1.2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import METHODS
from . import datasets, published, report, runner


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sglang_loopserve.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, summary, table, plots")
    p.add_argument("--url", help="a running LoopServe server (default: start one)")
    p.add_argument("--model", "--model-path", dest="model",
                   help="model for the started server: a key of `python -m sglang_loopserve.models list` or a "
                        "checkpoint folder (default: the embedded SmolLM2); with --url, the served model's folder "
                        "for the report's tokenizer")
    p.add_argument("--data", type=Path, help="folder of <dataset>.jsonl/.json/.parquet in the published layout")
    p.add_argument("--datasets", nargs="+", default=list(datasets.DATASETS), choices=datasets.DATASETS)
    p.add_argument("--positions", nargs="+", default=list(published.POSITIONS),
                   help="front/start, middle, back/end")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--limit", "--n", dest="n", type=int, default=1, help="conversations per data set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="context per turn relative to ~2K/2K/3K tokens")
    p.add_argument("--read", "--budget", dest="read", type=int, default=runner.DEFAULT_READ,
                   help="cached positions LoopServe's decode step reads (its selection plus its query "
                        "blocks); the baselines' budget where LoopServe did not run first (else they read "
                        f"what it read, per turn); default {runner.DEFAULT_READ}")
    p.add_argument("--min-prefill-len", type=int, default=0,
                   help="every method's prefill runs on sequences of at least this many tokens (default 0: "
                        "every forward of a block or more, so short scaled-down turns compare the methods, "
                        "not the server's speed gate; -1: the server's own gate)")
    p.add_argument("--gold-history", action="store_true", help="history with gold answers, not the model's")
    p.add_argument("--export-trace", type=Path,
                   help="also write the conversations as sglang.bench_serving agentic-trace JSON")
    p.add_argument("--report-only", action="store_true", help="only rebuild the table and plots")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--limit/--n must be >= 1")
    try:
        runner.method_settings("loopserve", a.read)
    except ValueError as e:
        p.error(f"--read: {e}")
    if a.min_prefill_len < -1:
        p.error("--min-prefill-len must be >= 0 (or -1 for the server's gate)")
    if not a.scale > 0:
        p.error("--scale must be > 0")
    try:
        a.positions = [published.position_name(x) for x in a.positions]
    except ValueError as e:
        p.error(f"--positions: {e}")
    return a


def conversations(a) -> list[published.Conversation]:
    out = []
    for name in a.datasets:
        if a.data is not None:
            files = [f for ext in (".jsonl", ".json", ".parquet") for f in [a.data / f"{name}{ext}"] if f.exists()]
            if not files:
                raise SystemExit(f"--data {a.data}: no {name}.jsonl/.json/.parquet")
            convs = published.load(files[0], limit=a.n)
            for c in convs:
                c.dataset = name
        else:
            convs = datasets.build(name, a.n, seed=a.seed, scale=a.scale)
        out += convs
    return out


def _tokenizer(model_path):
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_path))
        return lambda text: tok.encode(text, add_special_tokens=False)
    except Exception:  # noqa: BLE001 - agreement falls back to words
        return str.split


def main(argv=None) -> int:
    a = parse_args(argv)
    results = a.out / "results.jsonl"
    convs = conversations(a)
    if a.export_trace:
        a.export_trace.parent.mkdir(parents=True, exist_ok=True)
        a.export_trace.write_text(json.dumps(report.agentic_trace(convs, a.positions[-1])))
    model_path = a.model if a.model is None or Path(a.model).is_dir() else None
    if not a.report_only:
        total = len(convs) * len(a.positions) * len(a.methods)
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="conversation runs", file=sys.stderr)
            progress = bar.update
        except ImportError:  # pragma: no cover - tqdm ships with SGLang
            bar, progress = None, None
        settings = {}
        if a.min_prefill_len >= 0:
            settings["min_prefill_len"] = a.min_prefill_len
        if a.url:
            runner.run(convs, a.positions, a.methods, runner.server_ask(a.url), results, settings=settings,
                       gold_history=a.gold_history, read=a.read, progress=progress)
        else:
            from .. import models
            from ..server import SGLangServer

            model_path = models.resolve_model_path(a.model)
            with SGLangServer(model_path, extra_args=["--enable-loopserve"],
                              log_path=str(a.out / "server.log")) as server:
                runner.run(convs, a.positions, a.methods, runner.server_ask(server.url), results,
                           settings=settings, gold_history=a.gold_history, read=a.read, progress=progress)
        if bar is not None:
            bar.close()
    if model_path is None and a.url and not a.model:
        import requests

        model_path = requests.get(a.url.rstrip("/") + "/get_model_info", timeout=30).json()["model_path"]
    if model_path is None:
        from .. import models

        model_path = models.model_dir(a.model)
    tokenize = _tokenizer(model_path) if model_path else str.split
    summary = report.summarize(runner.load_results(results), tokenize=tokenize)
    summary["model"] = Path(model_path).name if model_path else None
    summary["read"] = a.read
    if a.data is None:
        from . import sources

        summary["snapshot_sha256"] = sources.load().sha256
    for path in report.write(summary, a.out):
        print(path)
    print(report.markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
