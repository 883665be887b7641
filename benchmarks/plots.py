"""The README's plots, drawn from results files (and the pooled tables printed beside them).

    python benchmarks/plots.py make-run benchmarks/results/make_run/run*-turns.json \
        --out benchmarks/results/make_run/per_turn.png
    python benchmarks/plots.py fidelity benchmarks/results/kl_fidelity/run{1,2,3} \
        --out benchmarks/results/kl_fidelity/kl_by_position.png

``make-run`` reads the turns files ``python -m sglang_loopserve.demo`` writes (one per run) and
draws time to first token and decode rate per turn, stock against LoopServe; it prints the
per-run ratios.  ``fidelity`` reads the ``rows.json`` of ``benchmarks/kl_fidelity.py`` runs,
pools their answers per (setting, question position) and draws the mean per-token KL to stock,
with the floor; it prints the pooled table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

CONFIGS = (("stock", "stock SGLang", "tab:gray"), ("loopserve", "--enable-loopserve", "tab:blue"))
POSITIONS = ("start", "middle", "end")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_turns(paths):
    runs = []
    for p in paths:
        doc = json.loads(pathlib.Path(p).read_text())
        runs.append(doc)
    return runs


def make_run(paths, out):
    runs = load_turns(paths)
    n_turns = len(runs[0]["configs"]["stock"])
    print(f"{len(runs)} run(s), CPU {runs[0]['cpu']}; per turn: decode LoopServe / stock, TTFT stock / LoopServe")
    for t in range(n_turns):
        dec = [r["configs"]["loopserve"][t]["decode_tokens_per_s"] / r["configs"]["stock"][t]["decode_tokens_per_s"]
               for r in runs]
        ttft = [r["configs"]["stock"][t]["time_to_first_token_s"]
                / r["configs"]["loopserve"][t]["time_to_first_token_s"] for r in runs]
        print(f"turn {t + 1}: decode {' / '.join(f'{x:.2f}x' for x in dec)}; "
              f"TTFT {' / '.join(f'{x:.2f}x' for x in ttft)}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    turns = list(range(1, n_turns + 1))
    labels = [f"{t}\n{runs[0]['configs']['stock'][t - 1]['cached_tokens'] / 1000:.1f}K cached" for t in turns]
    width = 0.38
    for ax, key, title in ((axes[0], "time_to_first_token_s", "time to first token (s), lower is better"),
                           (axes[1], "decode_tokens_per_s", "decode (tokens/s), higher is better")):
        for j, (name, label, colour) in enumerate(CONFIGS):
            per_run = [[r["configs"][name][t - 1][key] for t in turns] for r in runs]
            mean = [sum(v) / len(v) for v in zip(*per_run)]
            xs = [t + (j - 0.5) * width for t in turns]
            ax.bar(xs, mean, width, label=label, color=colour)
            for run in per_run:
                ax.plot(xs, run, "k.", markersize=3)
        ax.set_xticks(turns, labels, fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"make run: SmolLM2-135M, 4 turns, {len(runs)} runs (dots), CPU: {runs[0]['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def pooled_kl(run_dirs):
    """Mean per-token KL per (setting, position) over every answer of the runs, and the read and pairs."""
    acc = {}
    for d in run_dirs:
        for row in json.loads((pathlib.Path(d) / "rows.json").read_text()):
            a = acc.setdefault((row["setting"], row["position"]), {"kl": [], "read": [], "pairs": []})
            a["kl"].append(sum(row["kl"]) / len(row["kl"]))
            a["read"].append(row["decode_read"])
            a["pairs"].append(row["prefill_density"])
    return {k: {"kl": sum(v["kl"]) / len(v["kl"]), "n": len(v["kl"]), "read": sum(v["read"]) / len(v["read"]),
                "pairs": sum(v["pairs"]) / len(v["pairs"])} for k, v in acc.items()}


def fidelity(run_dirs, out):
    pooled = pooled_kl(run_dirs)
    settings = list(dict.fromkeys(s for s, _ in pooled))
    positions = [p for p in POSITIONS if any((s, p) in pooled for s in settings)]
    print("| setting | " + " | ".join(f"KL {p} (x floor)" for p in positions) + " | read | pairs | answers |")
    print("|---|" + "---|" * (len(positions) + 3))
    for s in settings:
        cells = []
        for p in positions:
            v, floor = pooled[(s, p)], pooled.get(("floor", p))
            ratio = f" ({v['kl'] / floor['kl']:.2f}x)" if floor and s != "floor" else ""
            cells.append(f"{v['kl']:.4f}{ratio}")
        first = pooled[(s, positions[0])]
        print(f"| {s} | " + " | ".join(cells) + f" | {first['read']:.2f} | {first['pairs']:.2f} | {first['n']} |")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    width = 0.8 / len(settings)
    colours = {"floor": "tab:gray"}
    for j, s in enumerate(settings):
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(positions))]
        ax.bar(xs, [pooled[(s, p)]["kl"] for p in positions], width, label=s, color=colours.get(s))
    floor = [pooled[("floor", p)]["kl"] for p in positions] if all(("floor", p) in pooled for p in positions) else None
    if floor:
        ax.plot(range(len(positions)), [3 * f for f in floor], "r_", markersize=30, label="3x the floor")
    ax.set_xticks(range(len(positions)), [f"question at the {p}" for p in positions], fontsize=8)
    ax.set_ylabel("mean per-token KL to stock", fontsize=8)
    n = pooled[(settings[0], positions[0])]["n"]
    ax.set_title(f"LoopServe vs stock, per question position ({n} answers each)", fontsize=9)
    top = max([pooled[k]["kl"] for k in pooled] + [3 * f for f in floor or []])
    ax.set_ylim(0, 1.3 * top)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return pooled


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    mr = sub.add_parser("make-run", help="TTFT and decode per turn from demo turns files")
    mr.add_argument("turns", nargs="+")
    mr.add_argument("--out", required=True)
    fi = sub.add_parser("fidelity", help="KL per question position from kl_fidelity.py run folders")
    fi.add_argument("runs", nargs="+")
    fi.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.what == "make-run":
        make_run(args.turns, args.out)
    else:
        fidelity(args.runs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
