"""jaxlm as a model of lm-evaluation-harness (lm-eval), registered there as "jaxlm".

    import lm_eval, jaxlm.harness
    lm_eval.simple_evaluate(model=jaxlm.harness.JaxlmLM(path="runs/tiny"), tasks=["arc_easy"])

All three request types go through jaxlm's own code: `loglikelihood` through jaxlm.eval's
split (`split_pair`, as the harness's Hugging Face model splits) and jaxlm.scorer (sorted by
length, batched into length buckets, rows over every device, a context shared by several
requests computed once), the same path as `python -m jaxlm.eval --choices`;
`loglikelihood_rolling` cuts each document into windows of the run's context with the
harness's own window functions and scores them the same way;
`generate_until` decodes through jaxlm.generate (greedy, or sampled with the request's
temperature / top_k / top_p), stopping a row at EOS, its token budget or a stop sequence.

Importing this module needs lm-eval (`pip install 'jaxlm[eval]'`); jaxlm.eval and jaxlm.train
import it only when asked for tasks.
"""

from __future__ import annotations

import json
import os

import lm_eval
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models import utils as model_utils
from tqdm import tqdm

from jaxlm import eval as eval_lib
from jaxlm import generate as gen
from jaxlm import run as run_lib
from jaxlm import scorer
from jaxlm.errors import EvalError


