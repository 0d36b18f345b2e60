"""The train state, created already sharded, and the jitted train and eval steps.

The state is a plain dict {"params", "opt_state"}; its shardings come from the logical
axis names the model attaches to every parameter (optax's state mirrors the params, so
it inherits them). Nothing is ever materialised whole on one device or on the host.

With LoRA (train.lora_rank > 0) the params hold the frozen base and the adapters beside it,
but the step differentiates the adapters only, the optimizer state is theirs alone, and a
checkpoint holds only them (`StateFactory.trained`): the base comes from init_from.
"""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import attention as attention_lib
from jaxlm import config as config_lib
from jaxlm import kernel_choice, mup, optim
from jaxlm import lora as lora_lib
from jaxlm import loss as loss_lib
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib


def forward(model, params, batch, head_inputs: bool = False):
    """Logits (or the LM head's inputs); a batch without positions / segment_ids holds one
    document per row."""
    return model.apply(
        {"params": params},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        head_inputs=head_inputs,
    )


def loss_sum_and_count(model, params, batch, loss_chunks: int = 1):
    """Float32 cross-entropy summed over the tokens whose target is real, and their count.

    loss_chunks 1 materialises all logits; more runs the head and loss a slice at a time
    (jaxlm.loss), for less memory at the same FLOPs. With the vocabulary split over the mesh
    (mesh.tensor > 1: "act_vocab" maps to axes of more than one device) jaxlm.loss always
    runs them, vocab-parallel, with any loss_chunks: no device ever holds whole logits.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    if loss_chunks == 1 and not loss_lib.vocab_axes():
        logits = forward(model, params, batch)
        # Same values either way; the select form moves fewer bytes on TPU, the gather is
        # faster on CPU (jaxlm.loss.token_cross_entropy).
        on_tpu = attention_lib.platform(model.cfg.attention) == "tpu"
        cross_entropy = (
            loss_lib.token_cross_entropy
            if on_tpu
            else optax.softmax_cross_entropy_with_integer_labels
        )
        losses = cross_entropy(logits, batch["targets"])
        return jnp.sum(losses * mask), jnp.sum(mask)
    hidden, head = forward(model, params, batch, head_inputs=True)
    total = loss_lib.cross_entropy_sum(hidden, head, batch["targets"], mask, loss_chunks)
    return total, jnp.sum(mask)


def split_trained(model, params) -> tuple[dict, dict]:
    """(the params training updates, the frozen rest): the LoRA adapters and the base, or all
    params and nothing."""
    return lora_lib.split(params) if model.cfg.lora_rank else (params, {})


def join_trained(model, trained: dict, frozen: dict) -> dict:
    return lora_lib.join(trained, frozen) if model.cfg.lora_rank else trained


def sharded_shapes(boxed, mesh, rules):
    """(shardings, abstract arrays) of a tree of logically-partitioned shapes (the
    jax.eval_shape of a linen init) laid out on `mesh` by the logical `rules`."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )
    return shardings, abstract


class StateFactory:
    """Builds the abstract state, its shardings, and the real state on the mesh; carries what
    the train and eval steps take from the config (loss_chunks)."""

    def __init__(
        self,
        model,
        tx,
        mesh,
        rules,
        batch_shape,
        loss_chunks: int = 1,
        accum_steps: int = 1,
        halves: bool = False,
    ):
        self.model, self.tx, self.mesh, self.rules = model, tx, mesh, rules
        self.batch_shape, self.loss_chunks = batch_shape, loss_chunks
        self.accum_steps = accum_steps  # microbatches MultiSteps averages per update
        self.halves = halves  # train.noise_scale_halves (make_train_step)
        # The key is made inside the trace: a concrete one would live on the host's default
        # device, which a mesh of devices from another platform (a TPU topology described on
        # a CPU host, jaxlm.aot) cannot take.
        with self.context():
            self.boxed = jax.eval_shape(lambda: self._init_boxed(jax.random.key(0)))
        self.shardings, self.abstract = sharded_shapes(self.boxed, mesh, rules)

    @property
    def lora(self) -> bool:
        return bool(self.model.cfg.lora_rank)

    def trained(self, state) -> dict:
        """What training changes, and so what a checkpoint holds: the whole state, or with
        LoRA {"params": the adapters, "opt_state"} (the frozen base is init_from's)."""
        if not self.lora:
            return state
        return {"params": lora_lib.split(state["params"])[0], "opt_state": state["opt_state"]}

    def frozen_params(self, state) -> dict:
        """The params training leaves as they are: the LoRA base (empty without LoRA)."""
        return split_trained(self.model, state["params"])[1]

    def assemble(self, trained, frozen_params) -> dict:
        """The whole state from `trained(state)` and `frozen_params(state)`."""
        params = join_trained(self.model, trained["params"], frozen_params)
        return {**trained, "params": params}

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical rules, needed whenever model code is traced."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def _init_boxed(self, rng):
        params = self.model.init(rng, jnp.zeros(self.batch_shape, jnp.int32))["params"]
        return {"params": params, "opt_state": self.tx.init(split_trained(self.model, params)[0])}

    def create(self, rng):
        """A fresh state, each shard initialised on its own device."""
        with self.context():
            return jax.jit(lambda r: nn.unbox(self._init_boxed(r)), out_shardings=self.shardings)(
                rng
            )

    def create_trained(self, rng):
        """`trained` of a fresh state, without initialising the rest (a LoRA base, which
        comes from init_from, is never built)."""
        with self.context():
            return jax.jit(
                lambda r: self.trained(nn.unbox(self._init_boxed(r))),
                out_shardings=self.trained(self.shardings),
            )(rng)

    @property
    def batch_sharding(self):
        return sharding_lib.batch_sharding(self.mesh, self.rules)


