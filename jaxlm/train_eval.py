"""lm-evaluation-harness tasks during training: `train.eval_tasks` at every `train.eval_every`.

The tasks are loaded when the run starts, so a name lm-eval does not know (or a YAML task whose
data cannot be read) stops the run there, not at the first evaluation. Each evaluation scores
the live params in their training layout and sharding (rows over the data and FSDP devices),
through jaxlm.harness's `jaxlm` model, with the attention that jaxlm.eval uses (plain XLA, no
remat, the length unsplit). Its metrics go to metrics.jsonl, TensorBoard and the console as
`eval/TASK/METRIC`, beside val_loss. Evaluation is deterministic (greedy generation; the
harness's fixed few-shot seed), so a resumed run logs the rows an unbroken one does.
"""

from __future__ import annotations

import dataclasses

from jaxlm import eval_tasks
from jaxlm.errors import ConfigError, EvalError


class TaskEval:
    """The loaded tasks of a run; `None` from `at_start` when train.eval_tasks is empty."""

    def __init__(self, config, loaded: dict, harness):
        self.config, self.loaded, self.harness = config, loaded, harness
        self.limit = config.train.eval_limit or None

    @classmethod
    def at_start(cls, config) -> TaskEval | None:
        tasks = eval_tasks.task_list(config.train.eval_tasks)
        if not tasks:
            return None
        try:
            harness = eval_tasks.harness()
            loaded = harness.load_tasks(tasks)
        except EvalError as e:
            raise ConfigError(f"train.eval_tasks={tuple(tasks)!r}: {e}") from None
        return cls(config, loaded, harness)

    def _run(self, params, factory, data, step: int):
        """The live params as a jaxlm.run.Run on the training mesh."""
        from jaxlm import run as run_lib

        cfg = factory.model.cfg
        cfg = dataclasses.replace(
            cfg, remat="none", attention=dataclasses.replace(cfg.attention, impl="xla")
        )
        rules = (("length", None), *factory.rules)
        return run_lib.Run(
            params,
            cfg,
            int(self.config.data.seq_len),
            data.tokenizer,
            factory.mesh,
            rules,
            step,
            data.tokenizer_path,
            self.config,
        )

    def evaluate(self, params, factory, data, step: int) -> dict[str, float]:
        """{"eval/TASK/METRIC": value} of the tasks on `params` at `step`."""
        lm = self.harness.JaxlmLM(
            run=self._run(params, factory, data, step), path="training", progress=False
        )
        results = self.harness.evaluate(lm, self.loaded, limit=self.limit, bootstrap_iters=0)
        return {f"eval/{k}": v for k, v in self.harness.metrics(results).items()}

    def log(self, params, factory, data, step: int, writer, console) -> dict[str, float]:
        """Evaluate, write the rows to metrics.jsonl / TensorBoard and a console line."""
        rows = self.evaluate(params, factory, data, step)
        writer.write(step, rows)
        steps = self.config.train.steps
        console.print(
            f"step {step}/{steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in rows.items())
        )
        return rows
