"""lm-evaluation-harness tasks from the command line (`python -m jaxlm.eval --tasks=...`) and
during training (`train.eval_tasks`), importing lm-eval only when tasks are asked for.

    python -m jaxlm.eval --from=runs/tiny --tasks=hellaswag,arc_easy --num_fewshot=0 \\
        --limit=100 --output_path=results/ --log_samples

The run is jaxlm.harness's `jaxlm` model; results are the harness's own (its table on the
console, its results and samples files under --output_path).
"""

from __future__ import annotations

from jaxlm.errors import EvalError

EXTRA = "pip install 'jaxlm[eval]'  (lm-eval>=0.4.13)"


def harness():
    """jaxlm.harness, or an EvalError naming the extra to install."""
    try:
        from jaxlm import harness
    except ImportError as e:
        absent = (e.name or "").split(".")[0] == "lm_eval"
        why = "which is not installed" if absent else f"which does not import ({e})"
        raise EvalError(f"lm-eval tasks need lm-evaluation-harness, {why}: {EXTRA}") from None
    return harness


def task_list(value: str | list | tuple) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [t.strip() for t in items if t.strip()]


def define_flags():
    from absl import flags

    flags.DEFINE_string(
        "tasks",
        None,
        "lm-eval tasks, comma-separated: the harness's names, local task names (with "
        "--include_path), or directories of task YAMLs.",
    )
    flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per task (default: the task's).")
    flags.DEFINE_float("limit", None, "Items per task: a count, or a fraction below 1.")
    flags.DEFINE_bool("log_samples", False, "Keep every sample (written with --output_path).")
    flags.DEFINE_string("output_path", None, "Where the harness writes its results files.")
    flags.DEFINE_string("include_path", None, "A directory of extra task YAMLs.")
    flags.DEFINE_bool(
        "apply_chat_template", False, "Prompt through the run's chat template (data.chat_template)."
    )


def run_from_flags(run, f) -> dict:
    """Evaluate `run` on --tasks; print the harness's table; the results."""
    h = harness()
    loaded = h.load_tasks(task_list(f.tasks), f.include_path)
    lm = h.JaxlmLM(run=run, path=f["from"].value, batch_size=f.batch_size)
    results = h.evaluate(
        lm,
        loaded,
        num_fewshot=f.num_fewshot,
        limit=int(f.limit) if f.limit and f.limit >= 1 else f.limit,
        log_samples=f.log_samples,
        apply_chat_template=f.apply_chat_template,
        output_path=f.output_path,
    )
    from lm_eval.utils import make_table

    print(make_table(results))
    if f.output_path:
        print(f"wrote the harness's results under {f.output_path}")
    return results
