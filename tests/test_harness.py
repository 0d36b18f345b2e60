"""jaxlm as an lm-evaluation-harness model against lm-eval's own Hugging Face model on the same
run exported to Hugging Face: multiple choice, rolling perplexity and greedy generation, on
one device and on eight. Offline: the tasks are YAML over JSON files written here."""

import json
import os
import subprocess
import sys

import jax
import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jaxlm import convert, harness  # noqa: E402
from jaxlm import run as run_lib  # noqa: E402
from jaxlm.errors import EvalError  # noqa: E402

CHOICES = [
    {"q": "def add(a, b):\n    return a", "choices": [" + b", " - b", " * b"], "gold": 0},
    {"q": "import", "choices": [" os", " sys", " json", " re"], "gold": 2},
    {"q": "for i in range(10):\n   ", "choices": [" print(i)", " pass"], "gold": 1},
    {"q": "x = [1, 2, 3]\nprint(len(", "choices": ["x))", "y))", "[]))"], "gold": 0},
    {"q": "class A:\n    def __init__(self):\n        self.", "choices": ["a = 1", "b"], "gold": 1},
]
DOCS = [
    {"text": "def main():\n    return 1\n"},
    {
        "text": "import os\n\n\ndef read(path):\n    with open(path) as f:\n"
        "        return f.read()\n" * 4
    },
    {"text": " x = [i * i for i in range(10)]"},
]
PROMPTS = [
    {"prompt": "def main():\n", "answer": "    return"},
    {"prompt": "import os\nimport", "answer": " sys"},
    {"prompt": "for i in range(", "answer": "10):"},
    {"prompt": "class Reader:\n    def __init__(self, root):\n", "answer": "        self"},
]

TASKS = {
    "choice": """
task: jaxlm_test_choice
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
""",
    "rolling": """
task: jaxlm_test_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "generate": """
task: jaxlm_test_generate
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}
ROWS = {"choice": CHOICES, "rolling": DOCS, "generate": PROMPTS}


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for name, template in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[name]))
        (root / f"{name}.yaml").write_text(template.format(data=json.dumps(str(data))))
    return root


@pytest.fixture(scope="module")
def hf_results(small_run, tasks_dir, tmp_path_factory):
    """lm-eval's Hugging Face model (float32) on the run exported: the reference."""
    from lm_eval.models.huggingface import HFLM

    out = tmp_path_factory.mktemp("hf")
    convert.export_hf(small_run, out, dtype="float32")
    lm = HFLM(pretrained=str(out), dtype="float32", batch_size=4, device="cpu")
    loaded = harness.load_tasks([str(tasks_dir)])
    return harness.evaluate(lm, loaded, log_samples=True, bootstrap_iters=0)


def _samples(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.slow  # ~1 min on a 2-core CPU: torch and JAX forward passes, several compiles
@pytest.mark.parametrize("n_devices", [1, 8])
def test_jaxlm_model_equals_the_harness_hf_model(
    small_run, tasks_dir, hf_results, n_devices, tmp_path
):
    run = run_lib.load(small_run, devices=jax.devices()[:n_devices], shard_rows=True, unstack=False)
    lm = harness.JaxlmLM(run=run, batch_size=4)
    ours = harness.evaluate(
        lm, harness.load_tasks([str(tasks_dir)]), log_samples=True, bootstrap_iters=0
    )
    theirs = hf_results
    choice, rolling, generate = "jaxlm_test_choice", "jaxlm_test_rolling", "jaxlm_test_generate"
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][choice][metric] == theirs["results"][choice][metric], metric
    for a, b in zip(_samples(ours, choice), _samples(theirs, choice), strict=True):
        got = [float(r[0][0]) for r in a["resps"]]
        want = [float(r[0][0]) for r in b["resps"]]
        assert got == pytest.approx(want, abs=1e-4), a["doc"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"][rolling][metric] == pytest.approx(
            theirs["results"][rolling][metric], rel=1e-4
        ), metric
    ours_text = [s["filtered_resps"] for s in _samples(ours, generate)]
    theirs_text = [s["filtered_resps"] for s in _samples(theirs, generate)]
    assert ours_text == theirs_text
    assert any(t[0] for t in ours_text)  # something was generated
    assert (
        ours["results"][generate]["exact_match,none"]
        == (theirs["results"][generate]["exact_match,none"])
    )


