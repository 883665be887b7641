"""Decode fidelity per token: LoopServe settings against stock attention, by SGLang's KL measure.

For each setting, document, question position and seed, against one server
(``--enable-loopserve``; a request with ``{"enabled": false}`` runs stock
attention, bit-identical to a stock server):

1. cache flushed, the conversation's first turn sent (it is then a radix hit);
2. the full prompt (first turn + a second turn: the rest of the document with
   the question at its ``start``, ``middle`` or ``end``) sampled at
   temperature 1 for ``--tokens`` tokens with the setting;
3. cache flushed, prompt + sampled tokens replayed as one exact prefill on
   stock attention;
4. per token, SGLang's KL estimate (``sglang.test.kl_test_utils``'s
   ``compare_kl_divergence``): ``exp(r) - 1 - r``, ``r`` = replayed minus
   sampled log-probability.

The ``floor`` row samples on stock too: what sampling and replaying alone
differ by.  Each row also gives, from ``meta_info``, the share of cached
tokens decode read and the share of causal pairs the prefill computed.  A
PNG shows the mean KL per decode step (is it the first ``interval`` steps,
before the first re-selection, or later ones?).

    python benchmarks/kl_fidelity.py [--settings floor defaults ...] [--docs 3] [--seeds 2] [--tokens 64]

LoopServe rows run with ``min_prefill_len 0`` (the sparse prefill also below
the CPU's length gate) unless a setting says otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sglang_loopserve import models  # noqa: E402
from sglang_loopserve.frontends.documents import module_doc  # noqa: E402
from sglang_loopserve.server import SGLangServer  # noqa: E402

STOCK = {"enabled": False}
SPARSE = {"min_prefill_len": 0}
#: name -> the ``custom_params.loopserve`` of the sampling request (``None``: stock).
SETTINGS = {
    "floor": STOCK,
    "defaults": SPARSE,
    "sparse prefill only": {**SPARSE, "decode_budget": 100000},
    "decode only": {"alpha": 1.0},
    "interval 1": {**SPARSE, "decode_interval": 1},
}
#: Three documents of real text (Python's docs), different modules each.
DOCUMENTS = (("textwrap", "heapq", "bisect"), ("json", "shlex", "queue"), ("fractions", "string", "calendar"))
QUESTION = "Question: which function of these modules would you use to {task}, and how is it called?"
TASKS = ("wrap a long paragraph to a given width", "parse a JSON string into Python objects",
         "reduce a fraction to lowest terms")
POSITIONS = ("start", "middle", "end")
#: A floor below this is rounding (fp32); a multiple of it means nothing.
FLOOR_EPSILON = 1e-6


def conversation(tokenizer, doc_index: int, position: str, total_tokens: int, first_share: float = 0.45):
    """``(first_turn_ids, prompt_ids)``: a two-turn chat over one document, about ``total_tokens``
    long; the first turn (``first_share`` of it) is cached before the prompt is sent."""
    text = "\n\n".join(module_doc(m) for m in DOCUMENTS[doc_index % len(DOCUMENTS)])
    ids = tokenizer.encode(text, add_special_tokens=False)[: int(total_tokens * 0.97)]
    cut = int(len(ids) * first_share)
    part1, part2 = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
    paragraphs = part2.split("\n\n")
    question = QUESTION.format(task=TASKS[doc_index % len(TASKS)])
    # The middle: the paragraph boundary nearest half the text (paragraphs differ in length).
    ends = list(itertools.accumulate(len(x) + 2 for x in paragraphs))
    middle = min(range(len(paragraphs)), key=lambda i: abs(ends[i] - len(part2) / 2)) + 1
    at = {"start": 0, "middle": middle, "end": len(paragraphs)}[position]
    part2 = "\n\n".join(paragraphs[:at] + [question] + paragraphs[at:])
    first = [{"role": "user", "content": "Read this documentation.\n\n" + part1},
             {"role": "assistant", "content": "I have read it. What would you like to know?"}]
    prompt = first + [{"role": "user", "content": "Here is the rest of it.\n\n" + part2}]
    first_ids = tokenizer.encode(tokenizer.apply_chat_template(first, tokenize=False), add_special_tokens=False)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False)
    assert prompt_ids[:len(first_ids)] == first_ids, "the first turn must be a prefix of the prompt"
    return list(first_ids), list(prompt_ids)


def per_token_kl(sampled: list[float], replayed: list[float]) -> list[float]:
    """SGLang's estimate per token: ``exp(r) - 1 - r`` with ``r = replayed - sampled``."""
    if len(sampled) != len(replayed):
        raise ValueError(f"sampled ({len(sampled)}) and replayed ({len(replayed)}) log-probs differ in length")
    return [math.exp(b - a) - 1 - (b - a) for a, b in zip(sampled, replayed)]


