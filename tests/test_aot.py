"""jaxlm.aot (with jaxlm.topology, jaxlm.program_cost, jaxlm.plan): slice names, the CLI's
reports and exit codes, the loop-corrected FLOPs, the planner, and memory under remat with
the layer stack unrolled.

CPU compiles use the 8 simulated devices (`cpu:8`); TPU compiles need libtpu (the compiler
only, no TPU) and are marked slow.
"""

import json
import subprocess
import sys

import pytest

from configs import tiny
from jaxlm import aot, metrics, plan, program_cost
from jaxlm import config as config_lib
from jaxlm import topology as topology_lib


def _needs_libtpu():
    pytest.importorskip(
        "libtpu",
        reason="libtpu is not installed (pip install -e '.[tpu]'): "
        "no TPU compiler to compile for a TPU slice",
    )


def small_config(**model):
    """A model that compiles in seconds but still has a layer loop to correct for."""
    config = tiny.get_config()
    m = config.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 512, 128, 2, 4, 4, 384
    m.update(model)
    config.data.seq_len = 64
    config.train.global_batch_size = 16
    return config


SMALL_FLAGS = [
    "--config.model.vocab_size=512",
    "--config.model.d_model=128",
    "--config.model.n_layers=2",
    "--config.model.n_kv_heads=4",
    "--config.model.d_ff=384",
    "--config.data.seq_len=64",
    "--config.train.global_batch_size=16",
]


def run_cli(repo, *args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.aot", "--config=configs/tiny.py", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=repo,
    )


@pytest.mark.parametrize(
    "name, topology_name, chips",
    [
        ("v5p-64", "v5p:4x4x2", 32),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-128", "v4:4x4x4", 64),
        ("v5e-256", "v5e:16x16", 256),
        ("v6e-256", "v6e:16x16", 256),
        ("v5e-8", "v5e:2x4", 8),
        ("v5p:4x4x4", "v5p:4x4x4", 64),
        ("cpu:8", "cpu:8", 8),
    ],
)
def test_slice_names(name, topology_name, chips):
    topology = topology_lib.parse_topology(name)
    assert (topology.topology_name, topology.chips) == (topology_name, chips)


def test_num_slices_multiplies_chips():
    assert topology_lib.parse_topology("v5e-256", num_slices=2).chips == 512


def test_multi_slice_compiles_with_data_across_slices(repo):
    """Two v5e-4 slices: data over DCN (jaxlm.sharding's hybrid mesh); mesh.data=1 cannot
    cross slices and is a config error before compiling."""
    _needs_libtpu()
    config = small_config(dtype="bfloat16")
    config.mesh.update(data=2, fsdp=-1)
    (report,) = aot.compile_for(
        config, "v5e-4", num_slices=2, programs=("eval_step",), loop_correction=False
    )
    assert report.fits and report.num_slices == 2 and report.devices == 8
    config.mesh.data = 1
    with pytest.raises(config_lib.ConfigError, match="mesh.data"):
        aot.compile_for(config, "v5e-4", num_slices=2)


@pytest.mark.parametrize("name", ["v7-8", "v5p-3", "tpu", "v5e:2x2x2"])
def test_unknown_topology_lists_the_known_forms(name):
    with pytest.raises(topology_lib.TopologyError) as e:
        topology_lib.parse_topology(name)
    for form in ("v5p-N", "v5e-N", "v5p:4x4x4", "cpu:N"):
        assert form in str(e.value)


def test_missing_libtpu_names_the_install_command(monkeypatch):
    real = topology_lib.importlib.util.find_spec
    monkeypatch.setattr(
        topology_lib.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "libtpu" else real(name, *a),
    )
    with pytest.raises(topology_lib.TopologyError, match=r"pip install -e '\.\[tpu\]'"):
        topology_lib.topology_devices(topology_lib.parse_topology("v5p-8"))


def test_tpu_figures_come_from_one_table():
    spec = topology_lib.device_spec(topology_lib.parse_topology("v5p-128"), 64)
    assert spec.hbm_bytes == 95 * 2**30 and spec.peak_flops == 459e12
    assert spec.hbm_bytes_per_s == metrics.TPU_CHIP_SPECS["v5p"]["hbm_bytes_per_s"]
    # compile-only v4 devices are TensorCores: half a chip each
    v4 = topology_lib.parse_topology("v4-8")
    assert topology_lib.device_spec(v4, 8).hbm_bytes == 16 * 2**30


@pytest.mark.slow
def test_cli_reports_a_fitting_program_as_json_and_exits_0(repo, tmp_path):
    cache = tmp_path / "cache.json"
    result = run_cli(repo, "--topology=cpu:8", "--json", f"--cache={cache}", *SMALL_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["program"] for r in reports] == ["train_step", "eval_step"]
    for r in reports:
        assert r["fits"] and r["topology"] == "cpu:8" and r["chips"] == 8
        assert r["total_bytes"] == r["argument_bytes"] + r["temp_bytes"] + r["output_bytes"]
        assert 0 < r["total_bytes"] < r["hbm_bytes"]
        assert r["flops"] > 0 and r["flops_formula"] > 0 and r["compile_seconds"] > 0
        assert r["estimated_step_seconds"] > 0 and r["tokens_per_second"] > 0 and 0 < r["mfu"]
        assert "roofline" in r["estimate_source"] or "optimal_seconds" in r["estimate_source"]

    # The same programs against 1 MiB of memory: nothing recompiles (the cache), exit 3.
    result = run_cli(repo, "--topology=cpu:8", f"--cache={cache}", "--hbm_gib=0.001", *SMALL_FLAGS)
    assert result.returncode == aot.NO_FIT_EXIT, result.stderr[-3000:]
    assert "DOES NOT FIT" in result.stdout and "ESTIMATED step time" in result.stdout


