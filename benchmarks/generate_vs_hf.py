"""Generation speed, jaxlm against transformers' generate, on one host and the same weights.

    python -m benchmarks.generate_vs_hf [--config=configs/125m.py] [--batch=1,8] [--rounds=3]

A random LlamaForCausalLM with the config's shape is saved once (float32 safetensors); jaxlm
reads those very tensors (jaxlm.hf_weights.read_hf_params). Both decode greedily from the same
random prompts, every row making all `new_tokens` (no EOS stop). Each measurement is its own
process, engines alternating (jaxlm, transformers, transformers, jaxlm, ...), so a change in
the host's load falls on both; a process runs once untimed (compiles, warms caches) and then
`repeats` times. Figures are medians over all timed runs of all rounds:

    TTFT            call to the first new token on the host (prefill + one sample)
    decode tokens/s batch * (new_tokens - 1) / (time from the first new token to the last)

transformers runs as its users run it by default: eager PyTorch, its dynamic KV cache,
`torch.inference_mode`, threads = cores. Rows go to benchmarks/results/generate-vs-hf-<host>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np

from benchmarks import results_table
from jaxlm import platforms

RESULTS = pathlib.Path(__file__).parent / "results"
ENGINES = ("jaxlm", "transformers")


def load_config(path: str):
    """The config file's ConfigDict as benchmarks.generate runs it, weights in float32 too
    (bf16 matmuls are slow on x86 CPUs): what both engines run. (Imported here: the
    transformers worker never loads JAX.)"""
    from benchmarks import generate as generate_bench

    config = generate_bench.load_config(path, "float32")
    config.model.param_dtype = "float32"
    return config


def save_random_hf_model(config, out: pathlib.Path) -> int:
    """A randomly initialised transformers Llama of the config's shape, saved to `out`."""
    import torch
    import transformers

    from jaxlm import config as config_lib
    from jaxlm import hf_config

    derived = config_lib.validate(config, 1)
    fields = hf_config.from_jaxlm(config.model, derived.head_dim, "float32", config.data.seq_len)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    model.save_pretrained(out)
    return derived.n_params


