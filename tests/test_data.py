"""Bring-your-own data: prepare -> ArrayRecord -> packed grain batches -> training.

The corpus is generated here, so every document, every bad line and every expected count
is known; prepared data is checked by decoding it back, not against the code's own counts.
"""

import gzip
import json
import os
import pathlib
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
import zstandard
from support import small_config

from jaxlm import config as config_lib
from jaxlm import train as train_lib
from jaxlm.data import pipeline, prepare, prepared

WORDS = (
    "alpha beta gamma delta model token batch shard grain jax flax optax orbax "
    "packing segment position rotary norm layer head vocab loss step"
).split()
VOCAB = 320  # tokenizer pieces; the models here have 384 rows
MAX_CHARS = 20_000
WORKER = pathlib.Path(__file__).resolve().parent / "data_worker.py"


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Files of every supported kind, with the good texts and the bad lines they contain."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus")
    good = []

    def docs(n):
        out = [_text(rng, rng.choice([3, 20, 60, 400])) for _ in range(n)]
        good.extend(out)
        return out

    with open(root / "a.jsonl", "w") as f:
        for text in docs(120):
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
        f.write(json.dumps({"body": "no text key"}) + "\n")  # line 121
        f.write("{not json\n")  # line 122
        f.write(json.dumps({"text": "x" * (MAX_CHARS + 1)}) + "\n")  # line 123: too long
    with open(root / "a.jsonl", "ab") as f:
        f.write(b'{"text": "bad \xff byte"}\n')  # line 124: invalid UTF-8
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for text in docs(80):
            f.write(json.dumps({"text": text}) + "\n")
    paragraphs = docs(40)
    (root / "c.txt.zst").write_bytes(
        zstandard.ZstdCompressor().compress("\n\n\n".join(paragraphs).encode())
    )
    (root / "d.txt").write_text("")  # an empty file
    bad = {
        "missing_key": [f"{root}/a.jsonl:121"],
        "invalid_json": [f"{root}/a.jsonl:122"],
        "too_long": [f"{root}/a.jsonl:123"],
        "invalid_utf8": [f"{root}/a.jsonl:124"],
        "empty_file": [f"{root}/d.txt"],
    }
    return root, good, bad


def _prepare(corpus_root, output, **extra):
    return prepare.prepare(
        f"{corpus_root}/*",
        output,
        txt_mode="blank_line",
        val_fraction=0.1,
        workers=2,
        max_document_chars=MAX_CHARS,
        **extra,
    )


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared") / "mycorpus"
    _prepare(corpus[0], output, train_tokenizer=True, vocab_size=VOCAB)
    return output


def _all_records(data_dir):
    dataset = prepared.PreparedDataset(data_dir)
    return {
        split: [dataset.documents(split)[i] for i in range(len(dataset.documents(split)))]
        for split in prepared.SPLITS
    }


def test_prepare_keeps_every_good_document_and_reports_each_bad_one(corpus, data_dir, capsys):
    _, good, bad = corpus
    meta = json.loads((data_dir / prepared.METADATA).read_text())
    assert meta["skipped"]["counts"] == {reason: 1 for reason in bad}
    assert meta["skipped"]["examples"] == bad
    sp = spm.SentencePieceProcessor(model_file=str(data_dir / prepared.TOKENIZER))
    records = _all_records(data_dir)
    decoded = []
    for split, docs in records.items():
        assert meta["splits"][split]["documents"] == len(docs)
        assert meta["splits"][split]["tokens"] == sum(len(d) for d in docs)
        for doc in docs:
            assert doc[0] == sp.bos_id() and doc[-1] == sp.eos_id()
            decoded.append(sp.decode(doc[1:-1].tolist()))
    assert sorted(decoded) == sorted(good)  # nothing lost, nothing invented, text intact
    assert 0 < len(records["validation"]) < 0.25 * len(good)


def test_prepare_summary_names_file_and_line(corpus, tmp_path, capsys):
    root, _, bad = corpus
    prepare.main(
        [
            f"--input={root}/a.jsonl",
            f"--output={tmp_path / 'out'}",
            "--train_tokenizer",
            f"--vocab_size={VOCAB}",
            f"--max_document_chars={MAX_CHARS}",
            "--workers=1",
        ]
    )
    out = capsys.readouterr().out
    for reason in ("missing_key", "invalid_json", "too_long", "invalid_utf8"):
        assert f"skipped 1 x {prepare.readers.SKIP_REASONS[reason]} (e.g. {bad[reason][0]})" in out
    assert "tokens/s" in out and "arrayrecord:" in out


