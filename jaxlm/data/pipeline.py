"""Tokenized documents -> packed rows -> shuffled, per-process batches, with grain.

Rows come from jaxlm.data.packing (documents laid end to end, or SFT conversations whole),
random access. grain shuffles rows (afresh each epoch), batches them, gives each process its
slice of every global batch and prefetches on threads; its iterator state (the next batch
index) is what a checkpoint saves, and batch k is a pure function of (seed, k).

Sources (config.data.source): `builtin` (the stdlib corpus, tokenizer trained into the
workdir), `arrayrecord:DIR` (made by `python -m jaxlm.data.prepare`, with or without --sft),
`tfds:NAME` (prepared once into the workdir from `tfds.data_source`), `sft:GLOB` (chat JSONL,
prepared with --sft into the workdir; `sft:builtin`: the stdlib's functions, docstring -> body).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import grain
import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxlm.data import corpus, prepare, prepared, sft, tfds_source
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.data.documents import TOKEN_DTYPE, Documents, InMemoryDocuments
from jaxlm.data.packing import PackedConversations, PackedRows, cut_rows  # noqa: F401
from jaxlm.errors import ConfigError

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
ARRAYRECORD = "arrayrecord:"
SFT = "sft:"


def tokenize(sp, documents: list[str]) -> list[np.ndarray]:
    """Each document as `bos + pieces + eos` int32 ids."""
    prefix = [sp.bos_id()] if sp.bos_id() >= 0 else []
    suffix = [sp.eos_id()] if sp.eos_id() >= 0 else []
    return [
        np.asarray(prefix + ids + suffix, TOKEN_DTYPE)
        for ids in sp.encode(documents, num_threads=2)
    ]


def _process_share(global_batch_size: int) -> tuple[int, int, int]:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigError(
            f"a batch of {global_batch_size} sequences cannot be split evenly over "
            f"{count} processes; make train.global_batch_size / "
            f"train.grad_accum_steps a multiple of {count}"
        )
    return global_batch_size // count, index, count


def train_dataset(
    rows: PackedRows | PackedConversations, global_batch_size: int, seed: int
) -> grain.MapDataset:
    """This process's batches: element k is its share of global batch k.

    Global batch k is rows k*B .. (k+1)*B-1 of the shuffled stream whatever the number of
    processes: process p of P takes the p-th of P equal consecutive parts.
    """
    local, index, count = _process_share(global_batch_size)
    batches = grain.MapDataset.source(rows).shuffle(seed=seed).repeat().batch(local)
    return batches[index::count]


def eval_dataset(
    rows: PackedRows | PackedConversations, global_batch_size: int, n_batches: int
) -> grain.MapDataset:
    """A fixed list of validation batches (the same every evaluation)."""
    local, index, count = _process_share(global_batch_size)
    batches = grain.MapDataset.source(rows).repeat().batch(local)
    return batches[index::count][:n_batches]


class Batches:
    """A checkpointable iterator over a dataset, prefetching on threads.

    `get_state()` is grain's iterator state (the index of the next batch): the same on
    every process and for any process count, so a checkpoint stores it once and a
    resume, even on another number of hosts, continues with the very next batch.
    """

    def __init__(self, dataset: grain.MapDataset, num_threads: int, prefetch: int):
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iterator = iter(dataset.to_iter_dataset(options))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def train_batches(rows: PackedRows | PackedConversations, micro_batch_size: int, config) -> Batches:
    """This process's training batches as config asks (seed, threads, prefetch): what the
    train loop reads, and so what the benchmarks time."""
    return Batches(
        train_dataset(rows, micro_batch_size, config.seed),
        config.data.num_threads,
        config.data.prefetch,
    )


@dataclasses.dataclass
class Data:
    tokenizer: object
    tokenizer_path: str
    train_rows: PackedRows | PackedConversations
    val_rows: PackedRows | PackedConversations
    fingerprint: str  # identifies the data stream, to notice a change across a resume


def load_or_train_tokenizer(config, workdir: epath.Path, train_docs: list[str]):
    """config.data.tokenizer if given; else the workdir's cached one; else train and cache."""
    if config.data.tokenizer:
        return tokenizer_lib.load(config.data.tokenizer), config.data.tokenizer
    path = workdir / "tokenizer.model"
    if not path.exists() and jax.process_index() == 0:
        tokenizer_lib.train(train_docs, config.model.vocab_size, path, seed=config.seed)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm tokenizer written")
    return tokenizer_lib.load(path), os.fspath(path)