def prompts(vocab: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(4, vocab, (batch, length))


# ---------------------------------------------------------------- one engine, one process


def run_jaxlm(config, hf_dir: pathlib.Path, batch: int, length: int, new_tokens: int, runs: int):
    import jax

    # The persistent cache spares later rounds the compile (never timed anyway).
    jax.config.update("jax_compilation_cache_dir", str(hf_dir / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from jaxlm import config as config_lib
    from jaxlm import generate as gen
    from jaxlm import hf_weights, param_layout

    derived = config_lib.validate(config, 1)
    cfg = config_lib.model_config(config, derived)
    fields = dict(config.model, head_dim=derived.head_dim)
    params, cfg = param_layout.for_decoding(
        jax.device_put(hf_weights.read_hf_params(hf_dir, fields, "float32")), cfg, free=True
    )
    tokens = prompts(cfg.vocab_size, batch, length).tolist()
    outputs = []
    for _ in range(runs + 1):
        start, stamps, out = time.perf_counter(), [], []
        for new, _, _ in gen.stream(
            params,
            cfg,
            tokens,
            max_len=config.data.seq_len,
            max_new_tokens=new_tokens,
            temperature=0.0,
        ):
            stamps.append(time.perf_counter())
            out.append(new)
        outputs.append((start, stamps, np.stack(out, 1)))
    return outputs[1:]


def run_transformers(hf_dir: pathlib.Path, batch: int, length: int, new_tokens: int, runs: int):
    import torch
    import transformers

    class Clock(transformers.generation.streamers.BaseStreamer):
        """Stamps each push: the first is the prompt, then one per new token."""

        def __init__(self):
            self.stamps, self.tokens = [], []

        def put(self, value):
            self.stamps.append(time.perf_counter())
            self.tokens.append(value.reshape(batch, -1)[:, -1].numpy())

        def end(self):
            pass

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    ids = torch.tensor(prompts(model.config.vocab_size, batch, length))
    outputs = []
    for _ in range(runs + 1):
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
                streamer=clock,
            )
        outputs.append((start, clock.stamps[1:], np.stack(clock.tokens[1:], 1)))
    return outputs[1:]


def worker(args) -> None:
    hf_dir = pathlib.Path(args.hf_dir)
    if args.engine == "jaxlm":
        runs = run_jaxlm(
            load_config(args.config),
            hf_dir,
            args.worker_batch,
            args.prompt_len,
            args.new_tokens,
            args.repeats,
        )
    else:
        runs = run_transformers(
            hf_dir, args.worker_batch, args.prompt_len, args.new_tokens, args.repeats
        )
    for start, stamps, tokens in runs:
        print(
            json.dumps(
                {
                    "ttft_s": stamps[0] - start,
                    "decode_s": stamps[-1] - stamps[0],
                    "steps": len(stamps),
                    "tokens": tokens.tolist(),
                }
            ),
            flush=True,
        )


# ---------------------------------------------------------------- the comparison


def measure(args, engine: str, batch: int) -> list[dict]:
    flags = [
        f"--engine={engine}",
        f"--hf_dir={args.hf_dir}",
        f"--worker_batch={batch}",
        f"--config={args.config}",
        f"--prompt_len={args.prompt_len}",
        f"--new_tokens={args.new_tokens}",
        f"--repeats={args.repeats}",
    ]
    what = f"{engine} at batch {batch}"
    return results_table.worker_lines("benchmarks.generate_vs_hf", flags, what)


def main() -> None:
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/125m.py")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="processes per engine and batch")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process")
    parser.add_argument("--note", default="")
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--hf_dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return worker(args)

    import jax
    import torch
    import transformers

    host, cores, slug = results_table.cpu()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        args.hf_dir = tmp
        n_params = save_random_hf_model(load_config(args.config), pathlib.Path(tmp))
        for batch in [int(b) for b in args.batch.split(",")]:
            results = {engine: [] for engine in ENGINES}
            for r in range(args.rounds):
                for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                    results[engine] += measure(args, engine, batch)
                    print(
                        f"batch {batch} round {r} {engine}: "
                        f"{results[engine][-1]['decode_s']:.2f} s decode",
                        flush=True,
                    )
            summary = {}
            for engine, runs in results.items():
                decode_s = statistics.median(run["decode_s"] for run in runs)
                summary[engine] = {
                    "ttft_ms": 1e3 * statistics.median(run["ttft_s"] for run in runs),
                    "decode_tokens_per_second": batch * (args.new_tokens - 1) / decode_s,
                    "runs": len(runs),
                }
            # Random weights give near-flat logits, so float32 rounding may flip a greedy choice
            # late in a row; the share of equal tokens shows both decode the same model.
            same = np.mean(
                np.array(results["jaxlm"][0]["tokens"])
                == np.array(results["transformers"][0]["tokens"])
            )
            speedup = (
                summary["jaxlm"]["decode_tokens_per_second"]
                / summary["transformers"]["decode_tokens_per_second"]
            )
            row = {
                "date": datetime.date.today().isoformat(),
                "config": args.config,
                "params": n_params,
                "dtype": "float32",
                "batch": batch,
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "host": f"{host} ({cores} cores)",
                "load_average_at_start": load,
                "jax": jax.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "engines": summary,
                "decode_speedup": speedup,
                "same_greedy_tokens": float(same),
                "note": args.note,
            }
            j, t = summary["jaxlm"], summary["transformers"]
            table = results_table.record(
                RESULTS / f"generate-vs-hf-{slug}",
                [row],
                "# Generation: jaxlm vs transformers.generate "
                "(python -m benchmarks.generate_vs_hf)\n\nSame random float32 weights, same "
                "random prompts, greedy, every row makes all new tokens. Each figure is the "
                "median over one timed run in each of `rounds` processes per engine, the "
                "engines' processes alternating. TTFT: call to the first new token on the host. "
                "Decode tokens/s: batch * (new_tokens - 1) / (first new token to last). "
                "transformers: eager PyTorch, default dynamic cache, sdpa attention.",
                [
                    "date",
                    "config",
                    "host",
                    "load avg",
                    "batch",
                    "prompt",
                    "new tokens",
                    "jaxlm TTFT ms",
                    "transformers TTFT ms",
                    "jaxlm decode tok/s",
                    "transformers decode tok/s",
                    "speedup",
                    "same greedy tokens",
                    "versions",
                    "note",
                ],
                [
                    [
                        row["date"],
                        args.config,
                        row["host"],
                        f"{load:.1f}",
                        batch,
                        args.prompt_len,
                        args.new_tokens,
                        f"{j['ttft_ms']:.0f}",
                        f"{t['ttft_ms']:.0f}",
                        f"{j['decode_tokens_per_second']:.1f}",
                        f"{t['decode_tokens_per_second']:.1f}",
                        f"{speedup:.2f}x",
                        f"{same:.0%}",
                        f"jax {jax.__version__}, torch {torch.__version__}, transformers "
                        f"{transformers.__version__}",
                        args.note,
                    ]
                ],
            )
            print(
                f"batch {batch}: jaxlm {j['decode_tokens_per_second']:.1f} tok/s, TTFT "
                f"{j['ttft_ms']:.0f} ms | transformers {t['decode_tokens_per_second']:.1f} "
                f"tok/s, TTFT {t['ttft_ms']:.0f} ms | {speedup:.2f}x -> {table}",
                flush=True,
            )


if __name__ == "__main__":
    main()