@register_model("jaxlm")
class JaxlmLM(TemplateLM):
    """A jaxlm run as an lm-eval model: give a loaded `run` (jaxlm.run.load), or the `path` of
    a run directory (with `step`, `tensor`, `tokenizer` as jaxlm.eval's flags). `path` also
    names the model in the harness's results files."""

    def __init__(
        self,
        run: run_lib.Run | None = None,
        path: str | None = None,
        step: int | None = None,
        tensor: int | None = None,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        max_gen_toks: int = 256,
        seed: int = 1234,
        progress: bool = True,
        **unused,
    ):
        super().__init__()
        if run is None:
            if not path:
                raise EvalError("the jaxlm model needs a run directory: path=RUN_DIR")
            run = run_lib.load(path, tokenizer, step, tensor, shard_rows=True, unstack=False)
        self.run, self.sp, self.path = run, run.tokenizer, path or "jaxlm-run"
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks, self.seed, self.progress = int(max_gen_toks), int(seed), progress
        self._rows = scorer.rows_per_batch(run, self.batch_size)
        self._chat = None  # a chat_prompt.ChatPrompt once the harness applies the template

    # ------------------------------------------------------------ tokens, as the HF model has them

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id() if self.sp.bos_id() >= 0 else self.sp.eos_id()

    @property
    def max_length(self) -> int:
        return self.run.max_len

    @property
    def tokenizer_name(self) -> str:
        return self.run.tokenizer_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if self._chat is not None:  # a prompt through the chat template: its specials as ids
            return self._chat.encode(string, add_special_tokens)
        tokens = self.sp.encode(string)
        return eval_lib.with_bos(self.sp, tokens) if add_special_tokens is not False else tokens

    # ------------------------------------------------------------ chat template

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The run's data.chat_template (an SFT run's), by name; None without one."""
        return self._template_name() if chat_template else None

    def _template_name(self) -> str:
        config = self.run.run_config
        name = config.data.get("chat_template", "") if config is not None else ""
        if not name:
            raise EvalError(
                "--apply_chat_template: the run has no chat template (data.chat_template is "
                "set by SFT runs); evaluate without it"
            )
        return name

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        """The conversation laid out by the run's template (jaxlm.data.sft), special tokens
        written as their text; tok_encode turns them back into their ids."""
        from jaxlm import chat_prompt

        if self._chat is None:
            self._chat = chat_prompt.ChatPrompt(self.sp, self._template_name())
        return self._chat.render(chat_history, add_generation_prompt)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.sp.decode(list(tokens))

    # ------------------------------------------------------------ scoring

    def _bar(self, total: int, what: str, disable: bool):
        return tqdm(total=total, desc=f"jaxlm {what}", disable=disable or not self.progress)

    def _score(self, requests: list, what: str, disable_tqdm: bool) -> list:
        with self._bar(len(requests), what, disable_tqdm) as bar:
            return scorer.score(self.run, requests, self.batch_size, progress=bar.update)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        """(log P(continuation | context), is greedy) per request, split by jaxlm.eval's
        split_pair, the one split `--choices` uses too."""
        if self._chat is not None:  # prompts hold the template's specials: tok_encode's split
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        pairs = [req.args for req in requests]
        return self._loglikelihood_tokens(
            [(pair, *_as_lists(eval_lib.split_pair(self.sp, *pair))) for pair in pairs],
            disable_tqdm=disable_tqdm,
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        for pair, _, continuation in requests:
            if not continuation:
                raise EvalError(f"the continuation of {pair!r} has no tokens")
        scores = self._score(
            [scorer.Request(tuple(c), tuple(x)) for _, c, x in requests],
            "loglikelihood",
            disable_tqdm,
        )
        answers = [(s.logprob, s.greedy) for s in scores]
        for (pair, _, _), answer in zip(requests, answers):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's summed log-likelihood over windows of the run's context, as the
        harness's Hugging Face model cuts them (BOS + the text, predicted after BOS)."""
        windows, owner = [], []
        for n, req in enumerate(requests):
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(scorer.Request(tuple(context), tuple(continuation)))
                owner.append(n)
        totals = np.zeros(len(requests))
        for n, scored in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[n] += scored.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    # ------------------------------------------------------------ generating

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's generation, cut at its first stop sequence. Requests with the same
        settings are decoded together, longest prompt first, `batch_size` rows (rounded up to
        the devices) at a time, so each prompt bucket compiles once."""
        eos = self.sp.id_to_piece(self.eot_token_id) if self.eot_token_id >= 0 else None
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts: list[str | None] = [None] * len(requests)
        with self._bar(len(requests), "generate_until", disable_tqdm) as bar:
            for members in groups.values():
                kwargs = model_utils.normalize_gen_kwargs(
                    dict(requests[members[0]].args[1]), self.max_gen_toks
                )
                until = model_utils.handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                budget = int(kwargs.pop("max_gen_toks"))
                if budget >= self.max_length:
                    raise EvalError(
                        f"a task asks for {budget} new tokens; the run's context is "
                        f"{self.max_length} tokens"
                    )
                sampling = dict(
                    temperature=float(kwargs.get("temperature", 0.0))
                    if kwargs.get("do_sample")
                    else 0.0,
                    top_k=int(kwargs.get("top_k") or 0),
                    top_p=float(kwargs.get("top_p") or 1.0),
                )
                prompts = {
                    i: self.tok_encode(requests[i].args[0])[-(self.max_length - budget) :]
                    for i in members
                }
                order = sorted(members, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self._rows):
                    batch = order[start : start + self._rows]
                    done = self._generate([prompts[i] for i in batch], budget, until, sampling)
                    for i, text in zip(batch, done):
                        texts[i] = model_utils.postprocess_generated_text(text, until, None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
                    bar.update(len(batch))
        return texts

    def _generate(self, prompts: list, budget: int, until: list, sampling: dict) -> list[str]:
        """The decoded new text of each prompt, stopping once every row has hit EOS, its
        budget or one of `until`. Rows are padded to a full batch with copies of the last."""
        rows = prompts + [prompts[-1]] * (self._rows - len(prompts))
        completions = [[] for _ in rows]
        stopped = np.zeros(len(rows), bool)
        for new, emitted, done in gen.stream(
            self.run.params,
            self.run.config,
            rows,
            **self.run.kwargs(),
            max_new_tokens=budget,
            seed=self.seed,
            **sampling,
        ):
            for i in np.flatnonzero(emitted & ~stopped):
                completions[i].append(int(new[i]))
                text = self.sp.decode(completions[i])
                stopped[i] = any(stop and stop in text for stop in until)
            if (stopped | done)[: len(prompts)].all():
                break
        return [self.sp.decode(c) for c in completions[: len(prompts)]]


def _as_lists(request: scorer.Request) -> tuple[list, list]:
    return list(request.context), list(request.continuation)


# ---------------------------------------------------------------- tasks


def load_tasks(tasks: list[str], include_path: str | None = None) -> dict:
    """The harness's tasks by name (its own, or those of YAML files under `include_path`, or
    directories of them given as names), loaded now: a task that cannot be loaded is an
    EvalError naming it, before any model runs."""
    from lm_eval.tasks import TaskManager, get_task_dict

    paths = [include_path] if include_path else []
    names = []
    for task in tasks:  # a directory of task YAMLs stands for the tasks it defines
        if os.path.isdir(task):
            paths.append(task)
            names += _task_names(task)
        else:
            names.append(task)
    manager = TaskManager(include_path=paths or None)
    missing = [t for t in names if not manager.match_tasks([t])]
    if missing:
        raise EvalError(f"unknown lm-eval task(s) {missing} (see lm_eval --tasks list)")
    try:
        return {"manager": manager, "names": names, "tasks": get_task_dict(names, manager)}
    except Exception as e:  # noqa: BLE001 - datasets and YAML raise many kinds
        raise EvalError(f"cannot load the task(s) {names}: {type(e).__name__}: {e}") from None


def _task_names(directory: str) -> list[str]:
    import yaml

    names = []
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")):
                with open(os.path.join(root, name)) as f:
                    try:
                        spec = yaml.load(f, Loader=yaml.BaseLoader) or {}
                    except yaml.YAMLError:
                        continue
                if isinstance(spec, dict) and "task" in spec:
                    names.append(spec["task"])
    if not names:
        raise EvalError(f"{directory} holds no task YAML (a file with a `task:` name)")
    return names


def evaluate(
    lm,
    loaded: dict,
    num_fewshot: int | None = None,
    limit: float | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    output_path: str | None = None,
    bootstrap_iters: int = 100000,
) -> dict:
    """lm_eval.simple_evaluate of `lm` (a JaxlmLM, or any lm-eval model) on the loaded tasks;
    with `output_path`, the harness's own results (and, with `log_samples`, samples) files
    written there."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = lm_eval.simple_evaluate(
        model=lm,
        model_args={"path": lm.path, "step": lm.run.step} if isinstance(lm, JaxlmLM) else None,
        tasks=loaded["names"],
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        task_manager=loaded["manager"],
        evaluation_tracker=tracker,
        bootstrap_iters=bootstrap_iters,
    )
    if tracker is not None:
        samples = results.pop("samples", None) if log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
        if samples:
            results["samples"] = samples
    return results


def metrics(results: dict) -> dict[str, float]:
    """{"TASK/METRIC": value} of a results dict, the filter and standard errors left out."""
    rows = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, filtered = key.partition(",")[::2]  # "acc,none"; not "sample_len"
            if filtered and isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                rows[f"{task}/{metric}"] = float(value)
    return rows
