"""jaxlm against the stacks a user would pick instead, on this CPU (issue #5).

    python -m benchmarks.vs_peers [--shapes=small,medium] [--rounds=3] [--steps=N --warmup=M]
        [--only=jaxlm,maxtext,torch] [--cache_dir=~/.cache/jaxlm-peers] [--lock=/tmp/cpu.lock]
        [--results=benchmarks/results] [--maxtext_remat=none] [--torch_mode=compile|eager]
        [--glibc_tunables=glibc.malloc.hugetlb=1]

Same model shape, batch, sequence length and dtype (float32) on every side: jaxlm, MaxText
(PyPI `maxtext`, its own Python 3.12 venv) and PyTorch + transformers (`LlamaForCausalLM`,
AdamW, its own venv). Each side runs in a fresh subprocess per round, sides alternating
(A B C A B C ...), so none profits from another's warm caches or from a quiet moment of the
machine. Throughput is tokens per step / median step time after warmup (MaxText's from its
own per-step log); each side runs with its best settings found on a 2-core EPYC (SETTINGS
below). The peers' venvs are built in --cache_dir on first use; a side that cannot be set up
is reported in one line and left out. Results are appended to
benchmarks/results/vs_peers-<machine>.md and .jsonl (--results=/tmp/x for trial runs).

Every side (and the peak measurement) runs under the same GLIBC_TUNABLES, by default
transparent huge pages for malloc's large blocks: all three stacks allocate their step
buffers afresh every step, and on this VM first-touch faults of 4 KiB pages cost each of
them 5-15% of a step (benchmarks/results/NOTES.md, session 6). `--glibc_tunables=` runs them
without.

The file runs in three interpreters (jaxlm's, the torch venv's, the orchestrator's), so only
the standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

from benchmarks import results_table

SHAPES = {
    "small": dict(
        vocab=32000, d_model=256, n_layers=4, n_heads=4, head_dim=64, d_ff=768, seq=256, batch=8
    ),
    "medium": dict(
        vocab=32000, d_model=512, n_layers=8, n_heads=8, head_dim=64, d_ff=1536, seq=512, batch=8
    ),
}
SIDES = ("jaxlm", "maxtext", "torch")
# (timed steps, warmup steps) per side and round: ~2.5 s/step small, ~20 s/step medium on 2 cores.
DEFAULT_STEPS = {"small": (8, 2), "medium": (4, 1)}

# What each side runs with; recorded with every result. {remat} and {mode} are the --maxtext_remat
# and --torch_mode in force. Their defaults were the faster choice, 2-core EPYC, alternating
# runs: MaxText remat none vs full 790, 798 vs 787, 788 tokens/s (small), 196, 216 vs 183, 205
# (medium); full vs minimal 674-800 vs 686-760 (small); torch.compile of the model 1201-1393
# (median 1277) vs eager 834-1311 (median 1099, 6 runs each, small).
SETTINGS = {
    "jaxlm": "1 CPU device, remat none, attention xla, layers unrolled, fp32, jit + donated state",
    "maxtext": "1 CPU device, remat_policy={remat}, scan_layers, attention=dot_product, "
    "no dropout, fp32",
    "torch": "{mode}, sdpa attention, AdamW (foreach), fp32, torch.get_num_threads() threads",
}
MAXTEXT_REMAT = "none"
TORCH_MODE = "compile"
GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"

REPO = pathlib.Path(__file__).resolve().parents[1]
PY312 = "/root/.pyenv/versions/3.12.1/bin/python3"
PY311 = "/root/.pyenv/versions/3.11.7/bin/python3"
MAXTEXT_SPEC = "maxtext>=0.2.5"
TORCH_SPEC = "torch==2.13.0"  # the CPU wheel on local disk; others may pull a multi-GB CUDA build


def _median_step(times: list[float], tokens: int) -> dict:
    return {
        "tokens_per_s": tokens / statistics.median(times),
        "step_s": [round(t, 4) for t in times],
    }


# ---------------------------------------------------------------- workers (one subprocess each)


def worker_jaxlm(shape: dict, steps: int, warmup: int) -> dict:
    """jaxlm's real train step (optimizer, clipping, non-finite guard) on synthetic tokens."""
    import jax

    from benchmarks import synthetic
    from jaxlm import config as config_lib
    from jaxlm import sharding as sharding_lib
    from jaxlm import step as step_lib

    config = config_lib.default_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers = shape["vocab"], shape["d_model"], shape["n_layers"]
    m.n_heads = m.n_kv_heads = shape["n_heads"]
    m.head_dim, m.d_ff = shape["head_dim"], shape["d_ff"]
    m.remat, m.attention, m.dtype = "none", "xla", "float32"
    m.scan_unroll = m.n_layers  # no layer loop: no stacked residual buffers to fill
    config.data.seq_len = shape["seq"]
    config.train.global_batch_size = shape["batch"]
    devices = jax.devices()[:1]
    factory, _ = step_lib.build(config, devices)
    state = factory.create(jax.random.key(0))
    batch = sharding_lib.global_batch(
        synthetic.token_batch(shape["batch"], shape["seq"], shape["vocab"]), factory.batch_sharding
    )
    with factory.context():
        train_step = step_lib.make_train_step(factory)
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = jax.block_until_ready(train_step(state, batch))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return {
        **_median_step(times, shape["batch"] * shape["seq"]),
        "loss": float(metrics["loss"]),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def worker_torch(shape: dict, steps: int, warmup: int, compiled: bool = False) -> dict:
    """transformers' LlamaForCausalLM, AdamW and norm clipping, like jaxlm's step."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["d_model"],
            intermediate_size=shape["d_ff"],
            num_hidden_layers=shape["n_layers"],
            num_attention_heads=shape["n_heads"],
            num_key_value_heads=shape["n_heads"],
            head_dim=shape["head_dim"],
            max_position_embeddings=shape["seq"],
            tie_word_embeddings=False,
            attn_implementation="sdpa",
        )
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits = forward(input_ids=inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, shape["vocab"]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {
        **_median_step(times, shape["batch"] * shape["seq"]),
        "loss": loss,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def worker_peak() -> dict:
    """The matmul peak of this host, for the floor estimate."""
    from jaxlm import metrics as metrics_lib

    return {
        "peak_flops": metrics_lib.measure_cpu_peak(repeats=metrics_lib.BENCHMARK_CPU_PEAK_REPEATS)
    }


MAXTEXT_KEYS = {
    "vocab": "vocab_size",
    "d_model": "base_emb_dim",
    "n_layers": "base_num_decoder_layers",
    "n_heads": "base_num_query_heads",
    "head_dim": "head_dim",
    "d_ff": "base_mlp_dim",
    "seq": "max_target_length",
    "batch": "per_device_batch_size",
}


def worker_maxtext(shape: dict, steps: int, warmup: int, python: str, remat: str) -> dict:
    """MaxText's own trainer, run as a user would; step times come from its per-step log lines
    ("completed step: N, seconds: S, ..."), measured by it between step dispatches. Its loop
    runs ahead of the CPU by a step, so steps 0 and 1 time only their dispatch: at least two
    warmup steps are dropped."""
    warmup = max(warmup, 2)
    with tempfile.TemporaryDirectory() as out:
        args = [f"{MAXTEXT_KEYS[k]}={v}" for k, v in shape.items()] + [
            f"base_num_kv_heads={shape['n_heads']}",
            "dtype=float32",
            "weight_dtype=float32",
            f"steps={warmup + steps}",
            "run_name=vs_peers",
            f"base_output_directory={out}",
            "hardware=cpu",
            "skip_jax_distributed_system=true",
            "dataset_type=synthetic",
            "enable_checkpointing=false",
            "attention=dot_product",
            f"remat_policy={remat}",
            "enable_dropout=false",
        ]
        proc = subprocess.run(
            [python, "-m", "maxtext.trainers.pre_train.train", *args],
            cwd=out,
            env={**os.environ, "DECOUPLE_GCLOUD": "TRUE", "JAX_PLATFORMS": "cpu"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    log = proc.stdout
    step_s = {
        int(n): float(s) for n, s in re.findall(r"completed step: (\d+), seconds: ([\d.]+)", log)
    }
    times = [step_s[i] for i in sorted(step_s) if i >= warmup]
    if proc.returncode or len(times) < steps:
        raise RuntimeError(
            f"MaxText exited {proc.returncode} after {len(step_s)} steps: {_last_line(log)}"
        )
    losses = re.findall(r"completed step: \d+,.* loss: ([\d.]+)", log)
    version = [
        pathlib.Path(p).name[8:-10]
        for p in glob.glob(
            str(pathlib.Path(python).parents[1] / "lib/python*/site-packages/maxtext-*.dist-info")
        )
    ]
    return {
        **_median_step(times, shape["batch"] * shape["seq"]),
        "loss": float(losses[-1]),
        "maxtext": version[0] if version else "?",
    }


def run_worker(args) -> None:
    shape = SHAPES.get(args.shape)
    if args.worker == "peak":
        result = worker_peak()
    elif args.worker == "torch":
        result = worker_torch(shape, args.steps, args.warmup, compiled=args.compiled)
    else:
        result = worker_jaxlm(shape, args.steps, args.warmup)
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- peers' venvs


class SetupError(Exception):
    """A side that cannot be installed here; reported in one line while the other sides go on."""


def _last_line(text: str) -> str:
    """The exception line of a traceback (JAX adds a note after it), else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["(no output)"])[-1][:300]