def build(config, devices=None) -> tuple[StateFactory, config_lib.Derived]:
    """Validate `config` for `devices` (default: all) and wire model, optimizer and mesh."""
    devices = list(devices if devices is not None else jax.devices())
    derived = config_lib.validate(config, len(devices))
    # The devices decide the platform's forms, "auto" and whether splash is interpreted: they
    # may be a TPU slice described on a CPU host (jaxlm.aot), where the default backend would
    # mislead.
    platform = devices[0].platform
    model_cfg = config_lib.model_config(config, derived, platform)
    model_cfg = dataclasses.replace(
        model_cfg,
        attention=dataclasses.replace(
            model_cfg.attention,
            impl=kernel_choice.attention_impl(config, derived.mesh_shape, platform),
            splash_interpret=platform != "tpu",
        ),
    )
    model = model_lib.Transformer(model_cfg)
    factory = StateFactory(
        model,
        optimizer_for(config, model_cfg),
        sharding_lib.make_mesh(derived.mesh_shape, devices),
        sharding_lib.axis_rules(config.mesh.rules),
        (derived.micro_batch_size, config.data.seq_len),
        config.train.loss_chunks,
        config.train.grad_accum_steps,
        config.train.noise_scale_halves,
    )
    return factory, derived


def optimizer_for(config, model_cfg) -> optax.GradientTransformation:
    """config.train's optimizer for `model_cfg` (muP's learning-rate ratio), its batch schedule
    as it stands: the adaptive ramp (jaxlm.adaptive_batch) builds it again at each decision,
    into a state of the same structure."""
    return optim.make_optimizer(config.train, config.data.seq_len, mup.ratio_of(model_cfg))


def abstract_batch(factory: StateFactory, batch_size: int, seq_len: int) -> dict:
    """Shapes, dtypes and shardings of one batch, for ahead-of-time compilation."""

    def field(dtype):
        return jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=factory.batch_sharding)

    return {
        "inputs": field(jnp.int32),
        "targets": field(jnp.int32),
        "positions": field(jnp.int32),
        "segment_ids": field(jnp.int32),
        "loss_mask": field(jnp.bool_),
    }


def _applied_gradient_norm(grads, opt_state):
    """Norm of the gradient the optimizer applies: with MultiSteps, the running mean."""
    if isinstance(opt_state, optax.MultiStepsState):
        n = opt_state.mini_step
        grads = jax.tree.map(lambda g, acc: acc + (g - acc) / (n + 1), grads, opt_state.acc_grads)
    return optax.tree.norm(grads)


class TrainStep:
    """The jitted train step: (state, batch, window_targets) -> (state, metrics), the state
    donated.

    `window_targets` is the count of real targets in the whole accumulation window (every
    microbatch, every host): each microbatch then feeds MultiSteps its summed per-token gradient
    times grad_accum_steps / window_targets, so the mean MultiSteps applies is exactly the
    window's per-token mean, as one batch holding all its rows would give. Left out (or 0),
    a microbatch is normalised by its own count: exact with grad_accum_steps=1 only.
    """

    def __init__(self, jitted, accum_steps: int):
        self.jitted, self.accum_steps = jitted, accum_steps

    def __call__(self, state, batch, window_targets=0.0, accum_steps=None):
        """`accum_steps`: this update's microbatches (a batch schedule's stage), default
        train.grad_accum_steps; a traced value, so a new stage does not recompile."""
        accum = self.accum_steps if accum_steps is None else accum_steps
        return self.jitted(state, batch, np.float32(window_targets), np.float32(accum))

    def lower(self, state, batch, window_targets=None, accum_steps=None):
        """As jax.jit's lower (abstract arguments welcome); the compiled program takes all
        four arguments."""
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return self.jitted.lower(
            state,
            batch,
            scalar if window_targets is None else window_targets,
            scalar if accum_steps is None else accum_steps,
        )


