"""Tokenized documents -> packed rows -> shuffled, per-process batches, with grain.

Documents (each `bos ... eos`) are laid end to end in a seeded order and cut into rows of
`seq_len + 1` tokens (consecutive rows overlap by one token, so no next-token pair is
lost, and a document longer than a row simply continues in the next row; only the last
row is padded). Only document lengths are needed to find which documents a row spans,
so rows are random access over any source (memory, ArrayRecord) and every batch is a
pure function of (seed, batch index). grain shuffles rows (afresh each epoch), batches
them, gives each process its slice of every global batch and prefetches on threads; its
iterator state (the next batch index) is what a checkpoint saves.

A short-to-long schedule (config.data.seq_len_schedule) changes only how a batch is cut:
batch k is always the same rows of data.seq_len, and `cut_rows` splits each into
seq_len / s consecutive rows of s tokens, which are exactly the rows PackedRows would cut
at length s (row i's piece j is row i * seq_len / s + j there). So tokens per step are
constant, no token is skipped or repeated when a stage starts, and a batch is a pure
function of (seed, batch index, the stage of its step): resuming anywhere is exact.

SFT data (conversations with a loss mask, jaxlm.data.sft) is packed by PackedConversations
instead: whole conversations per row, never split across rows (an answer cut from its question
teaches nothing), padding after the last one that fits; the mask travels with the tokens.

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
from jaxlm.errors import ConfigError

FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
ARRAYRECORD = "arrayrecord:"
SFT = "sft:"
OPEN_ROWS = 64  # PackedConversations: rows still being filled at once


def tokenize(sp, documents: list[str]) -> list[np.ndarray]:
    """Each document as `bos + pieces + eos` int32 ids."""
    prefix = [sp.bos_id()] if sp.bos_id() >= 0 else []
    suffix = [sp.eos_id()] if sp.eos_id() >= 0 else []
    return [np.asarray(prefix + ids + suffix, TOKEN_DTYPE)
            for ids in sp.encode(documents, num_threads=2)]


class PackedRows:
    """Random-access rows cut from documents concatenated in a seeded order.

    Row i holds inputs/targets (next token), segment_ids (1, 2, ... per document within
    the row, 0 for padding), positions (restarting at 0 at each document start within the
    row) and loss_mask (True where the target continues the input's document).
    """

    def __init__(self, documents: Documents | list[np.ndarray], seq_len: int, seed: int):
        if isinstance(documents, list):
            documents = InMemoryDocuments(documents)
        self.documents = documents
        self.order = np.random.default_rng(seed).permutation(len(documents))
        self.ends = np.cumsum(documents.lengths[self.order])  # end of each document, in order
        self.seq_len = seq_len

    @property
    def n_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return max(1, -(-(self.n_tokens - 1) // self.seq_len))

    @property
    def padding_fraction(self) -> float:
        """Share of input positions that are padding (only the last row has any)."""
        return 1 - max(0, self.n_tokens - 1) / (len(self) * self.seq_len)

    def describe(self) -> str:
        return (f"{self.n_tokens:,} tokens in {len(self):,} rows of {self.seq_len} "
                f"({100 * self.padding_fraction:.2f}% padding)")

    def _span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, stop) of the concatenation and their 1-based document numbers."""
        first = int(np.searchsorted(self.ends, start, side="right"))
        last = int(np.searchsorted(self.ends, stop - 1, side="right"))
        tokens, doc_ids = [], []
        for k in range(first, last + 1):
            doc_start = int(self.ends[k - 1]) if k else 0
            doc = self.documents[int(self.order[k])]
            piece = doc[max(start, doc_start) - doc_start:min(stop, int(self.ends[k])) - doc_start]
            tokens.append(piece)
            doc_ids.append(np.full(len(piece), k + 1, np.int32))
        return np.concatenate(tokens), np.concatenate(doc_ids)

    def __getitem__(self, i: int) -> dict:
        length = self.seq_len
        start = int(i) * length
        stop = min(start + length + 1, self.n_tokens)
        tokens = np.zeros(length + 1, TOKEN_DTYPE)
        doc_ids = np.zeros(length + 1, np.int32)
        if stop > start:
            chunk, chunk_docs = self._span(start, stop)
            tokens[:len(chunk)], doc_ids[:len(chunk)] = chunk, chunk_docs
        return _row(tokens, doc_ids)


def _row(tokens: np.ndarray, doc_ids: np.ndarray, trained: np.ndarray | None = None) -> dict:
    """A row's fields from its seq_len + 1 tokens, their documents (0: padding) and, for SFT,
    which tokens the loss trains on: a target counts where it continues its document."""
    doc = doc_ids[:-1]
    segment_ids, positions = _layout(doc)
    loss_mask = (doc_ids[1:] == doc) & (doc != 0)
    if trained is not None:
        loss_mask &= trained[1:] == 1
    return {"inputs": tokens[:-1], "targets": tokens[1:], "positions": positions,
            "segment_ids": segment_ids, "loss_mask": loss_mask}


class PackedConversations:
    """Random-access rows of whole conversations (SFT documents [2, n]: tokens, loss mask).

    Conversations are taken in a seeded order and placed first-fit into up to OPEN_ROWS rows
    being filled (the fullest is closed when one more is needed), each row holding up to
    seq_len + 1 tokens (its inputs and its last target). Fields as PackedRows gives them; a
    target counts (loss_mask) where it continues its conversation and the conversation's mask
    is 1 there. A conversation longer than a row follows `overflow`: "drop" leaves it out,
    "truncate_left" keeps its last seq_len + 1 tokens (the start of the prompt goes; the
    answers, their mask bits with them, stay). Both are counted (`overflowed`).
    """

    def __init__(self, documents: Documents | list[np.ndarray], seq_len: int, seed: int,
                 overflow: str = "drop"):
        if isinstance(documents, list):
            documents = InMemoryDocuments(documents)
        if overflow not in sft.OVERFLOW_POLICIES:
            raise ConfigError(f"config.data.sft_overflow={overflow!r}: use one of "
                              f"{sft.OVERFLOW_POLICIES}")
        self.documents, self.seq_len, self.overflow = documents, seq_len, overflow
        capacity = seq_len + 1
        lengths = np.asarray(documents.lengths, np.int64)
        too_long = lengths > capacity
        self.overflowed = int(too_long.sum())
        self.overflowed_tokens = int((lengths[too_long] - capacity).sum()
                                     if overflow == "truncate_left" else lengths[too_long].sum())
        candidates = np.flatnonzero(~too_long) if overflow == "drop" else np.arange(len(lengths))
        order = np.random.default_rng(seed).permutation(candidates)
        self.row_docs, self.row_starts = _first_fit(order, np.minimum(lengths, capacity)[order],
                                                    capacity)
        self.n_conversations = len(order)
        self.n_tokens = int(np.minimum(lengths, capacity)[order].sum())

    def __len__(self) -> int:
        return max(1, len(self.row_starts) - 1)

    @property
    def padding_fraction(self) -> float:
        """Share of input positions that are padding."""
        real = 0
        lengths = np.minimum(self.documents.lengths, self.seq_len + 1)
        for i in range(len(self.row_starts) - 1):
            docs = self.row_docs[self.row_starts[i]:self.row_starts[i + 1]]
            real += min(int(lengths[docs].sum()), self.seq_len)
        return 1 - real / (len(self) * self.seq_len)

    def describe(self) -> str:
        lost = {"drop": "dropped", "truncate_left": "truncated from the left"}[self.overflow]
        return (f"{self.n_conversations:,} conversations, {self.n_tokens:,} tokens in "
                f"{len(self):,} rows of {self.seq_len} ({100 * self.padding_fraction:.2f}% "
                f"padding); {self.overflowed:,} longer than seq_len + 1 = {self.seq_len + 1} "
                f"tokens {lost} ({self.overflowed_tokens:,} tokens lost; "
                "data.sft_overflow)")

    def __getitem__(self, i: int) -> dict:
        capacity = self.seq_len + 1
        tokens = np.zeros(capacity, TOKEN_DTYPE)
        mask = np.zeros(capacity, TOKEN_DTYPE)
        doc_ids = np.zeros(capacity, np.int32)
        at = 0
        if len(self.row_starts) > 1:
            for k, d in enumerate(self.row_docs[self.row_starts[i]:self.row_starts[i + 1]]):
                record = self.documents[int(d)][:, -capacity:]  # truncate_left, if longer
                n = record.shape[1]
                tokens[at:at + n], mask[at:at + n], doc_ids[at:at + n] = record[0], record[1], k + 1
                at += n
        return _row(tokens, doc_ids, mask)


def _first_fit(order: np.ndarray, lengths: np.ndarray, capacity: int):
    """Rows of documents (`order`, with `lengths`) as (documents in row order, row starts)."""
    free = np.zeros(0, np.int64)  # space left in each open row
    open_rows: list[list[int]] = []
    closed: list[list[int]] = []
    for d, n in zip(order.tolist(), lengths.tolist()):
        fits = np.flatnonzero(free >= n)
        if len(fits):
            j = int(fits[0])
        else:
            if len(open_rows) == OPEN_ROWS:
                full = int(np.argmin(free))
                closed.append(open_rows.pop(full))
                free = np.delete(free, full)
            open_rows.append([])
            free = np.append(free, capacity)
            j = len(open_rows) - 1
        open_rows[j].append(d)
        free[j] -= n
    rows = closed + open_rows
    starts = np.cumsum([0] + [len(r) for r in rows])
    docs = np.asarray([d for r in rows for d in r], np.int64)
    return docs, starts


def _layout(doc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions of rows (last axis) whose tokens come from documents `doc`
    (any ids, equal within a document, 0 for padding); a row starts a segment."""
    starts = np.ones(doc.shape, bool)
    starts[..., 1:] = doc[..., 1:] != doc[..., :-1]
    segment_ids = (np.cumsum(starts, axis=-1) * (doc != 0)).astype(np.int32)
    index = np.broadcast_to(np.arange(doc.shape[-1]), doc.shape)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return segment_ids, positions.astype(np.int32)


def cut_rows(batch: dict, seq_len: int) -> dict:
    """A batch of rows cut into rows of `seq_len` tokens (which divides the row length): the
    rows PackedRows cuts at `seq_len` from the same tokens, in the same order."""
    rows, length = batch["inputs"].shape
    if seq_len == length:
        return batch
    pieces = {k: np.asarray(v).reshape(rows * (length // seq_len), seq_len)
              for k, v in batch.items()}
    # Segment ids already tell documents apart within a row; renumber them per piece.
    pieces["segment_ids"], pieces["positions"] = _layout(pieces["segment_ids"])
    return pieces


def _process_share(global_batch_size: int) -> tuple[int, int, int]:
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigError(f"a batch of {global_batch_size} sequences cannot be split evenly over "
                          f"{count} processes; make train.global_batch_size / "
                          f"train.grad_accum_steps a multiple of {count}")
    return global_batch_size // count, index, count


def train_dataset(rows: PackedRows | PackedConversations, global_batch_size: int, seed: int) -> grain.MapDataset:
    """This process's batches: element k is its share of global batch k.

    Global batch k is rows k*B .. (k+1)*B-1 of the shuffled stream whatever the number of
    processes: process p of P takes the p-th of P equal consecutive parts.
    """
    local, index, count = _process_share(global_batch_size)
    batches = grain.MapDataset.source(rows).shuffle(seed=seed).repeat().batch(local)
    return batches[index::count]


def eval_dataset(rows: PackedRows | PackedConversations, global_batch_size: int, n_batches: int) -> grain.MapDataset:
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
    return Batches(train_dataset(rows, micro_batch_size, config.seed), config.data.num_threads,
                   config.data.prefetch)


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
    return (sp, sp_path, InMemoryDocuments(tokenize(sp, train_docs)),
            InMemoryDocuments(tokenize(sp, val_docs)), f"builtin:{d.val_fraction}")


def _prepared(config, root: epath.Path):
    """A prepared directory's documents; its own tokenizer unless the config names the same."""
    dataset = prepared.PreparedDataset(root)
    sp_path = dataset.tokenizer_path
    if config.data.tokenizer and (prepared.file_sha256(config.data.tokenizer)
                                  != prepared.file_sha256(sp_path)):
        raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} is not the tokenizer "
                          f"{root} was prepared with ({sp_path}); leave data.tokenizer empty to "
                          "use the dataset's own, or prepare the data again with yours")
    template = dataset.metadata.get("chat_template", "")
    if dataset.is_sft and config.data.chat_template not in ("", template):
        raise ConfigError(f"config.data.chat_template={config.data.chat_template!r}, but {root} "
                          f"was prepared with --chat_template={template}; leave it empty or "
                          "prepare the data again with yours")
    if not dataset.metadata["splits"]["validation"]["documents"]:
        raise ConfigError(f"config.data.source: {root} has no validation documents; prepare it "
                          "with --val_fraction above 0 (e.g. 0.01)")
    return (tokenizer_lib.load(sp_path), os.fspath(sp_path), dataset.documents("train"),
            dataset.documents("validation"), f"prepared:{dataset.fingerprint()}")