class Client:
    def __init__(self, url: str):
        self.url = url

    def post(self, body: dict) -> dict:
        r = requests.post(self.url + "/generate", json=body, timeout=1800)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def flush(self, tries: int = 50) -> None:
        """Flush the radix cache; SGLang refuses (400) while a request just answered is still
        being released, so retry briefly."""
        for _ in range(tries):
            r = requests.post(self.url + "/flush_cache", timeout=120)
            if r.status_code != 400:
                r.raise_for_status()
                return
            time.sleep(0.2)
        r.raise_for_status()

    def measure(self, first_ids, prompt_ids, settings, *, tokens: int, seed: int) -> dict:
        """One sample + replay: per-token KL and the sampling request's LoopServe figures."""
        self.flush()
        self.post({"input_ids": first_ids, "sampling_params": {
            "max_new_tokens": 1, "temperature": 0, "custom_params": {"loopserve": settings}}})
        out = self.post({"input_ids": prompt_ids, "return_logprob": True, "sampling_params": {
            "temperature": 1.0, "max_new_tokens": tokens, "ignore_eos": True, "sampling_seed": seed,
            "custom_params": {"loopserve": settings}}})
        sampled = [x[0] for x in out["meta_info"]["output_token_logprobs"]]
        self.flush()
        replay = self.post({"input_ids": prompt_ids + out["output_ids"], "return_logprob": True,
                            "logprob_start_len": len(prompt_ids) - 1, "sampling_params": {
                                "max_new_tokens": 0, "custom_params": {"loopserve": STOCK}}})
        replayed = [x[0] for x in replay["meta_info"]["input_token_logprobs"]][-len(sampled):]
        meta = out["meta_info"].get("loopserve") or {}
        cached, attended = meta.get("decode_tokens_cached"), meta.get("decode_tokens_attended")
        return {"kl": per_token_kl(sampled, replayed),
                "cached_tokens": out["meta_info"].get("cached_tokens"),
                "decode_read": attended / cached if attended is not None and cached else 1.0,
                "prefill_density": meta.get("prefill_density") or 1.0,
                "reselections": meta.get("reselections") or 0,
                "seeded_from": meta.get("seeded_from")}


def summarise(rows: list[dict], settings: list[str]) -> str:
    """Markdown table: mean KL per position (and as a multiple of the floor), what was read."""
    def cell(name, pos, key):
        vals = [v for r in rows if r["setting"] == name and r["position"] == pos for v in
                (r["kl"] if key == "kl" else [r[key]])]
        return statistics.fmean(vals) if vals else float("nan")

    positions = [p for p in POSITIONS if any(r["position"] == p for r in rows)]  # those run (--positions)
    floor = {p: cell("floor", p, "kl") for p in positions}
    lines = ["| setting | " + " | ".join(f"KL {p} (x floor)" for p in positions)
             + " | decode read / cached | prefill pairs computed | re-selections |",
             "|---|" + "---|" * (len(positions) + 3)]
    for name in settings:
        kls = []
        for p in positions:
            v = cell(name, p, "kl")
            # An fp32 server's floor is ~0 (extend and decode agree to rounding): no ratio then.
            ratio = f"{v / floor[p]:.1f}x" if floor[p] > FLOOR_EPSILON else "floor ~0"
            kls.append(f"{v:.4f} ({ratio})")
        read = statistics.fmean(cell(name, p, "decode_read") for p in positions)
        dens = statistics.fmean(cell(name, p, "prefill_density") for p in positions)
        res = statistics.fmean(cell(name, p, "reselections") for p in positions)
        lines.append(f"| {name} | " + " | ".join(kls) + f" | {read:.2f} | {dens:.2f} | {res:.1f} |")
    return "\n".join(lines)


