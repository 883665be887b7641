"""Real attention study: how sparse is SmolLM2's prefill of a new turn, and at what error?

Runs the embedded model (transformers, CPU) on a long multi-turn conversation
(``capture.build_conversation``: about 7K tokens of history, then a ~800-token
last turn whose question sits at its start, middle or end), captures every
layer's post-RoPE q/k/v, and runs ``sparse_prefill_attention`` for the last
turn's queries over the whole sequence.  Reports per layer the density and
the relative output error against dense attention at alpha 0.9/0.95/0.99,
and the error on the question's own rows; saves a PNG with density vs alpha
and one head's selected mask.

    python benchmarks/real_attention.py [--save benchmarks/results/captured_qkv.pt]
    python benchmarks/real_attention.py --history-tokens 5000 --turn-tokens 1800 --positions end \
        --save benchmarks/results/captured_qkv.pt     # the 8016-token capture the prefill benchmarks use
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from capture import QUESTIONS, build_conversation, capture_qkv, load_model  # noqa: E402
from prefill_attention import dense_sdpa  # noqa: E402

from sglang_loopserve.attention import build_block_mask, sparse_prefill_attention  # noqa: E402
from sglang_loopserve.attention.kernels import default_kernel  # noqa: E402

ALPHAS = (0.9, 0.95, 0.99)


def question_rows(tokenizer, conv) -> slice:
    """Rows (within the new tokens) of the question sentence."""
    ids = conv.input_ids[-conv.n_new:].tolist()
    needle = tokenizer(" inserts an item into a sorted list", add_special_tokens=False).input_ids[1:5]
    for i in range(len(ids) - len(needle)):
        if ids[i:i + len(needle)] == needle:
            return slice(max(0, i - 8), min(len(ids), i + 24))
    return slice(0, len(ids))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--history-tokens", type=int, default=5700)
    p.add_argument("--turn-tokens", type=int, default=700,
                   help="about the last turn's length (5000 / 1800: the 8K capture of prefill_attention.py)")
    p.add_argument("--positions", nargs="+", default=list(QUESTIONS))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--save", default=None, help="save the 'end' capture here for prefill_attention.py")
    a = p.parse_args(argv)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    model, tok = load_model()

    results = {}  # (position, layer, alpha) -> (density, err, q_err)
    example = None
    for position in a.positions:
        conv = build_conversation(tok, position, history_tokens=a.history_tokens, turn_tokens=a.turn_tokens)
        t = time.time()
        layers = capture_qkv(model, conv.input_ids)
        qrows = question_rows(tok, conv)
        print(f"\n== question at the {position}: {len(conv.input_ids)} tokens, last turn {conv.n_new} "
              f"(question rows {qrows.start}-{qrows.stop}); capture {time.time() - t:.0f} s", flush=True)
        if a.save and position == "end":
            torch.save({"layers": layers, "n_new": conv.n_new}, a.save)
        print(f"{'layer':>5} " + " ".join(f"{'dens@' + str(x):>9} {'err':>6} {'q err':>6}" for x in ALPHAS))
        for li, d in enumerate(layers):
            q, k, v = d["q"][-conv.n_new:], d["k"], d["v"]
            ref = dense_sdpa(q, k, v)
            row = []
            for alpha in ALPHAS:
                # The kernel named: the plan's own density and error, without the server's
                # switch to the exact rectangle for dense plans.
                out, st = sparse_prefill_attention(q, k, v, alpha=alpha, return_stats=True,
                                                   kernel=default_kernel(q.device))
                results[position, li, alpha] = (st.density, rel(out, ref), rel(out[qrows], ref[qrows]))
                row.append(f"{st.density:>9.3f} {rel(out, ref):>6.3f} {rel(out[qrows], ref[qrows]):>6.3f}")
            print(f"{li:>5} " + " ".join(row), flush=True)
            if example is None and li == len(layers) // 2:  # the first position's middle layer
                mask, _ = build_block_mask(q, k, alpha=0.95, q_window=64, block_size=64)
                example = (li, mask.to_dense()[0].float())
        print(f"{'mean':>5} " + " ".join(
            f"{mean(results, position, x, 0):>9.3f} {mean(results, position, x, 1):>6.3f} "
            f"{mean(results, position, x, 2):>6.3f}" for x in ALPHAS))

    print("\nsummary (mean over layers; worst layer error in brackets)")
    print(f"{'question':>8} " + " ".join(f"{'dens@' + str(x):>9} {'err':>14}" for x in ALPHAS))
    for position in a.positions:
        print(f"{position:>8} " + " ".join(
            f"{mean(results, position, x, 0):>9.3f} {mean(results, position, x, 1):>6.3f} "
            f"[{worst(results, position, x):.3f}]" for x in ALPHAS))
    plot(results, a.positions, example, out_dir / "real_attention.png")


def mean(results, position, alpha, i):
    vals = [v[i] for (p, _, x), v in results.items() if p == position and x == alpha]
    return sum(vals) / len(vals)


def worst(results, position, alpha):
    return max(v[1] for (p, _, x), v in results.items() if p == position and x == alpha)


def plot(results, positions, example, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    n_layers = 1 + max(layer for (_, layer, _) in results)
    for position in positions:
        axes[0].plot(ALPHAS, [mean(results, position, x, 0) for x in ALPHAS], "o-",
                     label=f"question at {position}")
        axes[1].plot(range(n_layers), [results[position, li, 0.95][0] for li in range(n_layers)],
                     ".-", label=f"question at {position}")
    axes[0].set(xlabel="alpha", ylabel="density (mean over layers)", title="Density vs alpha")
    axes[1].set(xlabel="layer", ylabel="density", title="Density per layer, alpha 0.95")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        ax.legend()
    if example is not None:
        layer, m = example
        axes[2].imshow(m.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
        axes[2].set(xlabel="key position", ylabel="new query",
                    title=f"Selected cells, layer {layer} head 0, alpha 0.95")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