def _setup_run(cmd: list[str], log: pathlib.Path) -> None:
    """One build command, its output kept in the venv's build.log for when it fails."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SetupError(f"`{' '.join(cmd[2:5])} ...` exited {code} (log: {log})")


def ensure_venv(directory: pathlib.Path, base_python: str, install) -> str:
    """The venv's python, built first when no complete one is there.

    A venv is only marked complete after its last install, so an interrupted build is redone
    from scratch rather than half used."""
    python = directory / "bin" / "python"
    if (directory / ".complete").exists():
        return str(python)
    if not os.access(base_python, os.X_OK):
        raise SetupError(f"no Python at {base_python}")
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log = directory / "build.log"
    print(f"building {directory} (first use; log: {log}) ...", flush=True)
    start = time.perf_counter()
    _setup_run([base_python, "-m", "venv", str(directory)], log)
    install(str(python), directory, log)
    (directory / ".complete").write_text(f"built in {time.perf_counter() - start:.0f} s\n")
    print(f"built {directory} in {time.perf_counter() - start:.0f} s", flush=True)
    return str(python)


def install_torch(python: str, directory: pathlib.Path, log: pathlib.Path) -> None:
    """torch first and pinned, so transformers cannot bring in another (CUDA) build."""
    _setup_run([python, "-m", "pip", "install", TORCH_SPEC], log)
    _setup_run([python, "-m", "pip", "install", "transformers", TORCH_SPEC], log)


def install_maxtext(python: str, directory: pathlib.Path, log: pathlib.Path) -> None:
    """The wheel has no plain dependencies: they are in the decoupled-requirements.txt it ships
    (the set that runs without Google Cloud, DECOUPLE_GCLOUD=TRUE), so install from that."""
    wheels = directory / "wheel"
    _setup_run([python, "-m", "pip", "download", "--no-deps", "-d", str(wheels), MAXTEXT_SPEC], log)
    wheel = next(wheels.glob("maxtext-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith("/decoupled-requirements.txt")]
        if not names:
            raise SetupError(f"{wheel.name} ships no decoupled-requirements.txt")
        requirements = directory / "decoupled-requirements.txt"
        requirements.write_bytes(z.read(names[0]))
    _setup_run([python, "-m", "pip", "install", "-r", str(requirements), str(wheel)], log)


def side_python(side: str, cache: pathlib.Path) -> str:
    if side == "jaxlm":  # the interpreter running this script, wherever jaxlm is installed
        return sys.executable
    if side == "torch":
        return ensure_venv(cache / "torch-venv", PY311, install_torch)
    return ensure_venv(cache / "maxtext-venv", PY312, install_maxtext)


# ---------------------------------------------------------------- orchestrator


@contextlib.contextmanager
def cpu_lock(path: str | None):
    """Hold `path` with flock(2) (as flock(1) does) while a side runs, so that timing runs of
    other tools sharing the CPU wait instead of overlapping."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_side(side: str, python: str, shape: str, steps: int, warmup: int, args) -> dict:
    """One side in a fresh process: nothing compiled or cached in memory survives a round."""
    with cpu_lock(args.lock):
        if side == "maxtext":
            return worker_maxtext(SHAPES[shape], steps, warmup, python, args.maxtext_remat)
        cmd = [
            python,
            "-m",
            "benchmarks.vs_peers",
            f"--worker={side}",
            f"--shape={shape}",
            f"--steps={steps}",
            f"--warmup={warmup}",
        ]
        if side == "torch" and args.torch_mode == "compile":
            cmd.append("--compiled")
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        raise RuntimeError(f"{side} exited {proc.returncode}: {_last_line(proc.stderr)}")
    return json.loads(results[-1])