def _builtin(config, workdir: epath.Path):
    d = config.data
    train_docs = corpus.builtin_documents("train", d.val_fraction)
    val_docs = corpus.builtin_documents("validation", d.val_fraction)
    sp, sp_path = load_or_train_tokenizer(config, workdir, train_docs)
    return (
        sp,
        sp_path,
        InMemoryDocuments(tokenize(sp, train_docs)),
        InMemoryDocuments(tokenize(sp, val_docs)),
        f"builtin:{d.val_fraction}",
    )


def _prepared(config, root: epath.Path):
    """A prepared directory's documents; its own tokenizer unless the config names the same."""
    dataset = prepared.PreparedDataset(root)
    sp_path = dataset.tokenizer_path
    if config.data.tokenizer and (
        prepared.file_sha256(config.data.tokenizer) != prepared.file_sha256(sp_path)
    ):
        raise ConfigError(
            f"config.data.tokenizer={config.data.tokenizer!r} is not the tokenizer "
            f"{root} was prepared with ({sp_path}); leave data.tokenizer empty to "
            "use the dataset's own, or prepare the data again with yours"
        )
    template = dataset.metadata.get("chat_template", "")
    if dataset.is_sft and config.data.chat_template not in ("", template):
        raise ConfigError(
            f"config.data.chat_template={config.data.chat_template!r}, but {root} "
            f"was prepared with --chat_template={template}; leave it empty or "
            "prepare the data again with yours"
        )
    if not dataset.metadata["splits"]["validation"]["documents"]:
        raise ConfigError(
            f"config.data.source: {root} has no validation documents; prepare it "
            "with --val_fraction above 0 (e.g. 0.01)"
        )
    return (
        tokenizer_lib.load(sp_path),
        os.fspath(sp_path),
        dataset.documents("train"),
        dataset.documents("validation"),
        f"prepared:{dataset.fingerprint()}",
    )


def _prepare_once(config, root: epath.Path, what: str, tokenizer: str, **arguments) -> epath.Path:
    """prepare() into `root` on process 0 (it resumes, so a finished one costs a listing) with
    `tokenizer`, or one trained for it; the other processes wait for it."""
    if jax.process_index() == 0:
        d = config.data
        tokenizer = (
            {"tokenizer": tokenizer}
            if tokenizer
            else {"train_tokenizer": True, "vocab_size": config.model.vocab_size}
        )
        try:
            prepare.prepare(
                output=root,
                val_fraction=d.val_fraction,
                workers=os.cpu_count() or 1,
                **tokenizer,
                **arguments,
            )
        except ValueError as e:
            raise ConfigError(f"config.data.source={d.source}: {e}") from e
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxlm {what} prepared")
    return root


def _prepare_tfds(config, name: str, workdir: epath.Path) -> epath.Path:
    """Tokenize the TFDS dataset once into the workdir (process 0; the rest wait)."""
    root = workdir / "data" / ("tfds-" + name.replace("/", "_").replace(":", "_"))
    if (root / prepared.METADATA).is_file():
        return root
    return _prepare_once(
        config,
        root,
        "tfds",
        config.data.tokenizer,
        inputs=f"tfds:{name}",
        text_key=config.data.text_key,
    )


def model_tokenizer(config, init_tokenizer: str = "") -> str:
    """data.tokenizer, else the tokenizer of the run checkpoint.init_from starts from (SFT
    tokenizes with the model's own; the caller reads it: jaxlm.run.recorded_tokenizer),
    else "" (prepare trains one)."""
    if config.data.tokenizer or not config.checkpoint.init_from:
        return config.data.tokenizer
    return init_tokenizer