def _prepare_once(config, root: epath.Path, what: str, tokenizer: str,
                  **arguments) -> epath.Path:
    """prepare() into `root` on process 0 (it resumes, so a finished one costs a listing) with
    `tokenizer`, or one trained for it; the other processes wait for it."""
    if jax.process_index() == 0:
        d = config.data
        tokenizer = ({"tokenizer": tokenizer} if tokenizer
                     else {"train_tokenizer": True, "vocab_size": config.model.vocab_size})
        try:
            prepare.prepare(output=root, val_fraction=d.val_fraction,
                            workers=os.cpu_count() or 1, **tokenizer, **arguments)
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
    return _prepare_once(config, root, "tfds", config.data.tokenizer, inputs=f"tfds:{name}",
                         text_key=config.data.text_key)


def model_tokenizer(config) -> str:
    """data.tokenizer, else the tokenizer of the run checkpoint.init_from starts from (SFT
    tokenizes with the model's own), else "" (prepare trains one)."""
    if config.data.tokenizer or not config.checkpoint.init_from:
        return config.data.tokenizer
    from jaxlm import checkpoint as checkpoint_lib

    path = epath.Path(config.checkpoint.init_from).expanduser().absolute()
    manager, step = checkpoint_lib.open_read_only(*checkpoint_lib.split_step(path))
    try:
        recorded = checkpoint_lib.read_meta(manager, step).get("tokenizer", "") if step else ""
    finally:
        manager.close()
    return recorded if recorded and epath.Path(recorded).is_file() else ""


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


