"""What a sweep found: the ranked table, the best trial as a `python -m jaxlm.train` command,
PNG plots, and each trial's parameters and objective in TensorBoard's HParams dashboard."""

from __future__ import annotations

import os
import shlex

STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ranked(study) -> list:
    """The study's trials, best first: complete by objective, then pruned, running, failed."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1

    def key(t):
        value = t.value if t.value is not None else float("inf") * sign
        return (STATE_ORDER.get(t.state.name, 5), sign * value, t.number)

    return sorted(study.get_trials(deepcopy=False), key=key)


def table(study, objective: str) -> str:
    """One line per trial: number, state, objective, steps trained, parameters, reason."""
    trials = ranked(study)
    names = sorted({name for t in trials for name in t.params})
    header = ["trial", "state", objective, "steps", *names, "note"]
    rows = [header]
    for t in trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        steps = t.user_attrs.get("steps", t.last_step if t.last_step is not None else "")
        params = [_value(t.params.get(n, "")) for n in names]
        rows.append(
            [str(t.number), t.state.name.lower(), value, str(steps), *params,
             t.user_attrs.get("reason", "")]
        )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def best_command(study) -> str:
    """The best trial's settings as a ready command: the base config, the sweep's own
    overrides, then the trial's parameters."""
    try:
        best = study.best_trial
    except ValueError:
        return ""
    attrs = study.user_attrs
    args = ["python", "-m", "jaxlm.train", f"--config={attrs.get('config', 'configs/tiny.py')}"]
    args += attrs.get("overrides", [])
    args += [f"--config.{name}={value}" for name, value in best.params.items()]
    return " ".join(shlex.quote(a) for a in args)


def plots(study, study_dir: str) -> str:
    """PNG plots of the study into study_dir/plots/; a line saying what was written or why
    not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots
    except ImportError:
        return "plots: matplotlib is not installed (pip install 'jaxlm[sweep]'); none written"
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return "plots: no complete trial yet; none written"
    out = os.path.join(study_dir, "plots")
    os.makedirs(out, exist_ok=True)
    written, skipped = [], []
    import warnings

    kinds = {
        "optimization_history": optuna_plots.plot_optimization_history,
        "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
        "param_importances": optuna_plots.plot_param_importances,
        "intermediate_values": optuna_plots.plot_intermediate_values,
    }
    for name, plot in kinds.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these experimental
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(os.path.join(out, f"{name}.png"), bbox_inches="tight", dpi=100)
            plt.close(figure)
            written.append(f"{name}.png")
        except Exception as e:  # e.g. importances need two complete trials
            skipped.append(
                f"{name} ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})"
            )
    line = f"plots: {out}/{{{','.join(written)}}}" if written else "plots: none written"
    return line + (f"; skipped {', '.join(skipped)}" if skipped else "")


def write_hparams(trial_dir: str, params: dict, objective: str, value: float, step: int) -> None:
    """The trial's parameters and objective into its TensorBoard directory, so TensorBoard's
    HParams dashboard over the study directory compares the trials."""
    from tensorboardX import SummaryWriter

    hparams = {
        k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()
    }
    with SummaryWriter(os.path.join(trial_dir, "tensorboard"), filename_suffix=".hparams") as w:
        w.add_hparams(hparams, {f"hparams/{objective}": value}, name=".", global_step=step)
