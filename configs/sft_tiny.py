"""Supervised fine-tuning of the tiny model on an instruction set made from the standard library.

    python -m jaxlm.train --config=configs/tiny.py --workdir=runs/tiny     # pre-train first
    python -m jaxlm.train --config=configs/sft_tiny.py \
        --config.checkpoint.init_from=runs/tiny/checkpoints

Data: `sft:builtin`, each documented top-level function of this Python's standard library as
a record {"prompt": its signature and docstring, "completion": its body}, laid out by the
`plain` template (bos, prompt, completion, eos); only the body and its eos are trained on,
and the validation loss is the loss on held-out bodies. With init_from the tokenizer is the
pre-trained run's own.
"""

from configs import tiny


def get_config():
    config = tiny.get_config()  # the same model, so init_from's parameters fit
    d = config.data
    d.source = "sft:builtin"
    d.chat_template = "plain"
    d.sft_overflow = "drop"  # functions longer than a row are counted and left out
    d.val_fraction = 0.1
    d.eval_batches = 8

    t = config.train
    t.steps = 60
    t.lr = 1e-3
    t.warmup_steps = 6
    t.weight_decay = 0.0
    t.log_every = 5
    t.eval_every = 20

    config.checkpoint.every = 60
    return config
