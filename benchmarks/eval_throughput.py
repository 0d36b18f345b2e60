"""lm-eval requests per second: jaxlm's harness model against the harness's Hugging Face model.

    python -m benchmarks.eval_throughput [--config=configs/125m.py] [--items=24] [--rounds=1]
        [--choice_chars=40]

One random LlamaForCausalLM of the config's shape (float32) is saved, imported as a jaxlm run
and exported back (so both read the same weights and the same tokenizer, a 4096-piece one
trained on the built-in corpus). The task is a local multiple-choice YAML task over `items`
items of four choices each, contexts (200 characters) and choices (`choice_chars`) cut from
the built-in corpus: `items * 4` loglikelihood requests. Each measurement is its own process,
engines alternating (jaxlm, hf, hf, jaxlm, ...) so a change in the host's load falls on both;
a process evaluates the task once untimed (jaxlm compiles a program per length bucket there;
the harness's model warms up) and then once timed. jaxlm runs as `python -m jaxlm.eval
--tasks` does (rows sorted by length, padded to length buckets, each item's context computed
once for its four choices); the harness's model as its users run it (`HFLM`, batch_size as
given, float32, CPU threads = cores). Rows go to benchmarks/results/eval-throughput-<host>.
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

from benchmarks import results_table
from jaxlm import platforms

RESULTS = pathlib.Path(__file__).parent / "results"
ENGINES = ("jaxlm", "hf")
TASK = """
task: bench_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def prepare(config_path: str, items: int, root: pathlib.Path, choice_chars: int = 40) -> None:
    """root/hf (the exported model), root/run (the jaxlm run), root/tasks (the task): contexts
    of 200 characters, choices of `choice_chars` (40: ARC-like answers; 120: HellaSwag-like
    endings)."""
    import random
    import shutil

    from benchmarks import generate_vs_hf
    from jaxlm import convert
    from jaxlm.data import corpus
    from jaxlm.data import tokenizer as tokenizer_lib

    config = generate_vs_hf.load_config(config_path)
    docs = corpus.builtin_documents("train", config.data.val_fraction)
    tokenizer_lib.train(docs, 4096, root / "tokenizer.model", seed=0)
    generate_vs_hf.save_random_hf_model(config, root / "random")
    shutil.copyfile(root / "tokenizer.model", root / "random" / "tokenizer.model")
    convert.import_hf(root / "random", root / "run")
    convert.export_hf(root / "run", root / "hf", dtype="float32")
    rng, rows, need = random.Random(0), [], max(600, 200 + 4 * (choice_chars + 10))
    for _ in range(items):
        text = rng.choice([d for d in docs if len(d) > need])
        at, step = rng.randrange(len(text) - need), choice_chars + 10
        rows.append(
            {
                "q": text[at : at + 200],
                "choices": [
                    text[at + 200 + step * k : at + 200 + step * k + choice_chars] for k in range(4)
                ],
                "gold": 0,
            }
        )
    (root / "tasks").mkdir()
    data = root / "tasks" / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks" / "bench.yaml").write_text(TASK.format(data=json.dumps(str(data))))


def worker(args) -> None:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    from jaxlm import harness

    root = pathlib.Path(args.root)
    if args.engine == "jaxlm":
        lm = harness.JaxlmLM(path=str(root / "run"), batch_size=args.batch_size, progress=False)
    else:
        import torch
        from lm_eval.models.huggingface import HFLM

        torch.set_num_threads(os.cpu_count())
        lm = HFLM(
            pretrained=str(root / "hf"), dtype="float32", batch_size=args.batch_size, device="cpu"
        )
    loaded = harness.load_tasks([str(root / "tasks")])
    for timed in (False, True):
        start = time.perf_counter()
        results = harness.evaluate(lm, loaded, bootstrap_iters=0)
        seconds = time.perf_counter() - start
        n = results["n-samples"]["bench_choice"]["effective"] * 4
        acc = results["results"]["bench_choice"]["acc,none"]
        print(json.dumps({"timed": timed, "seconds": seconds, "requests": n, "acc": acc}))


def measure(args, engine: str) -> list[dict]:
    flags = [f"--engine={engine}", f"--root={args.root}", f"--batch_size={args.batch_size}"]
    return results_table.worker_lines("benchmarks.eval_throughput", flags, engine)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/125m.py")
    p.add_argument("--items", type=int, default=24)
    p.add_argument("--choice_chars", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--engine", choices=ENGINES)  # internal: one measuring process
    p.add_argument("--root")
    args = p.parse_args()
    platforms.skip_absent_tpu()
    if args.engine:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.root = tmp
        prepare(args.config, args.items, pathlib.Path(tmp), args.choice_chars)
        runs = {e: [] for e in ENGINES}
        order = [e for r in range(args.rounds) for e in (ENGINES if r % 2 == 0 else ENGINES[::-1])]
        order = order + order[::-1]  # jaxlm, hf, hf, jaxlm
        for engine in order:
            runs[engine] += measure(args, engine)
            print(engine, runs[engine][-1], flush=True)
    load = os.getloadavg()[0]
    host, cores, slug = results_table.cpu()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    rows, cells = [], []
    for engine in ENGINES:
        timed = [r for r in runs[engine] if r["timed"]]
        first = [r for r in runs[engine] if not r["timed"]]
        rate = statistics.median(r["requests"] / r["seconds"] for r in timed)
        first_rate = statistics.median(r["requests"] / r["seconds"] for r in first)
        row = {
            "date": stamp,
            "engine": engine,
            "config": args.config,
            "choice_chars": args.choice_chars,
            "requests": timed[0]["requests"],
            "batch_size": args.batch_size,
            "requests_per_s": rate,
            "first_requests_per_s": first_rate,
            "acc": timed[0]["acc"],
            "processes": len(timed),
            "load_avg_1m": load,
            "host": host,
            "cores": cores,
        }
        rows.append(row)
        cells.append(
            [
                stamp,
                engine,
                args.config,
                args.choice_chars,
                row["requests"],
                args.batch_size,
                f"{rate:.2f}",
                f"{first_rate:.2f}",
                f"{row['acc']:.3f}",
                f"{load:.1f}",
            ]
        )
    table = results_table.record(
        RESULTS / f"eval-throughput-{slug}",
        rows,
        "# lm-eval multiple choice: requests/s, jaxlm's harness model vs the harness's HF model\n\n"
        "Median over processes of the timed evaluation (after one untimed); first: the untimed "
        "one, compiles included. `python -m benchmarks.eval_throughput`.",
        ["date", "engine", "config", "choice chars", "requests", "batch", "req/s", "first req/s"]
        + ["acc", "load"],
        cells,
    )
    print(table.read_text())
    print(f"jaxlm / hf: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.2f}x")


if __name__ == "__main__":
    main()
