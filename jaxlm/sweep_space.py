"""A sweep's search space: a plain Python file whose `get_space()` returns a `Space`.

    from jaxlm.sweep_space import Space, choice, int_range, log_uniform, uniform

    def get_space():
        return Space(
            params={"train.lr": log_uniform(1e-4, 1e-2), "model.remat": choice("none", "full")},
            sampler="tpe", seed=0, pruner="median",
        )

Parameters are config fields by their dotted names; each trial is the base config with one
value per field. `check` finds every problem a space can have against the base config (an
unknown field, a distribution its field cannot take, an empty range, a corner that makes the
config invalid) before any trial starts, each as one line naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from jaxlm.errors import ConfigError, SweepError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "halving", "hyperband")
DIRECTIONS = ("minimize", "maximize")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """One parameter's values: kind "float" (log or not), "int" (log or not) or "choice"."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"choice{self.choices}"
        return f"{'log-' if self.log else ''}{self.kind} [{self.low}, {self.high}]"

    def corners(self) -> tuple:
        """The values whose configs `check` validates: the ends of a range, every choice."""
        return self.choices if self.kind == "choice" else (self.low, self.high)

    def to_optuna(self):
        import optuna

        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)


def uniform(low: float, high: float) -> Distribution:
    return Distribution("float", float(low), float(high))


def log_uniform(low: float, high: float) -> Distribution:
    return Distribution("float", float(low), float(high), log=True)


def int_range(low: int, high: int, log: bool = False) -> Distribution:
    return Distribution("int", low, high, log=log)


def choice(*values) -> Distribution:
    return Distribution("choice", choices=tuple(values))


@dataclasses.dataclass(frozen=True)
class Space:
    """What to search, what to optimise, and how.

    objective: a metrics.jsonl key, its last value is the trial's result ("val_loss": the
    final validation loss). Pruning hears each validation's val_loss, so it needs that
    objective. pruner_args go to the Optuna pruner (e.g. n_warmup_steps for "median").
    """

    params: dict
    objective: str = "val_loss"
    direction: str = "minimize"
    sampler: str = "tpe"
    seed: int = 0
    pruner: str = "median"
    pruner_args: dict = dataclasses.field(default_factory=dict)

    def make_sampler(self, offset: int):
        """The sampler for the trial asked after `offset` others: seeded by (seed, offset), so
        a resumed sweep asks what an unbroken one would have asked."""
        import optuna

        seed = self.seed + offset
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.sampler == "grid":
            # The grid's order is its seed's, the same for every trial and worker: trial n takes
            # point n of it, so no two trials (on any worker) run the same point.
            grid = {name: list(d.choices) for name, d in self.params.items()}
            return optuna.samplers.GridSampler(grid, seed=self.seed)
        return optuna.samplers.TPESampler(seed=seed)

    def make_pruner(self):
        import optuna

        kinds = {
            "none": optuna.pruners.NopPruner,
            "median": optuna.pruners.MedianPruner,
            "halving": optuna.pruners.SuccessiveHalvingPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
        }
        return kinds[self.pruner](**self.pruner_args)

    def distributions(self) -> dict:
        return {name: d.to_optuna() for name, d in self.params.items()}


def load(path: str) -> Space:
    """The Space of the file at `path` (its get_space()); SweepError naming --space if not."""
    if not os.path.isfile(path):
        raise SweepError(
            f"--space={path}: no such file; give a space file such as configs/sweeps/tiny.py"
        )
    spec = importlib.util.spec_from_file_location("jaxlm_sweep_space", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise SweepError(f"--space={path}: syntax error at line {e.lineno}: {e.msg}") from None
    if not hasattr(module, "get_space"):
        raise SweepError(f"--space={path}: defines no get_space(); see configs/sweeps/tiny.py")
    space = module.get_space()
    if not isinstance(space, Space):
        raise SweepError(
            f"--space={path}: get_space() returned {type(space).__name__}, not a "
            "jaxlm.sweep_space.Space"
        )
    return space


def _field_type(config, name: str) -> tuple[type | None, str]:
    """The type of the config field `name` ("train.lr"), or None and why it names none."""
    node = config
    *sections, key = name.split(".")
    for depth, section in enumerate(sections):
        if section not in node or not isinstance(node[section], ml_collections.ConfigDict):
            where = ".".join(sections[:depth]) or "the config"
            return None, f"{where} has no section {section!r}"
        node = node[section]
    if key not in node or isinstance(node[key], ml_collections.ConfigDict):
        return None, f"{'.'.join(sections) or 'the config'} has no field {key!r}"
    return type(node[key]), ""


def _fits(dist: Distribution, kind: type) -> str:
    """Why values of `dist` cannot go in a field of type `kind`, or ""."""
    if dist.kind == "choice":
        bad = [v for v in dist.choices if not _value_fits(v, kind)]
        return f"choices {bad} are not {kind.__name__}" if bad else ""
    if kind is bool or kind not in (int, float):
        return f"a {dist.kind} range cannot set a {kind.__name__} field; use choice(...)"
    if kind is int and dist.kind == "float":
        return "a float range cannot set an int field; use int_range(low, high)"
    return ""


def _value_fits(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check(space: Space, base: ml_collections.ConfigDict, n_devices: int) -> None:
    """Raise SweepError, one line naming the parameter and the fix, for the first problem of
    `space` against the base config on `n_devices` devices per trial."""
    from jaxlm import config as config_lib

    require(space.params, "params", "{}", "at least one config field to search")
    for field, (value, allowed) in {
        "sampler": (space.sampler, SAMPLERS),
        "pruner": (space.pruner, PRUNERS),
        "direction": (space.direction, DIRECTIONS),
    }.items():
        require(value in allowed, field, repr(value), f"one of {allowed}")
    require(
        space.pruner == "none" or space.objective == "val_loss",
        "pruner",
        repr(space.pruner),
        f"'none' with objective={space.objective!r}: pruning hears val_loss",
    )
    try:
        space.make_pruner()
    except TypeError as e:
        raise SweepError(f"space pruner_args={space.pruner_args}: {e}") from None
    for name, dist in space.params.items():
        require(
            isinstance(dist, Distribution), name, repr(dist), "a jaxlm.sweep_space distribution"
        )
        kind, why = _field_type(base, name)
        require(kind is not None, name, "", f"{why}; name a field of jaxlm.config.default_config()")
        problem = _fits(dist, kind)
        require(not problem, name, dist.describe(), problem)
        if dist.kind == "choice":
            require(dist.choices, name, "choice()", "at least one value")
        else:
            require(dist.low < dist.high, name, dist.describe(), "an empty range: low < high")
            require(not dist.log or dist.low > 0, name, dist.describe(), "a log range above 0")
        require(
            space.sampler != "grid" or dist.kind == "choice",
            name,
            dist.describe(),
            "sampler='grid' searches choice(...) parameters only",
        )
        for value in dist.corners():
            try:
                config_lib.validate(config_lib.with_fields(base, {name: value}), n_devices)
            except ConfigError as e:
                raise SweepError(
                    f"space parameter {name}={value!r} makes the config invalid: {e}"
                ) from None
            except TypeError as e:
                raise SweepError(f"space parameter {name}={value!r}: {e}") from None


def require(ok: Any, name: str, value: str, what: str) -> None:
    if not ok:
        raise SweepError(f"space {name}={value}: {what}" if value else f"space {name}: {what}")