def _tps(result: dict | None) -> str:
    return f"{result['tokens_per_s']:,.0f}" if result else "failed"


def record(directory: pathlib.Path, slug: str, row: dict) -> pathlib.Path:
    """Append the run to <slug>.jsonl (everything) and <slug>.md (one table row per side)."""
    cells = []
    tunables = f"; GLIBC_TUNABLES={row['glibc_tunables']}" if row.get("glibc_tunables") else ""
    for side, info in row["sides"].items():
        ratio = row["median_ratio"].get(side)
        cells.append(
            [
                row["date"],
                row["shape"],
                f"{row['steps']} ({row['warmup']})",
                side,
                ", ".join(_tps(r) for r in info["rounds"]) or info.get("error", ""),
                _tps(info["median"] and {"tokens_per_s": info["median"]}),
                f"{ratio:.2f}x" if ratio else "-",
                info["settings"] + tunables,
            ]
        )
    return results_table.record(
        directory / f"vs_peers-{slug}",
        [row],
        f"# jaxlm vs MaxText vs PyTorch on {slug}\n\n`python -m benchmarks.vs_peers`; tokens/s = "
        "batch x seq / median step time after warmup, each side in a fresh process per round, "
        "sides alternating.",
        [
            "date",
            "shape",
            "steps (warmup)",
            "side",
            "tokens/s by round",
            "median tokens/s",
            "jaxlm / side (median)",
            "settings",
        ],
        cells,
    )