def write_builtin_instructions(workdir: epath.Path) -> str:
    """`sft:builtin`: the stdlib's functions as prompt (signature + docstring) / completion
    (body) records, written once as JSONL into the workdir; its path."""
    path = workdir / "data" / "builtin-instructions.jsonl"
    if jax.process_index() == 0 and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in corpus.builtin_instructions()))
        tmp.replace(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxlm builtin instructions written")
    return os.fspath(path)


def _prepare_sft(config, pattern: str, workdir: epath.Path, init_tokenizer: str) -> epath.Path:
    """Chat JSONL prepared (with --sft) into the workdir; again only what changed."""
    d = config.data
    if pattern == "builtin":
        pattern = write_builtin_instructions(workdir)
    if not d.chat_template:
        raise ConfigError(
            f"config.data.source={d.source!r} needs config.data.chat_template: "
            f"one of {', '.join(sft.TEMPLATES)} (how the model's conversations "
            "are laid out; 'plain' for prompt/completion data on a base model)"
        )
    tokenizer = model_tokenizer(config, init_tokenizer)
    if tokenizer:  # its special tokens suit the template: say so in the config's words
        try:
            sft.Encoder(tokenizer_lib.load(tokenizer), d.chat_template, "config.data.chat_template")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    key = hashlib.sha256(f"{pattern}|{d.chat_template}|{tokenizer}".encode()).hexdigest()[:12]
    return _prepare_once(
        config,
        workdir / "data" / f"sft-{key}",
        "sft",
        tokenizer,
        inputs=pattern,
        sft=True,
        chat_template=d.chat_template,
    )


def _source(config, workdir: epath.Path, init_tokenizer: str):
    """(tokenizer, its path, train documents, validation documents, source id)."""
    d = config.data
    if d.source == "builtin":
        return _builtin(config, workdir)
    if d.source.startswith(ARRAYRECORD):
        return _prepared(config, epath.Path(d.source.removeprefix(ARRAYRECORD)).expanduser())
    if d.source.startswith(tfds_source.PREFIX):
        root = _prepare_tfds(config, d.source.removeprefix(tfds_source.PREFIX), workdir)
        return _prepared(config, root)
    if d.source.startswith(SFT):
        root = _prepare_sft(config, d.source.removeprefix(SFT), workdir, init_tokenizer)
        return _prepared(config, root)
    raise ConfigError(
        f"config.data.source={d.source!r}: use 'builtin', "
        f"'{ARRAYRECORD}DIR' (from python -m jaxlm.data.prepare), "
        f"'{tfds_source.PREFIX}NAME' or '{SFT}GLOB'"
    )


def rows_for(documents: Documents, config):
    """Packed rows of pre-training documents, or of SFT conversations (masked documents)."""
    d = config.data
    if not documents.masked:
        return PackedRows(documents, d.seq_len, seed=config.seed)
    if d.seq_len_schedule:
        raise ConfigError(
            "config.data.seq_len_schedule: not with SFT data (conversations are "
            "packed whole into rows of data.seq_len); set it to ()"
        )
    return PackedConversations(documents, d.seq_len, seed=config.seed, overflow=d.sft_overflow)


def build(config, workdir: str | os.PathLike, init_tokenizer: str = "") -> Data:
    """The tokenizer and packed train/validation rows for config.data. `init_tokenizer`: the
    tokenizer recorded by the checkpoint config.checkpoint.init_from names (SFT data is
    tokenized with it when data.tokenizer is empty)."""
    d, workdir = config.data, epath.Path(workdir)
    try:
        sp, sp_path, train_docs, val_docs, source_id = _source(config, workdir, init_tokenizer)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # a missing or unreadable file named by the config
        raise ConfigError(str(e)) from e
    if sp.vocab_size() > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
            f"tokenizer's vocabulary ({sp.vocab_size()} pieces, {sp_path}); set "
            f"model.vocab_size to at least {sp.vocab_size()}"
        )
    stream = f"{source_id}|seq_len={d.seq_len}|seed={config.seed}"
    if train_docs.masked:
        stream += f"|overflow={d.sft_overflow}"
    return Data(
        tokenizer=sp,
        tokenizer_path=sp_path,
        train_rows=rows_for(train_docs, config),
        val_rows=rows_for(val_docs, config),
        fingerprint=hashlib.sha256(stream.encode()).hexdigest()[:16],
    )