@pytest.mark.parametrize("topology", ["cpu:8", "v5p-64"])
def test_config_error_comes_before_compiling(repo, topology):
    result = run_cli(
        repo, f"--topology={topology}", "--cache=", "--config.mesh.tensor=8", timeout=120
    )
    assert result.returncode == aot.USAGE_EXIT
    assert "model.n_heads" in result.stderr and "mesh.tensor=8" in result.stderr, result.stderr
    assert "compiled" not in result.stdout


def test_unknown_topology_exits_2(repo):
    result = run_cli(repo, "--topology=v9-8", "--cache=", timeout=120)
    assert result.returncode == aot.USAGE_EXIT and "known forms" in result.stderr


@pytest.mark.slow
def test_loop_corrected_flops_agree_with_the_formula():
    """Without remat the compiled step does the model FLOPs, and a little more (the
    attention's full square at this length, norms, the optimizer): within 15%. XLA's raw
    count of the scanned program is far lower, having counted one layer of two and one
    loss chunk of two. The step is two microbatches: twice the compiled one."""
    config = small_config(remat="none")
    config.train.loss_chunks = 2
    config.train.grad_accum_steps = 2
    (report,) = aot.compile_for(config, "cpu:8", programs=("train_step",))
    assert 1.0 <= report.flops / report.flops_formula < 1.15, report
    assert report.tokens_per_step == 16 * 64 and "x 2 microbatches" in report.estimate_source
    topology = topology_lib.parse_topology("cpu:8")
    devices = topology_lib.topology_devices(topology)
    raw = program_cost.compile_program(config, devices, topology, "train_step")
    assert 2 * raw.flops < 0.75 * report.flops


def test_the_tpu_compilers_out_of_memory_refusal_is_a_program_that_does_not_fit():
    message = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
        "HLO temporaries (128.88G) exceeds available HBM (95.74G)."
    )
    compiled = program_cost._out_of_memory(message, 1.0)
    assert compiled.temp_bytes == int(128.88 * 2**30) and "128.88G" in compiled.out_of_memory


def test_splash_attention_flops_by_formula():
    config = small_config(remat="full")
    derived = config_lib.validate(config, 8)
    b, h, seq, d, layers = 2, 4, 64, 32, config.model.n_layers
    forward = 2 * (2 * b * h * seq * seq * d / 2) * layers
    assert aot.splash_attention_flops(config, derived, b, train=False) == forward
    assert aot.splash_attention_flops(config, derived, b, train=True) == forward * 4.5
    config.model.remat = "none"
    assert aot.splash_attention_flops(config, derived, b, train=True) == forward * 3.5


@pytest.mark.slow
def test_plan_ranks_compiled_setups_and_prints_a_train_command():
    config = small_config(remat="full")
    lines = []
    cands = plan.plan(config, "cpu:8", max_compiles=1, log=lines.append)
    assert cands and cands[0].report is not None and cands[0].fits
    text = plan.format_plan(cands, "configs/tiny.py")
    assert "python -m jaxlm.train --config=configs/tiny.py --config.model.remat=" in text


def test_plan_says_plainly_when_nothing_fits():
    cands = plan.plan(small_config(), "cpu:8", hbm_bytes=1024, log=lambda s: None)
    assert not any(c.fits for c in cands)
    assert "NOTHING FITS" in plan.format_plan(cands, "configs/tiny.py")


@pytest.mark.slow
def test_7b_fits_a_v5p_slice(repo):
    """configs/7b.py as shipped (fsdp over 64 chips, remat full, splash attention): the train
    step's state and temporaries fit in 95 GiB per chip, with far fewer temporaries than
    with XLA attention."""
    _needs_libtpu()
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_7b", repo / "configs" / "7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    (report,) = aot.compile_for(config, "v5p-128", programs=("train_step",), loop_correction=False)
    assert report.fits and report.chips == 64
    assert 5 * 2**30 < report.total_bytes < 95 * 2**30, report
    # "auto" is splash on TPU; XLA's attention holds each layer's float32 scores instead
    # (measured: 11.2 against 19.5 GiB of temporaries).
    config.model.attention = "xla"
    (xla,) = aot.compile_for(config, "v5p-128", programs=("train_step",), loop_correction=False)
    assert report.temp_bytes < 0.7 * xla.temp_bytes, (report.temp_bytes, xla.temp_bytes)


@pytest.mark.slow
def test_remat_bounds_memory_with_the_layers_unrolled():
    """Remat under a fully unrolled stack (scan_unroll = n_layers: no loop) must still bound
    memory. It did not while model.py passed prevent_cse=False: with no loop between them
    XLA merged the backward's recomputation with the forward. On v5e:2x2, 8 layers of
    d_model 256 at 1024 tokens, unrolled, temporaries with remat full were 300 MiB then
    against about 650 without remat; with prevent_cse for unrolled stacks 88.5 MiB against
    654 (libtpu 0.0.42, TPU forms of attention: 8 query blocks)."""
    _needs_libtpu()
    topology = topology_lib.parse_topology("v5e:2x2")
    devices = topology_lib.topology_devices(topology)
    temps = {}
    for remat in ("none", "full"):
        config = small_config(
            n_layers=8,
            d_model=256,
            d_ff=768,
            vocab_size=1024,
            dtype="bfloat16",
            remat=remat,
            scan_unroll=8,
        )
        config.data.seq_len = 1024
        compiled = program_cost.compile_program(config, devices, topology, "train_step")
        temps[remat] = compiled.temp_bytes
    assert temps["full"] <= 0.25 * temps["none"], temps