def compare(args) -> None:
    model, cores, slug = results_table.cpu()
    cache = pathlib.Path(os.path.expanduser(args.cache_dir))
    sides = [s for s in SIDES if s in args.only.split(",")]
    mode = "torch.compile(model)" if args.torch_mode == "compile" else "eager"
    settings = {s: SETTINGS[s].format(remat=args.maxtext_remat, mode=mode) for s in sides}
    print(f"machine: {model}, {cores} cores ({slug})", flush=True)
    # Inherited by every side's process; glibc reads it only at process start.
    os.environ.pop("GLIBC_TUNABLES", None)
    if args.glibc_tunables:
        os.environ["GLIBC_TUNABLES"] = args.glibc_tunables
    print(f"GLIBC_TUNABLES={args.glibc_tunables!r} for every side", flush=True)
    pythons, errors = {}, {}
    for side in sides:
        try:
            pythons[side] = side_python(side, cache)
        except SetupError as e:
            errors[side] = f"not set up: {e}"
            print(f"{side}: {errors[side]}; going on without it", flush=True)
    with cpu_lock(args.lock):
        peak = subprocess.run(
            [side_python("jaxlm", cache), "-m", "benchmarks.vs_peers", "--worker=peak"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout
    peak = json.loads(peak.split("RESULT ", 1)[1])["peak_flops"] if "RESULT " in peak else None
    print(
        f"matmul peak: {peak / 1e9:.1f} GFLOP/s (jitted f32 2048^3)"
        if peak
        else "matmul peak: not measured",
        flush=True,
    )
    for side in pythons:
        print(f"{side}: {settings[side]}", flush=True)

    for shape in args.shapes.split(","):
        steps, warmup = DEFAULT_STEPS[shape]
        steps, warmup = args.steps or steps, warmup if args.warmup is None else args.warmup
        print(
            f"\nshape {shape}: {SHAPES[shape]}, fp32; {steps} timed steps after {warmup} warmup,"
            f" {args.rounds} rounds",
            flush=True,
        )
        rounds = {s: [] for s in pythons}
        ratios = {s: [] for s in pythons if s != "jaxlm"}
        for r in range(args.rounds):
            for side in pythons:
                try:
                    rounds[side].append(run_side(side, pythons[side], shape, steps, warmup, args))
                except RuntimeError as e:
                    rounds[side].append(None)
                    print(f"  {side} failed: {e}", flush=True)
            line = "  ".join(f"{s} {_tps(rounds[s][-1])}" for s in pythons)
            jax_r = rounds.get("jaxlm", [None])[-1]
            for side in ratios:
                if jax_r and rounds[side][-1]:
                    ratios[side].append(jax_r["tokens_per_s"] / rounds[side][-1]["tokens_per_s"])
                    line += f"  jaxlm/{side} {ratios[side][-1]:.2f}x"
            print(f"round {r + 1}: {line}  (tokens/s)", flush=True)
        medians = {
            s: statistics.median([x["tokens_per_s"] for x in v if x]) if any(v) else None
            for s, v in rounds.items()
        }
        median_ratio = {s: statistics.median(v) for s, v in ratios.items() if v}
        print(
            "median: "
            + "  ".join(f"{s} {_tps(m and {'tokens_per_s': m})}" for s, m in medians.items())
            + "".join(f"  jaxlm/{s} {v:.2f}x" for s, v in median_ratio.items()),
            flush=True,
        )
        row = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": slug,
            "cpu": model,
            "cores": cores,
            "peak_flops": peak,
            "shape": shape,
            **SHAPES[shape],
            "steps": steps,
            "warmup": warmup,
            "glibc_tunables": args.glibc_tunables,
            "median_ratio": median_ratio,
            "sides": {
                s: {
                    "settings": settings[s],
                    "rounds": rounds.get(s, []),
                    "median": medians.get(s),
                    **({"error": errors[s]} if s in errors else {}),
                }
                for s in sides
            },
        }
        print(f"appended to {record(pathlib.Path(args.results), slug, row)}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="small,medium")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, help="timed steps per side and round (default: by shape)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: by shape)")
    p.add_argument("--only", default=",".join(SIDES))
    p.add_argument("--cache_dir", default="~/.cache/jaxlm-peers", help="the peers' venvs")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--lock", help="flock this file while each side runs (e.g. /tmp/cpu.lock)")
    p.add_argument("--maxtext_remat", default=MAXTEXT_REMAT)
    p.add_argument("--torch_mode", default=TORCH_MODE, choices=("eager", "compile"))
    p.add_argument(
        "--glibc_tunables",
        default=GLIBC_TUNABLES,
        help="GLIBC_TUNABLES for every side ('' for glibc's defaults)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parsed = p.parse_args()
    run_worker(parsed) if parsed.worker else compare(parsed)
