"""jaxlm's 7B train step against MaxText's llama2-7b, both compiled for one TPU slice on a CPU host.

    python -m benchmarks.aot_vs_maxtext [--topology=v5p-64] [--attention=xla,splash]
        [--per_chip_batch=8] [--seq=4096] [--layers=32] [--no_extrapolate]
        [--maxtext_variants="xla:float32_qk_product=true+float32_logits=true"]
        [--jaxlm_variants="xla:model.float32_attention_scores=false"]
        [--cache_dir=~/.cache/jaxlm-peers] [--results=benchmarks/results] [--lock=/tmp/cpu.lock]

No TPU is needed: `jax.experimental.topologies.get_topology_desc` describes the slice's chips
and `.lower(...).compile()` runs libtpu's real TPU compiler on this host, so what the compiler
reports (per-chip memory from `memory_analysis()`, FLOPs and its roofline step time
'optimal_seconds' from `cost_analysis()`) is what the slice would run. Both sides compile in
MaxText's own venv (PyPI `maxtext`, Python 3.12, built by benchmarks.vs_peers in --cache_dir,
plus the libtpu that its jax pins): one jax, one libtpu, one compiler for both. jaxlm is
imported there from this checkout (PYTHONPATH), nothing of it installed.

  MaxText: its AOT entry point `maxtext.trainers.pre_train.train_compile` (its `main`, with its
    own config parsing, abstract state, sharding and jit), run as a user would; this script
    only wraps the module's `jit_and_compile` to keep the compiled object it returns.
  jaxlm: configs/7b.py's real train step (`jaxlm.step`: AdamW, clipping, non-finite guard),
    lowered with the abstract state and batch and compiled for the same devices (the same
    `get_topology_desc` arguments MaxText's accelerator map gives for --topology).

Same settings on both sides: global batch per_chip_batch x chips, sequence length --seq,
remat full, layers scanned, bf16 compute with float32 weights and AdamW state, a mesh of fsdp
over every chip, packed-row batches (segment ids). Attention `xla` is jaxlm's XLA einsum
against MaxText's `dot_product`; `splash` is jaxlm's Pallas splash kernel against MaxText's
`flash` (also splash on TPU); both with 512 x 512 tiles.

MaxText's defaults compute dot_product's QK^T scores and softmax in bfloat16
(`float32_qk_product: false`, `float32_logits: false` in its base.yml), jaxlm's `xla` in
float32. So each side also compiles with the other's numerics: --maxtext_variants adds MaxText
rows with more overrides of its base.yml, default
`xla:float32_qk_product=true+float32_logits=true` (scores and softmax in float32, as jaxlm's);
their ratio cells are the same-attention jaxlm default row over them. --jaxlm_variants adds
jaxlm rows with config overrides, default `xla:model.float32_attention_scores=false` (scores
and softmax in bfloat16, as MaxText's defaults); their ratio cells are over the
same-attention MaxText default row. Each entry is attention:key=value[+key=value...].

XLA's cost model counts a while loop's body once, so a scanned 32-layer step reads as about
one layer (the 'raw' column). With extrapolation on (default), each side is also compiled with
1 and 2 layers unrolled (MaxText base_num_decoder_layers=1/2 scan_layers=false; jaxlm
model.n_layers=1/2, scan_unroll=n_layers) and the step estimate for L layers is
c1 + (L-1)(c2-c1), for FLOPs and 'optimal_seconds' alike. Two more loops and merges would
skew those small programs, so for them only, on both sides alike: windowed einsums are off
(ESTIMATE_LIBTPU_ARGS; otherwise some fsdp matmuls become loops over the shards, each counted
once), and remat keeps its recomputation (prevent_cse=True, which MaxText sets itself when
unrolled; forced for jaxlm, whose prevent_cse=False for a rolled scan would let XLA merge
the recompute away once the 1-layer loop is removed, which its scanned step cannot). Memory is
always that of the real scanned L-layer program with default compiler flags. A Pallas kernel
is a custom call whose FLOPs the cost model does not see; the per-layer FLOPs column shows
that, and for splash rows the table adds, to both sides alike, a floor for the attention
kernel: its causal matmul FLOPs (forward, remat forward, backward 2x) at the chip's peak.

Results are appended to benchmarks/results/tpu-aot-vs-maxtext.md (a section per run: machine,
versions, settings, table) and .jsonl (everything). Each compile runs in a fresh process
(a 7B compile holds ~1.5 GB of host memory and takes ~2 min on a 2-core host).

Only the standard library is imported at module level: the orchestrator may run in any
Python; the workers run in MaxText's venv.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import pathlib
import subprocess
import tempfile
import time

from benchmarks import results_table, vs_peers
from jaxlm import platforms

REPO = vs_peers.REPO
GiB = 2**30
MAXTEXT_ATTENTION = {"xla": "dot_product", "splash": "flash"}
MAXTEXT_MODEL = "llama2-7b"
JAXLM_CONFIG = "configs.7b"
# What jaxlm's step imports; all ship with MaxText's requirements, checked anyway. PyPI names.
JAXLM_STEP_DEPS = {
    "flax": "flax",
    "optax": "optax",
    "ml_collections": "ml-collections",
    "absl": "absl-py",
    "numpy": "numpy",
}
EXTRAS_MARK = ".aot-extras"
# Environment of every compile. Compiling takes no chip, so a libtpu already loaded by another
# process on this host (its /tmp/libtpu_lockfile) must not stop this one.
WORKER_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "DECOUPLE_GCLOUD": "TRUE",
    "TPU_WORKER_HOSTNAMES": "localhost",
}
# For the 1- and 2-layer estimate compiles only, on both sides: no windowed einsums. The SPMD
# partitioner turns some fsdp all-gather/reduce-scatter + matmul pairs into loops over the
# shards, and the cost model counts a loop body once, so which matmuls got windowed (it
# differs from program to program: 16 such loops in jaxlm's 1-layer splash step, 15 in its
# 2-layer one) would decide the FLOPs more than the model does.
ESTIMATE_LIBTPU_ARGS = (
    "--xla_tpu_enable_windowed_einsum_for_all_gather=false "
    "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"
)


# ---------------------------------------------------------------- workers (MaxText's venv)


def topology_kwargs(topology: str) -> dict:
    """`get_topology_desc` arguments for a slice name like v5p-64, from MaxText's own
    accelerator map, so that jaxlm compiles for exactly the devices MaxText compiles for."""
    from maxtext.utils import accelerator_to_spec_map

    spec = accelerator_to_spec_map.get_system_characteristics(topology)
    return dict(
        platform=spec.platform,
        topology_name=spec.topology_name,
        chip_config_name=spec.chip_config_name,
        chips_per_host_bounds=tuple(spec.chips_per_host_bounds),
        num_slices=1,
        wrap=tuple(spec.wrap),
    )


def compiled_stats(compiled) -> dict:
    """The per-chip numbers the TPU compiler reports for a compiled program."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "flops": cost.get("flops"),
        "bytes_accessed": cost.get("bytes accessed"),
        "transcendentals": cost.get("transcendentals"),
        "optimal_seconds": cost.get("optimal_seconds"),
    }


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("jax", "jaxlib", "libtpu", "flax", "optax", "maxtext"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def maxtext_argv(args, out_dir: str) -> list[str]:
    """MaxText's command line (key=value overrides of its base.yml) for one compile."""
    from maxtext.configs import pyconfig

    base_yml = pathlib.Path(pyconfig.__file__).parent / "base.yml"
    argv = [
        "train_compile",
        str(base_yml),
        f"compile_topology={args.topology}",
        "compile_topology_num_slices=1",
        f"model_name={MAXTEXT_MODEL}",
        f"per_device_batch_size={args.per_chip_batch}",
        f"max_target_length={args.seq}",
        "remat_policy=full",
        f"attention={MAXTEXT_ATTENTION[args.attention]}",
        f"scan_layers={'true' if args.scanned else 'false'}",
        "dataset_type=synthetic",
        "enable_checkpointing=false",
        "skip_jax_distributed_system=true",
        "run_name=aot_vs_jaxlm",
        f"base_output_directory={out_dir}",
    ]
    if args.layers != args.full_layers:
        argv += ["override_model_config=true", f"base_num_decoder_layers={args.layers}"]
    return argv + [o for o in (args.overrides or "").split("+") if o]


def worker_maxtext(args) -> dict:
    """MaxText's train_compile.main as its CLI runs it; the compiled step is taken from the
    module's jit_and_compile on its way out."""
    from absl import app
    from maxtext.trainers.pre_train import train_compile

    kept = []
    original = train_compile.jit_and_compile

    def keep(*a, **kw):
        kept.append(original(*a, **kw))
        return kept[-1]

    train_compile.jit_and_compile = keep
    with tempfile.TemporaryDirectory() as out:
        argv = maxtext_argv(args, out)
        start = time.perf_counter()
        try:
            app.run(train_compile.main, argv=argv)
        except SystemExit as e:  # app.run exits when main returns
            if e.code not in (None, 0):
                raise
        seconds = time.perf_counter() - start
    if not kept:
        raise RuntimeError("MaxText's train_compile returned without compiling")
    return {**compiled_stats(kept[-1]), "compile_s": round(seconds, 1), "argv": argv[2:]}


def jaxlm_config(args):
    """configs/7b.py with this run's batch, length, attention and layer count."""
    config = importlib.import_module(JAXLM_CONFIG).get_config()
    m = config.model
    m.remat, m.attention, m.n_layers = "full", args.attention, args.layers
    m.scan_unroll = 1 if args.scanned else args.layers
    config.data.seq_len = args.seq
    config.train.global_batch_size = args.per_chip_batch * args.chips
    config.train.grad_accum_steps = 1
    for key, value in _overrides(args).items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _value(text: str):
    """A config override's value: true/false, a Python literal, or else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _overrides(args) -> dict:
    """This jaxlm compile's extra config fields (--overrides), {"section.field": value}."""
    pairs = (o.split("=", 1) for o in (args.overrides or "").split("+") if o)
    return {key: _value(value) for key, value in pairs}


def keep_remat_recompute() -> None:
    """Make every flax remat prevent CSE, for jaxlm's unrolled estimate compiles.

    jaxlm remats the blocks of a rolled layer scan with prevent_cse=False, right for the
    scanned step: there the backward loop's recomputation cannot be merged with the forward
    loop. But the 1-layer program is such a scan of length 1, whose loop XLA removes, and
    then it merges the recompute away (seen with splash: 2 kernels per layer instead of 8), so
    the small programs would skip the recompute the scanned step pays. MaxText sets
    prevent_cse=True itself when its layers are not scanned; forcing it here makes both
    sides' per-layer estimates include the recompute."""
    import flax.linen as nn

    remat = nn.remat

    def remat_preventing_cse(*args, **kwargs):
        return remat(*args, **{**kwargs, "prevent_cse": True})

    nn.remat = remat_preventing_cse


def worker_jaxlm(args) -> dict:
    """jaxlm.step's train step lowered on the abstract state and batch, compiled for the slice."""
    from jax.experimental import topologies

    from jaxlm import metrics as metrics_lib
    from jaxlm import step as step_lib

    if not args.scanned:
        keep_remat_recompute()
    kwargs = topology_kwargs(args.topology)
    devices = topologies.get_topology_desc(**kwargs).devices
    args.chips = len(devices)
    config = jaxlm_config(args)
    start = time.perf_counter()
    factory, derived = step_lib.build(config, devices)
    with factory.context():
        batch = step_lib.abstract_batch(factory, derived.micro_batch_size, config.data.seq_len)
        lowered = step_lib.make_train_step(factory).lower(factory.abstract, batch)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    chip = "TPU " + args.topology.split("-")[0]
    peak = next((p for name, p in metrics_lib.PEAK_FLOPS if name.lower() == chip.lower()), None)
    return {
        **compiled_stats(compiled),
        "compile_s": round(seconds, 1),
        "topology_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "peak_flops_per_chip": peak,
        "mesh": dict(derived.mesh_shape),
        "d_attn": config.model.n_heads * derived.head_dim,
        "overrides": {
            "model.remat": "full",
            "model.attention": args.attention,
            "model.n_layers": args.layers,
            "model.scan_unroll": config.model.scan_unroll,
            "data.seq_len": args.seq,
            "train.global_batch_size": config.train.global_batch_size,
            **_overrides(args),
        },
    }


def run_worker(args) -> None:
    result = worker_maxtext(args) if args.worker == "maxtext" else worker_jaxlm(args)
    print("RESULT " + json.dumps({**result, "versions": versions()}), flush=True)


# ---------------------------------------------------------------- the venv both sides share


def ensure_extras(python: str, directory: pathlib.Path) -> None:
    """On top of vs_peers' MaxText venv: the libtpu its jax pins (`jax[tpu]==<its jax>`; the
    decoupled requirements leave accelerator plugins out) and whatever jaxlm's step imports
    that is missing. Marked done in the venv, so it runs once."""
    mark = directory / EXTRAS_MARK
    if mark.exists():
        return
    log = directory / "build.log"
    probe = (
        "import importlib.util as u, importlib.metadata as m; "
        f"print(m.version('jax')); print(*[n for n in {list(JAXLM_STEP_DEPS)!r} "
        "if u.find_spec(n) is None])"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    jax_version, *missing = out.stdout.split("\n")
    packages = [f"jax[tpu]=={jax_version.strip()}"]
    packages += [JAXLM_STEP_DEPS[n] for n in " ".join(missing).split()]
    print(f"installing {' '.join(packages)} into {directory} ...", flush=True)
    vs_peers._setup_run([python, "-m", "pip", "install", *packages], log)
    mark.write_text(" ".join(packages) + "\n")


def shared_python(cache: pathlib.Path) -> str:
    python = vs_peers.side_python("maxtext", cache)
    ensure_extras(python, pathlib.Path(python).parents[1])
    return python


# ---------------------------------------------------------------- orchestrator


def compile_once(
    python: str, side: str, attention: str, layers: int, scanned: bool, args, overrides: str = ""
) -> dict:
    """One compile in a fresh process of the shared venv; its RESULT line, or an error.
    `overrides`: more key=value settings of that side (MaxText's base.yml keys, or jaxlm's
    config fields such as model.float32_attention_scores), joined by '+'."""
    cmd = [
        python,
        "-m",
        "benchmarks.aot_vs_maxtext",
        f"--worker={side}",
        f"--attention={attention}",
        f"--worker_layers={layers}",
        f"--scanned={int(scanned)}",
        f"--topology={args.topology}",
        f"--per_chip_batch={args.per_chip_batch}",
        f"--seq={args.seq}",
        f"--layers={args.layers}",
        f"--overrides={overrides}",
    ]
    env = {
        **os.environ,
        **WORKER_ENV,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    if not scanned:
        env["LIBTPU_INIT_ARGS"] = f"{env.get('LIBTPU_INIT_ARGS', '')} {ESTIMATE_LIBTPU_ARGS}"
    what = (
        f"{side} {attention}{' ' + overrides if overrides else ''} "
        f"{layers} layer{'s' * (layers > 1)} "
        f"{'scanned' if scanned else 'unrolled'}"
    )
    print(f"  compiling {what} ...", end="", flush=True)
    start = time.perf_counter()
    with vs_peers.cpu_lock(args.lock):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    results = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not results:
        error = vs_peers._last_line(proc.stderr + proc.stdout)
        print(f" failed after {wall:.0f} s: {error}", flush=True)
        return {"error": error, "wall_s": round(wall, 1)}
    result = json.loads(results[-1])
    print(f" {wall:.0f} s", flush=True)
    return {**result, "wall_s": round(wall, 1)}


def extrapolate(c1: float | None, c2: float | None, layers: int) -> float | None:
    """A per-layer quantity of an L-layer step from the 1- and 2-layer unrolled programs."""
    if c1 is None or c2 is None:
        return None
    return c1 + (layers - 1) * (c2 - c1)


def attention_floor_s(args, peak: float | None, d_attn: int | None) -> float | None:
    """Seconds a chip needs at least for the attention kernel's matmuls: QK^T and PV over the
    causal half of the square (d_attn = heads x head_dim), forward + remat forward + backward
    (2x) = 4x forward."""
    if not peak or not d_attn:
        return None
    forward = 2 * 2 * args.per_chip_batch * args.seq * args.seq / 2 * d_attn
    return 4 * forward * args.layers / peak


def summarise(
    side: str,
    attention: str,
    runs: dict,
    args,
    peak: float | None,
    d_attn: int | None,
    variant: str = "",
) -> dict:
    """One table row from a side's full compile and (optional) 1- and 2-layer compiles."""
    full, one, two = runs.get("full", {}), runs.get("one", {}), runs.get("two", {})
    row = {"side": side, "attention": attention, "variant": variant, "error": full.get("error")}
    if "temp_bytes" in full:
        live = full["argument_bytes"] + full["output_bytes"] - full["alias_bytes"]
        row.update(
            arguments_gib=full["argument_bytes"] / GiB,
            temp_gib=full["temp_bytes"] / GiB,
            total_gib=(live + full["temp_bytes"]) / GiB,
            raw_s=full["optimal_seconds"],
            raw_flops=full["flops"],
            compile_s=full["compile_s"],
        )
    row["corrected_s"] = extrapolate(
        one.get("optimal_seconds"), two.get("optimal_seconds"), args.layers
    )
    row["corrected_flops"] = extrapolate(one.get("flops"), two.get("flops"), args.layers)
    if "flops" in one and "flops" in two:
        row["layer_flops"] = two["flops"] - one["flops"]
    floor = attention_floor_s(args, peak, d_attn) if attention == "splash" else 0.0
    if row["corrected_s"] is not None and floor is not None:
        row["corrected_plus_floor_s"] = row["corrected_s"] + floor
    row["attention_floor_s"] = floor
    errors = [r["error"] for r in (one, two) if r.get("error")]
    if errors and not row["error"]:
        row["error"] = "extrapolation: " + errors[0]
    return row


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Cells per row; jaxlm's rows carry jaxlm / MaxText ratios for the same attention."""
    peers = {r["attention"]: r for r in rows if r["side"] == "maxtext" and not r.get("variant")}
    ours = {r["attention"]: r for r in rows if r["side"] == "jaxlm" and not r.get("variant")}
    cells = []
    for r in rows:
        mem_ratio = time_ratio = None
        best = "corrected_plus_floor_s"
        if r["side"] == "jaxlm":
            mine, peer = r, peers.get(r["attention"])
        else:  # a MaxText variant row: the same-attention jaxlm default row over it
            mine, peer = (ours.get(r["attention"]), r) if r.get("variant") else (None, None)
        if mine and peer:
            if mine.get("total_gib") and peer.get("total_gib"):
                mem_ratio = mine["total_gib"] / peer["total_gib"]
            if mine.get(best) and peer.get(best):
                time_ratio = mine[best] / peer[best]
        label = r["attention"] if r["side"] == "jaxlm" else MAXTEXT_ATTENTION[r["attention"]]
        if r.get("variant"):
            label += " " + r["variant"].replace("+", " ")
        cells.append(
            [
                r["side"],
                label,
                _f(r.get("arguments_gib"), ".2f"),
                _f(r.get("temp_gib"), ".2f"),
                _f(r.get("total_gib"), ".2f"),
                _f(r.get("raw_s"), ".3f"),
                _f(r.get("corrected_s"), ".3f"),
                _f(r.get(best), ".3f"),
                _f(r.get("layer_flops") and r["layer_flops"] / 1e12, ".2f"),
                _f(mem_ratio, ".3f"),
                _f(time_ratio, ".3f"),
                _f(r.get("compile_s"), ".0f"),
                (r.get("error") or "").replace("|", "/"),
            ]
        )
    return cells


COLUMNS = [
    "side",
    "attention",
    "arguments GiB",
    "temporaries GiB",
    "total GiB",
    "est. step s (raw)",
    "est. step s (scan-corrected)",
    "est. step s (corrected + attention floor)",
    "TFLOP per layer per chip",
    "jaxlm/MaxText memory",
    "jaxlm/MaxText step",
    "compile s",
    "error",
]


def print_table(cells: list[list[str]]) -> None:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    for row in [COLUMNS, *cells]:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip(), flush=True)


def record(directory: pathlib.Path, run: dict, cells: list[list[str]]) -> pathlib.Path:
    """Append the run to tpu-aot-vs-maxtext.jsonl and a section to tpu-aot-vs-maxtext.md."""
    title = (
        "# jaxlm vs MaxText, compiled ahead of time for a TPU slice\n\n"
        "`python -m benchmarks.aot_vs_maxtext`: what libtpu's compiler reports "
        "per chip for each side's whole train step (see the script's docstring "
        "for how every number is obtained). No TPU ran.\n"
    )
    v = run["versions"]
    lines = [
        f"\n## {run['date']} — {run['topology']} ({run.get('chips', '?')} chips), "
        f"{MAXTEXT_MODEL} shape\n",
        f"- host: {run['cpu']}, {run['cores']} cores; compiled with jax {v.get('jax')}, "
        f"jaxlib {v.get('jaxlib')}, libtpu {v.get('libtpu')}, maxtext {v.get('maxtext')}, "
        f"flax {v.get('flax')}, optax {v.get('optax')} (one venv for both sides); "
        f"script wall time {run['wall_s'] / 60:.1f} min",
        f"- devices: `get_topology_desc({run.get('topology_kwargs')})`, device kind "
        f"{run.get('device_kind')}",
        f"- both sides: global batch {run['global_batch']} ({run['per_chip_batch']} per chip), "
        f"seq {run['seq']}, remat full, {run['layers']} layers scanned, bf16 compute, fp32 "
        "weights and AdamW state, fsdp over all chips, packed rows (segment ids)",
        f"- MaxText: `maxtext.trainers.pre_train.train_compile` with "
        f"`{' '.join(run.get('maxtext_argv') or [])}` (attention=dot_product for xla rows, "
        "flash for splash rows; a row that names more settings adds them to these, and its "
        "ratio cells are the same-attention jaxlm row over it)",
        f"- jaxlm ({run.get('jaxlm_checkout', '?')}): `{JAXLM_CONFIG.replace('.', '/')}.py` "
        f"train step (jaxlm.step) with `{run.get('jaxlm_overrides')}`",
        "- memory: `compiled.memory_analysis()` of the scanned program, per chip; total = "
        "arguments + outputs - aliased (donated) + temporaries (generated code excluded)",
        "- est. step s: `cost_analysis()['optimal_seconds']`, libtpu's roofline estimate. raw: "
        "the scanned program (the loop body counted once); scan-corrected: c1 + (L-1)(c2-c1) "
        "from 1- and 2-layer unrolled compiles of the same step, both sides compiled with "
        f"LIBTPU_INIT_ARGS=`{ESTIMATE_LIBTPU_ARGS}` (windowed-einsum loops are counted once "
        "too) and with remat recomputation kept (prevent_cse=True: MaxText's own choice "
        "when unrolled, forced for jaxlm, whose prevent_cse=False for a rolled scan would let "
        "XLA merge the recompute away once the 1-layer loop is removed); + attention floor "
        "(splash "
        "rows only, same for both sides): 4x the causal QK^T and PV FLOPs at the chip's peak "
        f"({_f(run.get('attention_floor_s'), '.3f')} s), for a Pallas kernel the cost model may "
        "not count (compare TFLOP per layer with the xla rows). Ratios use the last estimate "
        "column.",
    ]
    return results_table.record(
        directory / "tpu-aot-vs-maxtext",
        [run],
        "\n".join(lines),
        COLUMNS,
        cells,
        mode="section",
        title=title,
    )


def checkout_state() -> str:
    """The jaxlm commit compiled, and which of its files had uncommitted changes."""

    def git(*cmd):
        proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--short", "--untracked-files=no", "--", "jaxlm", "configs").split("\n")
    dirty = [line.split()[-1] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def compare(args) -> None:
    start = time.perf_counter()
    model, cores, _ = results_table.cpu()
    python = shared_python(pathlib.Path(os.path.expanduser(args.cache_dir)))
    print(f"host: {model}, {cores} cores; compiling in {python}", flush=True)
    shapes = [("full", args.layers, True)]
    if args.extrapolate:
        shapes += [("one", 1, False), ("two", 2, False)]
    compiles = {}

    def variants(flag):
        return [v.split(":", 1) for v in (flag or "").split(",") if v]

    for attention in args.attention.split(","):
        for side, overrides in [
            ("maxtext", ""),
            *(("maxtext", o) for a, o in variants(args.maxtext_variants) if a == attention),
            ("jaxlm", ""),
            *(("jaxlm", o) for a, o in variants(args.jaxlm_variants) if a == attention),
        ]:
            compiles[f"{side}/{attention}" + (f"/{overrides}" if overrides else "")] = {
                name: compile_once(python, side, attention, layers, scanned, args, overrides)
                for name, layers, scanned in shapes
            }
    rows = []
    for key, runs in compiles.items():
        side, attention, *variant = key.split("/", 2)
        rows.append(
            summarise(
                side, attention, runs, args, *_chip(compiles), variant=variant[0] if variant else ""
            )
        )
    cells = table_rows(rows)
    print(
        f"\n{args.topology}, {args.per_chip_batch} sequences of {args.seq} per chip, "
        f"remat full, {args.layers} layers scanned; per chip:",
        flush=True,
    )
    print_table(cells)
    jaxlm_full = next(
        (r["full"] for k, r in compiles.items() if k.startswith("jaxlm/") and "chips" in r["full"]),
        {},
    )
    maxtext_full = next(
        (
            r["full"]
            for k, r in compiles.items()
            if k.startswith("maxtext/") and k.count("/") == 1 and "argv" in r["full"]
        ),
        {},
    )
    any_result = next(
        (r for runs in compiles.values() for r in runs.values() if "versions" in r), {}
    )
    wall = time.perf_counter() - start
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": model,
        "cores": cores,
        "topology": args.topology,
        "chips": jaxlm_full.get("chips"),
        "topology_kwargs": jaxlm_full.get("topology_kwargs"),
        "device_kind": jaxlm_full.get("device_kind"),
        "per_chip_batch": args.per_chip_batch,
        "seq": args.seq,
        "layers": args.layers,
        "global_batch": args.per_chip_batch * (jaxlm_full.get("chips") or 0),
        "versions": any_result.get("versions", {}),
        "maxtext_argv": maxtext_full.get("argv"),
        "jaxlm_overrides": jaxlm_full.get("overrides"),
        "jaxlm_checkout": checkout_state(),
        "attention_floor_s": attention_floor_s(args, *_chip(compiles)),
        "wall_s": wall,
        "rows": rows,
        "compiles": compiles,
    }
    print(
        f"\nscript wall time {wall / 60:.1f} min; appended to "
        f"{record(pathlib.Path(args.results), run, cells)}",
        flush=True,
    )


def _chip(compiles: dict) -> tuple[float | None, int | None]:
    """The chip's peak FLOP/s as jaxlm.metrics knows it, and the model's attention width
    (heads x head_dim), both reported by a jaxlm worker."""
    found = next(
        (r for runs in compiles.values() for r in runs.values() if r.get("peak_flops_per_chip")), {}
    )
    return found.get("peak_flops_per_chip"), found.get("d_attn")


def main() -> None:
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topology", default="v5p-64", help="a slice name of MaxText's accelerator map")
    p.add_argument("--attention", default="xla,splash", help="xla and/or splash, in this order")
    p.add_argument(
        "--per_chip_batch",
        type=int,
        default=8,
        help="sequences per chip (8 x 32 chips = configs/7b.py's 256)",
    )
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32, help="the model's layers (llama2-7b: 32)")
    p.add_argument(
        "--maxtext_variants",
        default="xla:float32_qk_product=true+float32_logits=true",
        help="extra MaxText rows: attention:key=value[+key=value...], comma-separated "
        "('' for none)",
    )
    p.add_argument(
        "--jaxlm_variants",
        default="xla:model.float32_attention_scores=false",
        help="extra jaxlm rows: attention:section.field=value[+...], comma-separated ('' for none)",
    )
    p.add_argument("--overrides", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--no_extrapolate",
        dest="extrapolate",
        action="store_false",
        help="skip the 1- and 2-layer compiles (raw estimates only)",
    )
    p.add_argument("--cache_dir", default="~/.cache/jaxlm-peers", help="MaxText's venv")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--lock", help="flock this file while each compile runs")
    p.add_argument("--worker", choices=("maxtext", "jaxlm"), help=argparse.SUPPRESS)
    p.add_argument("--worker_layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--scanned", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        # --layers stays the model's depth; the worker compiles --worker_layers of it.
        args.full_layers, args.layers = args.layers, args.worker_layers or args.layers
        args.scanned = bool(args.scanned)
        run_worker(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
