"""Peak host memory (RSS) of python -m jaxlm.convert, both ways, on random Llama checkpoints.

    python -m benchmarks.convert_memory --layers=2,4,8 [--workdir=/tmp/convert_memory]

Each checkpoint has Llama-2-7B's shapes (d_model 4096, d_ff 11008, 32 heads, vocab 32000) in
bfloat16 with `--layers` layers, written as ~1 GB safetensors shards. Each conversion runs in
its own process, which reports its own peak RSS (ru_maxrss: anonymous memory plus the file
pages it has mapped, so safetensors' memory maps count). Peak = fixed + slope * model bytes
is fitted over the sizes, and extrapolated to 32 layers (the 7B model, 13.5 GB).
Results go to benchmarks/results/convert-<host>.jsonl and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from benchmarks import results_table

D, FF, HEADS, VOCAB = 4096, 11008, 32, 32000
RESULTS = pathlib.Path(__file__).parent / "results"

_MEASURE = """
import resource, sys
from jaxlm import convert
convert.main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def llama_shapes(layers: int) -> dict:
    shapes = {
        "model.embed_tokens.weight": (VOCAB, D),
        "model.norm.weight": (D,),
        "lm_head.weight": (VOCAB, D),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (D, D),
                p + "self_attn.k_proj.weight": (D, D),
                p + "self_attn.v_proj.weight": (D, D),
                p + "self_attn.o_proj.weight": (D, D),
                p + "mlp.gate_proj.weight": (FF, D),
                p + "mlp.up_proj.weight": (FF, D),
                p + "mlp.down_proj.weight": (D, FF),
                p + "input_layernorm.weight": (D,),
                p + "post_attention_layernorm.weight": (D,),
            }
        )
    return shapes


def write_checkpoint(directory: pathlib.Path, layers: int, shard_bytes: int = 1 << 30) -> int:
    """A random bfloat16 Llama-7B-shaped checkpoint of `layers` layers; returns its bytes.
    Written shard by shard, so this process holds one shard at a time."""
    import ml_dtypes
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = llama_shapes(layers)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        filename = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:  # small normal values: bfloat16 bits of N(0, 0.02) floats
            values = rng.standard_normal(shapes[name], np.float32) * 0.02
            tensors[name] = values.astype(ml_dtypes.bfloat16)
            del values
        save_file(tensors, directory / filename, metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: filename for name in names})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": VOCAB,
                "hidden_size": D,
                "intermediate_size": FF,
                "num_hidden_layers": layers,
                "num_attention_heads": HEADS,
                "num_key_value_heads": HEADS,
                "hidden_act": "silu",
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "torch_dtype": "bfloat16",
            }
        )
    )
    return total


def peak_rss(args: list[str]) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of one conversion in a fresh process."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    kb = [line for line in result.stdout.splitlines() if line.startswith("MAXRSS_KB")][-1]
    return int(kb.split()[1]) * 1024, seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", default="2,4,8")
    p.add_argument("--workdir", default="/tmp/convert_memory")
    p.add_argument("--host", default="amd-epyc-2c")
    args = p.parse_args()
    work = pathlib.Path(args.workdir)
    rows = []
    for layers in [int(n) for n in args.layers.split(",")]:
        shutil.rmtree(work, ignore_errors=True)
        model_bytes = write_checkpoint(work / "hf", layers)
        imported, t_in = peak_rss([f"--from_hf={work / 'hf'}", f"--to={work / 'run'}"])
        exported, t_out = peak_rss(
            [f"--from_run={work / 'run'}", f"--to_hf={work / 'out'}", "--max_shard_size=1GB"]
        )
        row = {
            "layers": layers,
            "model_bytes": model_bytes,
            "import_peak_rss": imported,
            "import_seconds": round(t_in, 1),
            "export_peak_rss": exported,
            "export_seconds": round(t_out, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    shutil.rmtree(work, ignore_errors=True)
    write_results(rows, args.host)


def write_results(rows: list[dict], host: str) -> None:
    history = RESULTS / f"convert-{host}.jsonl"
    before = history.read_text().splitlines() if history.exists() else []
    # The table holds every size ever measured here (the newest row of each).
    latest = {r["layers"]: r for r in [*map(json.loads, before), *rows]}
    table_rows = [latest[n] for n in sorted(latest)]
    partial = [r for r in table_rows if r["layers"] < 32]
    size = np.array([r["model_bytes"] for r in partial], float)
    full = 2 * sum(int(np.prod(s)) for s in llama_shapes(32).values())
    cells = [
        [
            r["layers"],
            f"{r['model_bytes'] / 1e9:.2f}",
            f"{r['import_peak_rss'] / 1e9:.2f}",
            f"{r['import_peak_rss'] / r['model_bytes']:.2f}",
            f"{r['export_peak_rss'] / 1e9:.2f}",
            f"{r['export_peak_rss'] / r['model_bytes']:.2f}",
        ]
        for r in table_rows
    ]
    footer = []
    if len(partial) > 1:
        footer += [
            "",
            f"Extrapolated (a least-squares line peak = fixed + slope * model bytes "
            f"over the rows under 32 layers) to 32 layers, {full / 1e9:.1f} GB, to "
            "compare with the 32-layer row where there is one:",
            "",
        ]
        for way in ("import", "export"):
            slope, fixed = np.polyfit(size, [r[f"{way}_peak_rss"] for r in partial], 1)
            peak = fixed + slope * full
            footer.append(
                f"- {way}: fixed {fixed / 1e9:.2f} GB + {slope:.2f} x model -> "
                f"{peak / 1e9:.1f} GB at 7B = {peak / full:.2f} x the model "
                "(extrapolated, not measured)"
            )
    results_table.record(
        RESULTS / f"convert-{host}",
        rows,
        "# Peak host RSS of python -m jaxlm.convert (Llama-2-7B shapes, bfloat16)\n\n"
        f"Host: {host}. Measured by benchmarks/convert_memory.py (ru_maxrss of a fresh "
        "process per conversion).",
        [
            "layers",
            "model GB",
            "import peak GB",
            "import / model",
            "export peak GB",
            "export / model",
        ],
        cells,
        mode="replace",
        footer="\n".join(footer) + "\n" if footer else "",
    )


if __name__ == "__main__":
    main()
