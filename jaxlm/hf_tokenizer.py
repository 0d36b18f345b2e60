"""A run's tokenizer as the files a Hugging Face model directory ships.

Beside `tokenizer.model` (sentencepiece) an export writes `tokenizer.json`, as Meta's Llama 2
repositories do: without it transformers converts the sentencepiece model at load time, which
needs `protobuf`, absent from a plain `pip install transformers sentencepiece` (lm-eval's
environment). The fast tokenizer comes from transformers' own converter; its pre-tokenizer
(Metaspace, which adds no "▁" before a text that starts with a space) is replaced by what
sentencepiece does with an identity normalizer, LLaMA's and jaxlm's: "▁" before the whole
text, spaces as "▁", and user-defined pieces (jaxlm's "\\n") kept whole. Then it encodes
every text as sentencepiece does (special tokens typed as text aside: the fast tokenizer
parses "<s>"). `special_tokens_map.json` and `generation_config.json` name BOS/EOS/pad.
"""

from __future__ import annotations

import json
import pathlib
import sys

from etils import epath

from jaxlm.data import tokenizer as tokenizer_lib

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _sentencepiece_json(out: pathlib.Path) -> str | None:
    """tokenizer.json's text for out/tokenizer.model (tokenizer_config.json beside it), or
    None with a warning when transformers (the converter) is not installed."""
    try:
        import tokenizers
        import transformers
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        print(
            f"warning: not writing tokenizer.json ({e}; pip install transformers): "
            "transformers will need protobuf to load this tokenizer",
            file=sys.stderr,
        )
        return None
    converted = transformers.AutoTokenizer.from_pretrained(out).backend_tokenizer
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    spec = proto.normalizer_spec
    if spec.name != "identity" or spec.remove_extra_whitespaces or not spec.add_dummy_prefix:
        return converted.to_str()  # the converter's normalizer already says what spm does
    user_defined = [
        p.piece
        for p in proto.pieces
        if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    ]
    converted.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.Prepend("▁"), tokenizers.normalizers.Replace(" ", "▁")]
    )
    converted.pre_tokenizer = (
        tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Split(piece, "isolated") for piece in user_defined]
        )
        if user_defined
        else None
    )
    text = json.loads(converted.to_str())
    # user-defined pieces split in the pre-tokenizer, not matched (per segment) as added tokens
    text["added_tokens"] = [t for t in text["added_tokens"] if t["special"]]
    return json.dumps(text, ensure_ascii=False, indent=2)


def export(path: str, out: pathlib.Path) -> tuple[int | None, int | None]:
    """Write the run's tokenizer (local or gs://, and Hugging Face files beside it) into the
    local `out` with the files that load it anywhere; (bos id, eos id)."""
    if not path or not epath.Path(path).is_file():
        print(
            f"warning: the run's tokenizer {path!r} is not there; writing no tokenizer",
            file=sys.stderr,
        )
        return None, None
    source = epath.Path(path)
    name = "tokenizer.json" if source.suffix == ".json" else "tokenizer.model"
    source.copy(out / name, overwrite=True)
    for extra in TOKENIZER_FILES:
        if extra != name and (source.parent / extra).is_file():
            (source.parent / extra).copy(out / extra, overwrite=True)
    tok = tokenizer_lib.load(out / name, "the run's tokenizer")
    ids = {"bos": tok.bos_id(), "eos": tok.eos_id(), "unk": tok.unk_id(), "pad": tok.pad_id()}
    special = (  # a tokenizer.json's specials are named by the tokenizer_config.json beside it
        {f"{k}_token": tok.id_to_piece(i) for k, i in ids.items() if i >= 0}
        if name == "tokenizer.model"
        else {}
    )
    if not (out / "tokenizer_config.json").is_file():  # a tokenizer jaxlm trained
        kind = "LlamaTokenizer" if name == "tokenizer.model" else "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": kind,
                    "add_bos_token": True,
                    "add_eos_token": False,
                    "legacy": False,
                    **special,
                },
                indent=2,
            )
        )
    if name == "tokenizer.model" and not (out / "tokenizer.json").is_file():
        fast = _sentencepiece_json(out)
        if fast is not None:
            (out / "tokenizer.json").write_text(fast, encoding="utf-8")
            # the fast tokenizer loads as written, not rebuilt by LlamaTokenizer's defaults
            config = json.loads((out / "tokenizer_config.json").read_text())
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if not (out / "special_tokens_map.json").is_file() and special:
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    generation = {f"{k}_token_id": i for k, i in ids.items() if k != "unk" and i >= 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return tuple(ids[k] if ids[k] >= 0 else None for k in ("bos", "eos"))
