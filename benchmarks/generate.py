"""Generation speed: time to first token and decode tokens/s of a randomly initialised model.

    python -m benchmarks.generate [--config=configs/125m.py] [--batch=1,8] [--new_tokens=128]

The weights are random (speed does not depend on them), every row generates all its new
tokens (no EOS), and each shape runs once untimed first, so compiling is not counted.
Time to first token: from the call to the first token on the host (prefill of the prompt
batch, one sample). Decode tokens/s: the tokens of all rows after the first, over the time
from the first token to the last. Rows go to benchmarks/results/generate-<host>.{jsonl,md}.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import results_table
from jaxlm import config as config_lib
from jaxlm import generate as gen
from jaxlm import model as model_lib
from jaxlm import param_layout, platforms

RESULTS = pathlib.Path(__file__).parent / "results"


def load_config(path: str, dtype: str | None):
    """The config file's ConfigDict as generation runs it: one device, XLA attention, no
    remat, compute in `dtype` (None: the file's)."""
    spec = importlib.util.spec_from_file_location("config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if dtype:
        config.model.dtype = dtype
    config.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    config.train.update(dict(global_batch_size=1, grad_accum_steps=1))
    config.model.update(dict(attention="xla", remat="none"))
    return config


def model_config(path: str, dtype: str | None):
    config = load_config(path, dtype)
    derived = config_lib.validate(config, 1)
    return config_lib.model_config(config, derived), config.data.seq_len, derived.n_params


def timed(params, cfg, prompts, new_tokens, max_len, sampling) -> tuple[float, float]:
    """(seconds to the first token, seconds from the first token to the last)."""
    start = time.perf_counter()
    first = None
    for step, _ in enumerate(
        gen.stream(params, cfg, prompts, max_len=max_len, max_new_tokens=new_tokens, **sampling)
    ):
        if step == 0:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first


def main():
    platforms.skip_absent_tpu()  # before JAX starts: no libtpu noise on a CPU host
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/125m.py")
    parser.add_argument("--dtype", default="float32", help="compute dtype ('' = the config's)")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    cfg, max_len, n_params = model_config(args.config, args.dtype or None)
    sampling = dict(temperature=args.temperature, top_p=args.top_p)
    params = jax.jit(
        lambda: nn.unbox(
            model_lib.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))[
                "params"
            ]
        )
    )()
    params, cfg = param_layout.for_decoding(params, cfg, free=True)  # as run.load gives them
    model, cores, slug = (
        results_table.cpu()
        if jax.default_backend() == "cpu"
        else (
            jax.devices()[0].device_kind,
            0,
            jax.devices()[0].device_kind.lower().replace(" ", "-"),
        )
    )
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = (
            np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        )
        compile_start = time.perf_counter()
        timed(params, cfg, prompts, args.new_tokens, max_len, sampling)  # compiles
        compile_s = time.perf_counter() - compile_start
        runs = [
            timed(params, cfg, prompts, args.new_tokens, max_len, sampling)
            for _ in range(args.repeats)
        ]
        ttft = statistics.median(r[0] for r in runs)
        decode_s = statistics.median(r[1] for r in runs)
        tokens_per_s = batch * (args.new_tokens - 1) / decode_s
        sampling_name = (
            "greedy" if args.temperature == 0 else f"T {args.temperature} top_p {args.top_p}"
        )
        row = {
            "date": datetime.date.today().isoformat(),
            "config": args.config,
            "params": n_params,
            "dtype": str(jnp.dtype(cfg.dtype)),
            "batch": batch,
            **sampling,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}",
            "host": f"{model} ({cores} cores)" if cores else model,
            "first_run_s_with_compile": compile_s,
            "ttft_ms_median": 1e3 * ttft,
            "decode_ms_per_step_median": 1e3 * decode_s / (args.new_tokens - 1),
            "decode_tokens_per_second": tokens_per_s,
            "repeats": args.repeats,
            "jax_version": jax.__version__,
            "note": args.note,
        }
        table = results_table.record(
            RESULTS / f"generate-{slug}",
            [row],
            "# Generation speed (python -m benchmarks.generate)\n\nRandom weights; prompts of "
            "prompt_len tokens, every row generates new_tokens (no EOS); medians of "
            "the repeats after one untimed run that compiles. TTFT: call to first token on the "
            "host. Decode tokens/s: all rows' tokens after the first over the time from the "
            "first token to the last.",
            [
                "date",
                "config",
                "params",
                "dtype",
                "device",
                "batch",
                "sampling",
                "prompt",
                "new tokens",
                "first run s (compiles)",
                "TTFT ms",
                "decode ms/step",
                "decode tokens/s",
                "jax",
                "note",
            ],
            [
                [
                    row["date"],
                    args.config,
                    f"{n_params / 1e6:.0f}M",
                    row["dtype"],
                    row["device"],
                    batch,
                    sampling_name,
                    args.prompt_len,
                    args.new_tokens,
                    f"{compile_s:.1f}",
                    f"{1e3 * ttft:.0f}",
                    f"{row['decode_ms_per_step_median']:.1f}",
                    f"{tokens_per_s:.1f}",
                    jax.__version__,
                    args.note,
                ]
            ],
        )
        print(
            f"batch {batch}: TTFT {1e3 * ttft:.0f} ms, decode {tokens_per_s:.1f} tokens/s "
            f"({row['decode_ms_per_step_median']:.1f} ms/step) -> {table}",
            flush=True,
        )


if __name__ == "__main__":
    main()