@pytest.mark.slow  # three harness runs of generate_until, each compiling its decode
def test_sampled_generate_until_follows_the_task_settings(small_run, hf_results, tmp_path):
    """Sampling through the harness's generation_kwargs: top_k=1 is greedy whatever the
    temperature (the Hugging Face model's greedy text); hot sampling departs from it and
    repeats itself under the same seed."""
    run = run_lib.load(small_run, shard_rows=True, unstack=False)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))

    def generations(name, settings, seed=1234):
        directory = tmp_path / name
        directory.mkdir(exist_ok=True)
        task = (
            TASKS["generate"]
            .replace("jaxlm_test_generate", name)
            .replace("do_sample: false", settings)
        )
        (directory / "task.yaml").write_text(task.format(data=json.dumps(str(data))))
        lm = harness.JaxlmLM(run=run, batch_size=4, seed=seed)
        results = harness.evaluate(
            lm, harness.load_tasks([str(directory)]), log_samples=True, bootstrap_iters=0
        )
        return [s["resps"][0][0] for s in _samples(results, name)]

    greedy = [s["resps"][0][0] for s in _samples(hf_results, "jaxlm_test_generate")]
    top_1 = generations("top_1", "do_sample: true\n  temperature: 1.5\n  top_k: 1")
    assert top_1 == greedy and any(greedy)
    hot = "do_sample: true\n  temperature: 3.0"
    first, again = generations("hot", hot), generations("hot", hot)
    assert first == again != greedy
    assert generations("hot", hot, seed=7) != first


def test_without_lm_eval_tasks_name_the_extra(tmp_path, repo):
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class NoHarness:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lm_eval' or name.startswith('lm_eval.'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, NoHarness())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"}
    done = subprocess.run(
        [sys.executable, "-m", "jaxlm.eval", f"--from={tmp_path}", "--tasks=hellaswag"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: lm-eval tasks need lm-evaluation-harness, which is not installed: "
        "pip install 'jaxlm[eval]'  (lm-eval>=0.4.13)"
    ]


def test_an_unknown_task_is_named_before_any_model_runs():
    with pytest.raises(EvalError, match="no_such_task"):
        harness.load_tasks(["no_such_task"])


def _training_config(tokenizer_path, tasks, **train):
    from configs import tiny

    config = tiny.get_config()
    config.model.update(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128))
    config.data.update(dict(tokenizer=tokenizer_path, seq_len=64, eval_batches=1))
    config.train.update(
        dict(steps=4, global_batch_size=8, warmup_steps=0, eval_every=2, log_every=2, **train)
    )
    config.train.eval_tasks = tuple(tasks)
    config.mesh.update(dict(fsdp=4, tensor=2))
    config.checkpoint.every = 2
    return config


def test_an_unloadable_training_task_stops_the_run_at_start(tmp_path, tokenizer_path):
    from jaxlm import train as train_lib
    from jaxlm.errors import ConfigError

    config = _training_config(tokenizer_path, ["no_such_task"])
    with pytest.raises(ConfigError, match="train.eval_tasks=.*no_such_task"):
        train_lib.train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # ~2 min on a 2-core CPU: two short runs, each evaluating a task 3 times
def test_training_logs_task_rows_and_a_resumed_run_logs_the_same(tmp_path, tokenizer_path):
    import shutil

    from support import tensorboard_view

    from jaxlm import train as train_lib

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CHOICES))
    (tasks / "choice.yaml").write_text(TASKS["choice"].format(data=json.dumps(str(data))))
    config = _training_config(tokenizer_path, [str(tasks)], eval_limit=3)
    train_lib.train(config, tmp_path / "unbroken")

    def task_rows(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if any(k.startswith("eval/") for k in r)}

    unbroken = task_rows(tmp_path / "unbroken")
    assert sorted(unbroken) == [0, 2, 4]
    keys = {"eval/jaxlm_test_choice/acc", "eval/jaxlm_test_choice/acc_norm"}
    assert all(set(r) == keys | {"step"} for r in unbroken.values())
    assert all(abs(r[k] * 3 - round(r[k] * 3)) < 1e-9 for r in unbroken.values() for k in keys)
    assert {tag for tag, _, _ in tensorboard_view(tmp_path / "unbroken" / "tensorboard")} >= keys

    # the same run stopped after step 2: resumed, its step-4 rows are the unbroken run's
    shutil.copytree(tmp_path / "unbroken", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    train_lib.train(config, tmp_path / "resumed")
    assert task_rows(tmp_path / "resumed") == unbroken


@pytest.mark.parametrize("template", ["llama2", "plain"])
def test_chat_prompts_tokenize_as_the_exported_hf_tokenizer_does(
    tokenizer_path, template, tmp_path
):
    """The harness renders a chat as one string, specials as their text; the reference is the
    run's exported fast tokenizer, which reads "<s>" / "</s>" in text as those tokens."""
    import transformers

    from jaxlm import chat_prompt, hf_tokenizer
    from jaxlm.data import tokenizer as tokenizer_lib

    sp = tokenizer_lib.load(tokenizer_path)
    hf_tokenizer.export(tokenizer_path, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "Answer in code."},
        {"role": "user", "content": "Add two numbers."},
        {"role": "assistant", "content": "def add(a, b): return a + b"},
        {"role": "user", "content": "And three?"},
    ]
    if template == "plain":
        messages = messages[1:]
    prompt = chat_prompt.ChatPrompt(sp, template)
    text = prompt.render(messages, add_generation_prompt=True)
    ids = prompt.encode(text + " def")
    assert ids == hf(text + " def", add_special_tokens=False)["input_ids"]
    assert ids.count(sp.bos_id()) == (2 if template == "llama2" else 1) and ids[0] == sp.bos_id()