def test_prepare_with_nothing_usable_stops_with_the_reasons(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n\n')
    with pytest.raises(SystemExit, match=r"no usable training documents.*without the text key"):
        prepare.main(
            [
                f"--input={tmp_path}/bad.jsonl",
                f"--output={tmp_path / 'out'}",
                "--train_tokenizer",
                "--workers=1",
            ]
        )
    with pytest.raises(SystemExit, match=r"matches no file"):
        prepare.main(
            [f"--input={tmp_path}/none*.jsonl", f"--output={tmp_path / 'out'}", "--train_tokenizer"]
        )


def test_interrupted_prepare_redoes_only_unfinished_pieces(corpus, data_dir, tmp_path, capsys):
    output = tmp_path / "copy"
    tokenizer = data_dir / prepared.TOKENIZER
    _prepare(corpus[0], output, tokenizer=tokenizer)
    first = json.loads((output / prepared.METADATA).read_text())
    kept = prepared.shard_path(output, "train", 0)
    mtime = kept.stat().st_mtime_ns
    # An interruption while piece 1 was being written: no marker, a partial shard, no metadata.
    prepared.piece_marker(output, 1).unlink()
    prepared.shard_path(output, "train", 1).write_bytes(b"partial")
    (output / prepared.METADATA).unlink()
    capsys.readouterr()
    _prepare(corpus[0], output, tokenizer=tokenizer)
    assert "resuming: 3 of 4 pieces already done" in capsys.readouterr().out
    assert kept.stat().st_mtime_ns == mtime  # finished pieces were not redone
    assert json.loads((output / prepared.METADATA).read_text()) == first
    assert [len(d) for d in _all_records(output)["train"]] == [
        len(d) for d in _all_records(data_dir)["train"]
    ]


def test_llama_style_tokenizer_is_used_as_is(corpus, tmp_path):
    """Special ids come from the model file (here deliberately not the usual 0/1/2, no pad)."""
    model = tmp_path / "llama.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus[1]),
        model_prefix=str(model.with_suffix("")),
        vocab_size=300,
        model_type="bpe",
        unk_id=2,
        bos_id=0,
        eos_id=1,
        pad_id=-1,
        byte_fallback=True,
        minloglevel=2,
    )
    _prepare(corpus[0], tmp_path / "out", tokenizer=model)
    meta = json.loads((tmp_path / "out" / prepared.METADATA).read_text())
    assert {k: meta["tokenizer"][k] for k in ("bos_id", "eos_id", "pad_id")} == {
        "bos_id": 0,
        "eos_id": 1,
        "pad_id": -1,
    }
    doc = _all_records(tmp_path / "out")["train"][0]
    assert doc[0] == 0 and doc[-1] == 1 and 0 not in doc[1:] and 1 not in doc[:-1]


def test_packing_keeps_every_token_once_and_marks_document_boundaries(data_dir):
    eos = spm.SentencePieceProcessor(model_file=str(data_dir / prepared.TOKENIZER)).eos_id()
    documents = prepared.PreparedDataset(data_dir).documents("train")
    rows = pipeline.PackedRows(documents, seq_len=64, seed=3)
    assert rows.documents.lengths.max() > 64  # some documents span several rows
    batch = [rows[i] for i in range(len(rows))]  # one whole epoch, in row order
    stream = np.concatenate([r["inputs"] for r in batch])
    targets = np.concatenate([r["targets"] for r in batch])
    n = int(documents.lengths.sum())
    assert (stream[n:] == 0).all() and (targets[n - 1 :] == 0).all()  # only the tail is padding
    assert (targets[: n - 1] == stream[1:n]).all()
    # Split the stream after each eos: the same documents, each exactly once.
    ends = np.flatnonzero(stream[:n] == eos) + 1
    rebuilt = sorted(tuple(d) for d in np.split(stream[:n], ends[:-1]))
    assert rebuilt == sorted(tuple(documents[i]) for i in range(len(documents)))
    for row in batch:
        inputs, seg, pos = row["inputs"], row["segment_ids"], row["positions"]
        real = seg > 0
        starts = np.concatenate([[True], inputs[:-1] == eos]) & real  # a new document begins
        assert (np.diff(seg[real]) == starts[real][1:]).all()
        expected = np.zeros_like(pos)
        for t in range(1, len(pos)):
            expected[t] = 0 if starts[t] else expected[t - 1] + 1
        assert (pos[real] == expected[real]).all()
        assert (row["loss_mask"] == (real & (inputs != eos) & (row["targets"] != 0))).all()


def _batches(data_dir, batch, seed=7):
    rows = pipeline.PackedRows(prepared.PreparedDataset(data_dir).documents("train"), 32, seed)
    return pipeline.Batches(pipeline.train_dataset(rows, batch, seed), num_threads=2, prefetch=2)


def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _worker(*args, env=None, timeout=240):
    result = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # other processes