def _prepare_sft(config, pattern: str, workdir: epath.Path) -> epath.Path:
    """Chat JSONL prepared (with --sft) into the workdir; again only what changed."""
    d = config.data
    if pattern == "builtin":
        pattern = write_builtin_instructions(workdir)
    if not d.chat_template:
        raise ConfigError(f"config.data.source={d.source!r} needs config.data.chat_template: "
                          f"one of {', '.join(sft.TEMPLATES)} (how the model's conversations "
                          "are laid out; 'plain' for prompt/completion data on a base model)")
    tokenizer = model_tokenizer(config)
    if tokenizer:  # its special tokens suit the template: say so in the config's words
        try:
            sft.Encoder(tokenizer_lib.load(tokenizer), d.chat_template, "config.data.chat_template")
        except ValueError as e:
            raise ConfigError(str(e)) from e
    key = hashlib.sha256(f"{pattern}|{d.chat_template}|{tokenizer}".encode()).hexdigest()[:12]
    return _prepare_once(config, workdir / "data" / f"sft-{key}", "sft", tokenizer,
                         inputs=pattern, sft=True, chat_template=d.chat_template)


def _source(config, workdir: epath.Path):
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
        return _prepared(config, _prepare_sft(config, d.source.removeprefix(SFT), workdir))
    raise ConfigError(f"config.data.source={d.source!r}: use 'builtin', "
                      f"'{ARRAYRECORD}DIR' (from python -m jaxlm.data.prepare), "
                      f"'{tfds_source.PREFIX}NAME' or '{SFT}GLOB'")