def plot_steps(rows: list[dict], settings: list[str], path: Path, interval: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name in settings:
        runs = [r["kl"] for r in rows if r["setting"] == name]
        if not runs:
            continue
        n = min(len(k) for k in runs)
        mean = [statistics.fmean(k[t] for k in runs) for t in range(n)]
        ax.plot(range(1, n + 1), mean, label=name)
    ax.axvline(interval + 0.5, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("decode step (dotted: the first re-selection at the default interval)")
    ax.set_ylabel("KL to stock (mean over documents, positions, seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_settings(specs: list[str]) -> dict:
    """Known names, or ``name=JSON`` for another setting (``custom_params.loopserve``)."""
    out = {}
    for spec in specs:
        if "=" in spec:
            name, body = spec.split("=", 1)
            out[name] = json.loads(body)
        elif spec in SETTINGS:
            out[spec] = SETTINGS[spec]
        else:
            raise SystemExit(f"--settings: unknown {spec!r}; known: {', '.join(SETTINGS)}, or name=JSON")
    out = {"floor": STOCK, **out}  # every table has its floor
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS),
                   help=f"names ({', '.join(SETTINGS)}) or name=JSON (custom_params.loopserve)")
    p.add_argument("--docs", type=int, default=1, help="documents (1-3)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=3800)
    p.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS)
    p.add_argument("--url", help="an already running --enable-loopserve server (default: start one)")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="extra flags of the started server (last on the line)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "kl_fidelity")
    p.add_argument("--model", help="a key of `python -m sglang_loopserve.models list` or a folder (default: "
                                   "the embedded SmolLM2)")
    a = p.parse_args(argv)
    if not 1 <= a.docs <= len(DOCUMENTS):
        p.error(f"--docs must be in 1..{len(DOCUMENTS)}, got {a.docs}")
    if a.tokens < 1 or a.seeds < 1:
        p.error("--tokens and --seeds must be >= 1")
    settings = parse_settings(a.settings)
    from transformers import AutoTokenizer

    model = models.resolve_model_path(a.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    a.out.mkdir(parents=True, exist_ok=True)
    server = None
    if a.url is None:
        server = SGLangServer(model, max_total_tokens=16384, log_path=a.out / "server.log",
                              extra_args=["--enable-loopserve", *a.server_args]).start()
    client = Client(a.url or server.url)
    rows = []
    try:
        for doc in range(a.docs):
            for position in a.positions:
                first_ids, prompt_ids = conversation(tokenizer, doc, position, a.prompt_tokens)
                for seed in range(a.seeds):
                    for name, setting in settings.items():
                        t = time.perf_counter()
                        res = client.measure(first_ids, prompt_ids, setting, tokens=a.tokens, seed=seed)
                        rows.append({"setting": name, "doc": doc, "position": position, "seed": seed,
                                     "prompt_tokens": len(prompt_ids), **res})
                        print(f"doc {doc} {position:<6} seed {seed} {name:<24} KL {statistics.fmean(res['kl']):.4f}  "
                              f"read {res['decode_read']:.2f}  density {res['prefill_density']:.2f}  "
                              f"cached {res['cached_tokens']}  ({time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        if server is not None:
            server.stop()
    table = summarise(rows, list(settings))
    print("\n" + table)
    (a.out / "rows.json").write_text(json.dumps(rows))
    (a.out / "table.md").write_text(table + "\n")
    plot_steps(rows, list(settings), a.out / "per_step.png")
    print(f"\nwritten: {a.out}/rows.json, table.md, per_step.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
