"""muP's coordinate check, plotted: how big each layer's output and the logits get after a few
Adam steps, across widths, under sp and under muP.

    python -m benchmarks.mup_coord_check [--widths=64,128,256,512,1024] [--steps=4]

A 2-layer model (4 heads of width / 4, GQA 2, vocabulary 128, base width 64) trains `steps`
Adam steps (peak lr 1e-2, no warmup, cosine over 10 steps, no weight decay) on fixed random
tokens at each width; after each step the mean |x| of each block's output and of the logits
is read. Under muP (Tensor Programs V) these
stay flat as the width grows; under sp they grow with it, the logits fastest. The figure is
the standard one (Yang et al., fig. 5): a panel per quantity and parametrization, a line per
step. Writes benchmarks/results/mup-coord-check.{md,jsonl,png}; tests/test_mup.py asserts
the same measurement.
"""

from __future__ import annotations

import argparse
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import config as config_lib
from jaxlm import mup, optim, platforms
from jaxlm.model import ModelConfig, Transformer

BASE_WIDTH = 64
VOCAB = 128


def activation_sizes(parametrization: str, width: int, steps: int = 4) -> list[dict]:
    """After each of `steps` Adam steps: {"layers_0", "layers_1", "logits": mean |x|}."""
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=width, n_layers=2, n_heads=4, n_kv_heads=2,
        head_dim=width // 4, d_ff=2 * width, scan_layers=False,
        parametrization=parametrization, mup_base_width=BASE_WIDTH,
    )  # fmt: skip
    model = Transformer(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 32)))
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    t = config_lib.default_config().train
    t.lr, t.warmup_steps, t.weight_decay, t.steps = 1e-2, 0, 0.0, 10
    tx = optim.make_optimizer(t, hidden_lr_ratio=mup.ratio_of(cfg))
    state = tx.init(params)

    def loss(p):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    @jax.jit
    def sizes(p):
        logits, found = model.apply(
            {"params": p}, tokens, capture_intermediates=True, mutable=["intermediates"]
        )
        out = {
            f"layers_{i}": jnp.mean(
                jnp.abs(found["intermediates"][f"layers_{i}"]["__call__"][0][0])
            )
            for i in range(cfg.n_layers)
        }
        return {**out, "logits": jnp.mean(jnp.abs(logits))}

    grad = jax.jit(jax.grad(loss))
    after = []
    for _ in range(steps):
        updates, state = tx.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
        after.append({k: float(v) for k, v in sizes(params).items()})
    return after


def plot(measured: dict, widths: list[int], path: pathlib.Path) -> None:
    """A panel per (parametrization, quantity), |x| against width, a line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(measured["sp"][widths[0]][0])
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6.5), squeeze=False)
    for row, parametrization in enumerate(("sp", "mup")):
        steps = len(measured[parametrization][widths[0]])
        for col, name in enumerate(names):
            ax = axes[row][col]
            for t in range(steps):
                values = [measured[parametrization][w][t][name] for w in widths]
                ax.plot(widths, values, marker="o", label=f"step {t + 1}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrization}: {name}")
            ax.set_xlabel("width (d_model)")
            ax.set_ylabel("mean |x|")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="64,128,256,512,1024")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    from benchmarks import results_table

    widths = [int(w) for w in args.widths.split(",")]
    measured = {p: {w: activation_sizes(p, w, args.steps) for w in widths} for p in ("sp", "mup")}
    base = pathlib.Path(args.results) / "mup-coord-check"
    base.parent.mkdir(parents=True, exist_ok=True)
    plot(measured, widths, base.with_suffix(".png"))
    names = list(measured["sp"][widths[0]][-1])
    rows, cells = [], []
    for p in ("sp", "mup"):
        for name in names:
            last = [measured[p][w][-1][name] for w in widths]
            rows.append({"parametrization": p, "quantity": name, "widths": widths,
                         "after_steps": args.steps, "mean_abs": last, "jax": jax.__version__,
                         "device": jax.devices()[0].device_kind})  # fmt: skip
            cells.append([p, name, *[f"{v:.3g}" for v in last], f"{last[-1] / last[0]:.2f}x"])
    table = results_table.record(
        base,
        rows,
        "# muP coordinate check (benchmarks/mup_coord_check.py)\n\n"
        f"Mean |x| after {args.steps} Adam steps (peak lr 1e-2) of a 2-layer model, base width "
        f"{BASE_WIDTH}, on fixed random tokens; growth = the widest over the narrowest. "
        "Plot: mup-coord-check.png (a line per step).",
        ["parametrization", "quantity", *[f"width {w}" for w in widths], "growth"],
        cells,
        mode="replace",
    )
    print(table.read_text())


if __name__ == "__main__":
    main()
