"""Will it fit? Compile configs for real TPU slices on this host and tabulate memory per chip.

    python -m benchmarks.tpu_aot                      # every row of ROWS
    python -m benchmarks.tpu_aot --only=7b            # rows whose config name contains "7b"

Each row compiles the config's real train step with the TPU compiler (libtpu, no TPU needed,
see jaxlm.aot) for one slice and one attention kernel, and records per chip: arguments,
temporaries, total against the chip's HBM, and the compiler's estimated step time (an
estimate, corrected for loops as jaxlm.aot says). The table goes to
benchmarks/results/tpu-aot.md (and .jsonl), with the host, jax and libtpu versions.
"""

from __future__ import annotations

import importlib
import json
import time

import jax
from absl import app, flags

from benchmarks import results_table
from jaxlm import aot, platforms

_gib = results_table.gib

# (config module, slice, attention): the slices each config's docstring promises.
ROWS = (
    ("7b", "v5p-128", "xla"),
    ("7b", "v5p-128", "splash"),
    ("7b", "v5e-256", "splash"),
    ("7b", "v6e-256", "splash"),
    ("llama3_8b", "v5p-128", "splash"),
    ("70b", "v5p-256", "splash"),
)

_ONLY = flags.DEFINE_string("only", "", "Run only rows whose 'config slice attention' has this.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results", "Where the table goes.")


def run_row(config_name: str, slice_name: str, attention: str) -> dict:
    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.model.attention = attention
    start = time.perf_counter()
    report = aot.compile_for(config, slice_name, programs=("train_step",))[0]
    return {
        "config": f"configs/{config_name}.py",
        "slice": slice_name,
        "attention": attention,
        "remat": config.model.remat,
        "batch x seq": f"{config.train.global_batch_size} x {config.data.seq_len}",
        "wall_s": time.perf_counter() - start,
        **json.loads(report.line()),
    }


COLUMNS = [
    "config",
    "slice",
    "attention",
    "remat",
    "batch x seq",
    "arguments GiB",
    "temporaries GiB",
    "total GiB",
    "HBM GiB",
    "fits",
    "est. step s",
    "est. MFU",
    "estimate from",
]


def table_cells(r: dict) -> list:
    return [
        r["config"],
        f"{r['slice']} ({r['topology_name']})",
        r["attention"],
        r["remat"],
        r["batch x seq"],
        _gib(r["argument_bytes"]),
        _gib(r["temp_bytes"]),
        _gib(r["total_bytes"]),
        _gib(r["hbm_bytes"]),
        "yes" if r["fits"] else "NO",
        f"{r['estimated_step_seconds']:.2f}",
        f"{100 * r['mfu']:.0f}%",
        r["estimate_source"],
    ]


def main(argv):
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    del argv
    rows = []
    for row in ROWS:
        if _ONLY.value and _ONLY.value not in " ".join(row):
            continue
        result = run_row(*row)
        rows.append(result)
        print(
            f"{row}: total {_gib(result['total_bytes'])} of {_gib(result['hbm_bytes'])} GiB, "
            f"temporaries {_gib(result['temp_bytes'])} GiB, estimated step "
            f"{result['estimated_step_seconds']:.2f} s ({result['wall_s']:.0f} s to compile)",
            flush=True,
        )
    cpu = results_table.cpu()
    header = (
        f"# TPU memory per chip from the TPU compiler ({time.strftime('%Y-%m-%d')})\n\n"
        f"Compiled on {cpu[0]} ({cpu[1]}), no TPU present: jax {jax.__version__}, "
        f"libtpu {results_table.package_version('libtpu')}. `python -m benchmarks.tpu_aot`; "
        "per chip, train "
        "step, arguments + temporaries + outputs not aliased to donated arguments. Step "
        "times are the compiler's cost model (estimates, not measurements; jaxlm.aot "
        "says how loops and Pallas kernels are counted)."
    )
    table = results_table.record(
        f"{_RESULTS.value}/tpu-aot",
        rows,
        header,
        COLUMNS,
        [table_cells(r) for r in rows],
        mode="replace",
        spaced_rule=True,
    )
    print(table.read_text())


if __name__ == "__main__":
    app.run(main)