def _halves(batch: dict) -> dict:
    """The rows of a batch as two halves, [2, rows / 2, ...] (train.noise_scale_halves)."""
    return jax.tree.map(lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:]), batch)


def make_train_step(factory: StateFactory) -> TrainStep:
    """The train step of `factory`'s model and optimizer (see TrainStep). With
    `factory.halves` (train.noise_scale_halves) each half of the microbatch is differentiated
    on its own, side by side (vmap), and each half's gradient norm reported for the noise
    scale; the update is their sum, the same gradient."""
    model, tx, loss_chunks = factory.model, factory.tx, factory.loss_chunks
    halves = factory.halves

    def train_step(state, batch, window_targets, accum_steps):
        # Gradients of the trained params only (with LoRA, the adapters): the frozen base is
        # a constant of the loss, so no gradient or optimizer state is ever made for it.
        trained, frozen = split_trained(model, state["params"])

        # What a microbatch's loss sum is divided by: its share of the window's targets, or
        # without them (window_targets 0) its own.
        own = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        denominator = jnp.where(window_targets > 0, window_targets / accum_steps, own)

        def loss_fn(trained, rows):
            params = join_trained(model, trained, frozen)
            total, count = loss_sum_and_count(model, params, rows, loss_chunks)
            return total / denominator, (total, count)

        step_grad = jax.value_and_grad(loss_fn, has_aux=True)
        if halves:
            (_, (part_sums, part_counts)), part_grads = jax.vmap(step_grad, in_axes=(None, 0))(
                trained, _halves(batch)
            )
            grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), part_grads)
            loss_sum, count = jnp.sum(part_sums), jnp.sum(part_counts)
        else:
            (_, (loss_sum, count)), grads = step_grad(trained, batch)
            part_grads = jax.tree.map(lambda g: g[None], grads)
            part_counts = count[None]
        loss = loss_sum / jnp.maximum(count, 1.0)
        # |each part's own mean gradient|^2 (the microbatch, or its halves), for the gradient
        # noise scale (jaxlm.noise_scale): a fed gradient is grad(loss_sum) / denominator.
        part_sq = jax.vmap(lambda g: optax.tree.norm(g, squared=True))(part_grads)
        micro_grad_sq = part_sq * jnp.square(denominator / jnp.maximum(part_counts, 1.0))
        grad_norm = _applied_gradient_norm(grads, state["opt_state"])
        updates, opt_state = tx.update(grads, state["opt_state"], trained)
        # A non-finite loss or gradient leaves the state as it was; the loop decides
        # (train.nonfinite) whether to stop or go on.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_trained, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (optax.apply_updates(trained, updates), opt_state),
            (trained, state["opt_state"]),
        )
        new_state = {"params": join_trained(model, new_trained, frozen), "opt_state": opt_state}
        metrics = {
            "loss": loss,
            "loss_sum": loss_sum,
            "grad_norm": grad_norm,
            "micro_grad_sq": micro_grad_sq,  # [parts]
            "part_tokens": part_counts,  # [parts]
            "target_tokens": count,
            "finite": finite,
        }
        return new_state, metrics

    replicated = jax.sharding.NamedSharding(factory.mesh, jax.sharding.PartitionSpec())
    return TrainStep(
        jax.jit(
            train_step,
            in_shardings=(factory.shardings, factory.batch_sharding, replicated, replicated),
            out_shardings=(factory.shardings, None),
            donate_argnums=0,
        ),
        factory.accum_steps,
    )


def make_eval_step(factory: StateFactory):
    """jit(params, batch) -> (loss sum, target count)."""
    model, loss_chunks = factory.model, factory.loss_chunks

    def eval_step(params, batch):
        return loss_sum_and_count(model, params, batch, loss_chunks)

    return jax.jit(eval_step, in_shardings=(factory.shardings["params"], factory.batch_sharding))