def test_batches_are_reproducible_and_resume_bitwise_in_a_new_process(data_dir, tmp_path):
    first, second = _batches(data_dir, 4), _batches(data_dir, 4)
    expected = [next(first) for _ in range(8)]
    assert all(_equal(a, next(second)) for a in expected)
    assert not _equal(expected[0], expected[1])
    state = _worker("state-save", data_dir, 32, 4, 5).strip().splitlines()[-1]
    assert json.loads(state) == {"next_index": 5}
    _worker("state-load", data_dir, 32, 4, state, 3, tmp_path / "resumed.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    for i, batch in enumerate(expected[5:]):
        assert _equal(batch, {k: resumed[f"{k}_{i}"] for k in batch})


@pytest.mark.slow  # other processes
def test_two_processes_assemble_the_single_process_global_batch(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "JAXLM_DISTRIBUTED": "1",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(rank),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        }
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    "multihost",
                    data_dir,
                    "32",
                    "8",
                    "3",
                    tmp_path / "mh.npz",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for p in processes:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    gathered = np.load(tmp_path / "mh.npz")
    single = _batches(data_dir, 8)  # this process alone reads the whole global batch
    for i in range(3):
        batch = next(single)
        assert len(batch["inputs"]) == 8
        assert _equal(batch, {k: gathered[f"{k}_{i}"] for k in batch})


def _train_config(source, tokenizer=""):
    config = small_config(fsdp=-1)  # all 8 simulated devices
    config.model.vocab_size = 384
    config.data.source, config.data.tokenizer = source, tokenizer
    config.train.steps, config.train.eval_every, config.train.log_every = 3, 3, 1
    config.data.eval_batches = 1
    return config


def test_train_three_steps_from_a_prepared_corpus(data_dir, tmp_path):
    last = train_lib.train(_train_config(f"arrayrecord:{data_dir}"), tmp_path / "run")
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


class JaxlmTestText(tfds.core.GeneratorBasedBuilder):
    """A tiny local TFDS dataset with train and validation splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(60, 0),
            "validation": self._generate_examples(6, 1),
        }

    def _generate_examples(self, n, seed):
        rng = random.Random(seed)
        for i in range(n):
            yield i, {"text": _text(rng, rng.choice([10, 80, 300]))}


def test_tfds_source_feeds_training(data_dir, tmp_path, monkeypatch):
    tfds_dir = tmp_path / "tfds"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    tokenizer = str(data_dir / prepared.TOKENIZER)
    with pytest.raises(config_lib.ConfigError, match=r"tfds:jaxlm_test_text.*download_and_prepare"):
        pipeline.build(_train_config("tfds:jaxlm_test_text", tokenizer), tmp_path / "none")
    JaxlmTestText(data_dir=str(tfds_dir), file_format="array_record").download_and_prepare()
    last = train_lib.train(_train_config("tfds:jaxlm_test_text", tokenizer), tmp_path / "run")
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])
    meta = json.loads((tmp_path / "run/data/tfds-jaxlm_test_text" / prepared.METADATA).read_text())
    assert meta["splits"]["train"]["documents"] == 60
    assert meta["splits"]["validation"]["documents"] == 6


def test_bad_data_config_is_reported_before_compiling(data_dir, tmp_path):
    too_small = _train_config(f"arrayrecord:{data_dir}")
    too_small.model.vocab_size = 256
    with pytest.raises(config_lib.ConfigError, match=r"model.vocab_size=256 .* at least 320"):
        pipeline.build(too_small, tmp_path)
    other = tmp_path / "other.model"
    other.write_bytes((data_dir / prepared.TOKENIZER).read_bytes() + b"\0")
    with pytest.raises(config_lib.ConfigError, match=r"data.tokenizer=.*not the tokenizer"):
        pipeline.build(_train_config(f"arrayrecord:{data_dir}", str(other)), tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"no metadata.json.*jaxlm.data.prepare"):
        pipeline.build(_train_config(f"arrayrecord:{tmp_path}"), tmp_path)
    with pytest.raises(config_lib.ConfigError, match=r"data.source.*'arrayrecord:DIR'"):
        config_lib.validate(_train_config("arrayrecord:"), 8)


def _decoded_train_documents(output):
    sp = spm.SentencePieceProcessor(model_file=str(output / prepared.TOKENIZER))
    docs = prepared.PreparedDataset(output).documents("train")
    return sorted(sp.decode(docs[i][1:-1].tolist()) for i in range(len(docs)))


def test_source_files_prepare_as_text_one_document_per_file(data_dir, tmp_path):
    rng = random.Random(1)
    texts = {name: _text(rng, 30) for name in ("a.py", "b.c", "c.rs", "README.md")}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    prepare.main(
        [
            f"--input={tmp_path}/*.*",
            f"--output={tmp_path / 'out'}",
            "--workers=1",
            f"--tokenizer={data_dir / prepared.TOKENIZER}",
            "--val_fraction=0",
        ]
    )
    assert _decoded_train_documents(tmp_path / "out") == sorted(texts.values())


def test_format_text_reads_any_extension_and_without_it_the_error_names_the_flag(
    data_dir, tmp_path
):
    text = _text(random.Random(2), 30)
    (tmp_path / "notes.weird").write_text(text)
    args = [
        f"--input={tmp_path}/notes.weird",
        f"--output={tmp_path / 'out'}",
        "--workers=1",
        f"--tokenizer={data_dir / prepared.TOKENIZER}",
        "--val_fraction=0",
    ]
    with pytest.raises(SystemExit, match=r"notes.weird: unknown input format.*--format=text") as e:
        prepare.main(args)
    assert "\n" not in str(e.value.code)  # one line
    assert not (tmp_path / "out").exists()  # refused before anything was written
    prepare.main([*args, "--format=text"])
    assert _decoded_train_documents(tmp_path / "out") == [text]
    meta = json.loads((tmp_path / "out" / prepared.METADATA).read_text())
    assert meta["input_format"] == "text"
