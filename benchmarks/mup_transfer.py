"""Does the best learning rate hold across widths? A grid over `train.lr`, searched with
`jaxlm.sweep` at three widths under sp and under muP.

    python -m benchmarks.mup_transfer [--widths=32,64,256] [--steps=80] [--workers=2]

The tiny setup (configs/tiny.py: 4 layers, the built-in corpus, its 4096-piece tokenizer)
at `d_model` = each width (`d_ff` = 3 x width, 4 heads of width / 4), muP's base width the
smallest; rows of `--seq_len` tokens, `--steps` updates, warmup a tenth of them, the final
val_loss the objective. For each (parametrization, width) one `python -m jaxlm.sweep` with a
grid sampler over `--lrs`; the best learning rate is the grid point of the lowest val_loss.
Tensor Programs V's claim: under muP the best learning rate stays put as the width grows,
under sp it falls. Writes benchmarks/results/mup-transfer-<cpu>.{md,jsonl,png}.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

LRS = "2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2"

SPACE = """from jaxlm.sweep_space import Space, choice


def get_space():
    return Space(params={{"train.lr": choice({lrs})}}, sampler="grid", pruner="none")
"""


def sweep(root: pathlib.Path, parametrization: str, width: int, args, lrs) -> dict:
    """One grid sweep over `lrs`; {lr: final val_loss} of its complete trials, and wall time."""
    import optuna

    from jaxlm import sweep_storage

    space = root / "space.py"
    space.write_text(SPACE.format(lrs=", ".join(repr(x) for x in lrs)))
    study = root / f"{parametrization}-w{width}"
    overrides = {
        "model.d_model": width, "model.d_ff": 3 * width,
        "model.parametrization": parametrization, "model.mup_base_width": args.base_width,
        "data.seq_len": args.seq_len, "train.steps": args.steps,
        "train.warmup_steps": max(1, args.steps // 10), "train.eval_every": args.steps,
        "checkpoint.every": args.steps,
        **({"data.tokenizer": args.tokenizer} if args.tokenizer else {}),
    }  # fmt: skip

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "jaxlm.sweep", "--config=configs/tiny.py", f"--space={space}",
         f"--study={study}", f"--trials={len(lrs)}", f"--workers={args.workers}",
         *[f"--config.{k}={v}" for k, v in overrides.items()]],
        check=True,
    )  # fmt: skip
    loaded = optuna.load_study(study_name=study.name, storage=sweep_storage.open_storage("", study))
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    losses = {t.params["train.lr"]: t.value for t in complete}
    if sorted(losses) != sorted(lrs):  # the grid sampler gives each trial its own point
        raise SystemExit(f"{study}: val_loss for {sorted(losses)}, not every point of {lrs}")
    return {"losses": losses, "wall_s": time.perf_counter() - start}


def plot(found: dict, widths: list[int], path: pathlib.Path) -> None:
    """val_loss against lr, a panel per parametrization, a line per width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, parametrization in zip(axes, ("sp", "mup")):
        for width in widths:
            losses = found[parametrization][width]["losses"]
            lrs = sorted(losses)
            ax.plot(lrs, [losses[x] for x in lrs], marker="o", label=f"width {width}")
        ax.set_xscale("log")
        ax.set_xlabel("train.lr")
        ax.set_title(parametrization)
    axes[0].set_ylabel("final val_loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="32,64,256")
    parser.add_argument("--base_width", type=int, default=0, help="default: the smallest width")
    parser.add_argument("--lrs", default=LRS)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--tokenizer",
        default="",
        help="one 4096-piece model for every study (default: each trains its own)",
    )
    parser.add_argument("--out", default="", help="the studies; default a temporary directory")
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    from benchmarks import results_table

    widths = [int(w) for w in args.widths.split(",")]
    args.base_width = args.base_width or min(widths)
    lrs = [float(x) for x in args.lrs.split(",")]
    root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="mup_transfer_"))
    root.mkdir(parents=True, exist_ok=True)
    found = {p: {} for p in ("sp", "mup")}
    for parametrization in ("sp", "mup"):
        for width in widths:
            found[parametrization][width] = sweep(root, parametrization, width, args, lrs)
            print(parametrization, width, found[parametrization][width], flush=True)

    model, cores, slug = results_table.cpu()
    base = pathlib.Path(args.results) / f"mup-transfer-{slug}"
    base.parent.mkdir(parents=True, exist_ok=True)
    plot(found, widths, base.with_suffix(".png"))
    load = os.getloadavg()[0]
    rows, cells = [], []
    for parametrization in ("sp", "mup"):
        best = {}
        for width in widths:
            losses = found[parametrization][width]["losses"]
            best[width] = min(losses, key=losses.get)
            rows.append({
                "parametrization": parametrization, "width": width,
                "base_width": args.base_width, "best_lr": best[width],
                "best_val_loss": losses[best[width]],
                "val_loss_by_lr": {repr(k): v for k, v in sorted(losses.items())},
                "steps": args.steps, "seq_len": args.seq_len, "cpu": model, "cores": cores,
                "wall_s": found[parametrization][width]["wall_s"],
            })  # fmt: skip
        moved = max(best.values()) / min(best.values())
        for width in widths:
            losses = found[parametrization][width]["losses"]
            cells.append([parametrization, width, f"{best[width]:g}",
                          f"{losses[best[width]]:.4f}", f"{moved:g}x"])  # fmt: skip
    table = results_table.record(
        base,
        rows,
        "# muP transfer: the best train.lr across widths (benchmarks/mup_transfer.py)\n\n"
        f"configs/tiny.py at d_model = width (base width {args.base_width}), "
        f"{args.steps} updates of 8 rows x {args.seq_len} tokens, final val_loss; a grid over "
        f"train.lr = {args.lrs} through `jaxlm.sweep`; moved: the largest best lr over the "
        f"smallest across widths. {model}, load {load:.1f} at the end. Plot: "
        f"{base.name}.png.",
        ["parametrization", "width", "best lr", "val_loss", "best lr moved"],
        cells,
        mode="replace",
    )
    print(table.read_text())


if __name__ == "__main__":
    main()
