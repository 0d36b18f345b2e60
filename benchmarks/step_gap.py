"""The device's idle time between train steps, and the loop's throughput: one tree against another.

    python -m benchmarks.step_gap --before=/tmp/jaxlm-before --configs=tiny,125m --repeats=2

Runs `jaxlm.train.train` of each tree (this one is "after"; `--before` is a checkout of the
commit to compare with, e.g. `git archive <commit> | tar -x -C /tmp/jaxlm-before`) in a
process of its own, alternating before and after, on this host's one CPU device:

- gap: from a `jax.profiler` trace of the whole run, the time between the last op of train
  step N and the first op of step N+1 (ops grouped by the `jit_train_step` execution they
  belong to), median over the steps between the first (it compiles) and the last (eval and
  checkpoint follow it);
- tokens/s: the mean `tokens_per_second` of the metrics rows of a second, unprofiled run.

125m runs its own shape with rows of 128 tokens, 2 per step, so a CPU step takes seconds,
not minutes. Rows go to benchmarks/results/step-gap-<cpu>.md / .jsonl.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent

SHAPES = {  # config name -> (steps, overrides)
    "tiny": (16, {"train.log_every": 4}),
    "125m": (
        6,
        {"train.log_every": 2, "data.seq_len": 128, "train.global_batch_size": 2},
    ),
}


def _child(config_name: str, tokenizer: str, workdir: str, profile: bool) -> dict:
    """Runs in the measured tree's interpreter: one training run, profiled or not."""
    import importlib

    import jax

    from jaxlm import train as train_lib

    steps, overrides = SHAPES[config_name]
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.data.tokenizer = tokenizer
    config.train.steps, config.train.warmup_steps = steps, 1
    config.train.eval_every = config.checkpoint.every = steps
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    if not profile:
        train_lib.train(config, workdir)
        rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
        rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
        return {"tokens_per_second": statistics.mean(rates[1:] or rates)}
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level, options.host_tracer_level = 0, 2
    with jax.profiler.trace(os.path.join(workdir, "trace"), profiler_options=options):
        train_lib.train(config, workdir)
    return _gaps(next(pathlib.Path(workdir, "trace").rglob("*.trace.json.gz")))


def _gaps(trace_file: pathlib.Path) -> dict:
    """Device idle time between consecutive train-step executions, and their length."""
    spans: dict[str, list[float]] = {}
    for event in json.load(gzip.open(trace_file))["traceEvents"]:
        args = event.get("args") or {}
        if event.get("ph") != "X" or args.get("hlo_module") != "jit_train_step":
            continue
        begin, end = event["ts"], event["ts"] + event["dur"]
        span = spans.setdefault(args["run_id"], [begin, end])
        span[0], span[1] = min(span[0], begin), max(span[1], end)
    ordered = sorted(spans.values())[1:-1]  # not the compiled-then-run first, nor the last
    gaps = [b[0] - a[1] for a, b in zip(ordered, ordered[1:])]
    return {
        "gap_ms": statistics.median(gaps) / 1e3,
        "step_ms": statistics.median(end - begin for begin, end in ordered) / 1e3,
        "steps_timed": len(ordered),
    }


def _run(tree: str, config_name: str, tokenizer: str, profile: bool) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        code = (
            # This file by its path: `benchmarks` and `jaxlm` must come from the measured tree.
            "import importlib.util, json; "
            f"spec = importlib.util.spec_from_file_location('step_gap', {__file__!r}); "
            "step_gap = importlib.util.module_from_spec(spec); spec.loader.exec_module(step_gap); "
            "import jaxlm; assert jaxlm.__file__.startswith("
            f"{os.path.abspath(tree)!r}), jaxlm.__file__; "
            f"print('RESULT', json.dumps(step_gap._child({config_name!r}, {tokenizer!r}, "
            f"{workdir!r}, {profile})))"
        )
        env = {**os.environ, "PYTHONPATH": tree, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            sys.exit(f"{tree} {config_name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT ") :])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="a checkout of the tree to compare with")
    parser.add_argument("--configs", default="tiny,125m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", required=True, help="a 4096-piece sentencepiece model")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from benchmarks import results_table

    load = os.getloadavg()[0]
    model, cores, slug = results_table.cpu()
    rows, cells = [], []
    for config_name in args.configs.split(","):
        for repeat in range(args.repeats):
            for label, tree in (("before", args.before), ("after", str(REPO))):
                row = {"config": config_name, "loop": label, "repeat": repeat}
                row.update(_run(tree, config_name, args.tokenizer, profile=True))
                row.update(_run(tree, config_name, args.tokenizer, profile=False))
                row.update(load_before=load, note=args.note)
                load = os.getloadavg()[0]
                rows.append(row)
                cells.append(
                    [config_name, label, repeat, f"{row['gap_ms']:.2f}", f"{row['step_ms']:.1f}"]
                    + [f"{row['tokens_per_second']:,.0f}", f"{row['load_before']:.1f}"]
                )
                print(cells[-1], flush=True)
    preamble = (
        f"# Host gap between train steps ({model}, {cores} cores, one CPU device)\n\n"
        "`python -m benchmarks.step_gap`: gap = device idle time between train steps "
        "(median, from a profile), step = one step's device time (median), tokens/s from an "
        "unprofiled run; before and after alternate; load = 1-min load average before the run."
    )
    results_table.record(
        REPO / "benchmarks" / "results" / f"step-gap-{slug}",
        rows,
        preamble,
        ["config", "loop", "repeat", "gap ms", "step ms", "tokens/s", "load"],
        cells,
    )


if __name__ == "__main__":
    main()
