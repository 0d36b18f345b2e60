"""What the train loop does with a step's metrics once read back: the non-finite policy,
the log window, the metrics row printed and written every train.log_every steps."""

from __future__ import annotations

from jaxlm import metrics as metrics_lib
from jaxlm import optim
from jaxlm.errors import NonFiniteError


class NonFinitePolicy:
    """train.nonfinite: stop at a non-finite microbatch ("raise"), or count and go on ("skip")
    until train.max_skips_in_a_row in a row. The step never applies such an update. The
    counts live in the checkpointed log window, so a resumed run counts on from them."""

    def __init__(self, t, console, window: metrics_lib.LogWindow):
        self.t, self.console, self.window = t, console, window

    def applied(self, result: dict, step: int) -> bool:
        w = self.window
        if result["finite"]:
            w.skipped_in_a_row = 0
            return True
        w.skipped_in_a_row, w.skipped_total = w.skipped_in_a_row + 1, w.skipped_total + 1
        what = f"non-finite loss {result['loss']} / grad_norm {result['grad_norm']} at step {step}"
        if self.t.nonfinite == "raise":
            raise NonFiniteError(
                f"{what}; the update was not applied and nothing was saved "
                "(train.nonfinite='raise')"
            )
        self.console.print(f"step {step}/{self.t.steps} | {what}: update skipped")
        if w.skipped_in_a_row >= self.t.max_skips_in_a_row:
            raise NonFiniteError(
                f"{what}: {w.skipped_in_a_row} non-finite microbatches in a row "
                f"(train.max_skips_in_a_row={self.t.max_skips_in_a_row}); stopping"
            )
        return False


def applied(result: dict, window, nonfinite, step: int, applied: list) -> bool:
    """One microbatch's metrics read back: into the log window; whether its update counts
    (then for each of its parts, the microbatch or its halves, the part's gradient squared
    norm, its targets and the window's go to `applied`)."""
    window.add(result["loss_sum"], result["target_tokens"])
    if not nonfinite.applied(result, step):
        return False
    for part_sq, part_tokens in zip(result["micro_grad_sq"], result["part_tokens"]):
        applied.append((part_sq, part_tokens, result["window_targets"]))
    return True


def log_row(step, config, window, throughput, grad_norm, writer, console, goodput_fields) -> dict:
    """The metrics row of the steps since the last one, written and printed."""
    t = config.train
    last = {
        "loss": window.mean_loss(),
        "lr": float(optim.schedule(t, config.data.seq_len)(step - 1)),
        "grad_norm": grad_norm,
    }
    line = (
        f"step {step}/{t.steps} | loss {last['loss']:.4f} | lr {last['lr']:.2e}"
        f" | grad_norm {last['grad_norm']:.3f}"
    )
    noise = window.noise_scale.value()
    if noise is not None:  # B_simple in tokens, smoothed (jaxlm.noise_scale)
        last["gradient_noise_scale"] = noise
        line += f" | noise scale {noise:,.0f} tokens"
    if window.skipped_total:
        last["skipped_microbatches"] = window.skipped_total
        line += f" | skipped {window.skipped_total}"
    rates = throughput.rates()
    if rates:
        last.update(rates)
        line += f" | tokens/s {last['tokens_per_second']:,.0f} | MFU {100 * last['mfu']:.1f}%"
    last.update(goodput_fields)
    line += f" | goodput {100 * last['goodput']:.0f}%"
    writer.write(step, last)
    console.print(line)
    window.reset()
    throughput.restart()
    return last
