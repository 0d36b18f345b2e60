"""A sweep of the optimizer settings of the default model (configs/tiny.py), sized for a CPU.

    python -m jaxlm.sweep --config=configs/tiny.py --space=configs/sweeps/tiny.py \
        --study=runs/sweeps/tiny --trials=12 --config.train.steps=100 --config.train.eval_every=25

Short trials (100 steps, a validation every 25) of the optimizer's settings; the median pruner
stops a trial whose validation loss is worse than the median of the trials before it at the
same step, after the first three trials and the first validation.
"""

from jaxlm.sweep_space import Space, int_range, log_uniform, uniform


def get_space():
    return Space(
        params={
            "train.lr": log_uniform(3e-4, 3e-2),
            "train.warmup_steps": int_range(0, 40),
            "train.weight_decay": uniform(0.0, 0.3),
            "train.b2": uniform(0.9, 0.999),
        },
        objective="val_loss",  # the final validation loss ...
        direction="minimize",  # ... minimised
        sampler="tpe",  # or "random"; "grid" for choice(...) parameters only
        seed=0,
        pruner="median",  # "none", "halving" (successive halving), "hyperband"
        pruner_args={"n_startup_trials": 3, "n_warmup_steps": 25},
    )