def rows_for(documents: Documents, config):
    """Packed rows of pre-training documents, or of SFT conversations (masked documents)."""
    d = config.data
    if not documents.masked:
        return PackedRows(documents, d.seq_len, seed=config.seed)
    if d.seq_len_schedule:
        raise ConfigError("config.data.seq_len_schedule: not with SFT data (conversations are "
                          "packed whole into rows of data.seq_len); set it to ()")
    return PackedConversations(documents, d.seq_len, seed=config.seed, overflow=d.sft_overflow)


def build(config, workdir: str | os.PathLike) -> Data:
    """The tokenizer and packed train/validation rows for config.data."""
    d, workdir = config.data, epath.Path(workdir)
    try:
        sp, sp_path, train_docs, val_docs, source_id = _source(config, workdir)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as e:  # a missing or unreadable file named by the config
        raise ConfigError(str(e)) from e
    if sp.vocab_size() > config.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"tokenizer's vocabulary ({sp.vocab_size()} pieces, {sp_path}); set "
                          f"model.vocab_size to at least {sp.vocab_size()}")
    stream = f"{source_id}|seq_len={d.seq_len}|seed={config.seed}"
    if train_docs.masked:
        stream += f"|overflow={d.sft_overflow}"
    return Data(
        tokenizer=sp, tokenizer_path=sp_path,
        train_rows=rows_for(train_docs, config), val_rows=rows_for(val_docs, config),
        fingerprint=hashlib.sha256(stream.encode()).hexdigest()[:16],
    )
