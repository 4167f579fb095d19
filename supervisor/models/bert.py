"""Convert a BERT sentence-embedding checkpoint (a sentence-transformers folder: config.json,
model.safetensors, tokenizer.json, 1_Pooling/config.json) into a GGUF file llama.cpp reads,
with numpy and gguf-py only.

llama.cpp's own convert_hf_to_gguf.py does this too but imports torch (and transformers for
the vocabulary), which llmsup does not install. What it writes for BERT is small: the
hyperparameters, non-causal attention and the pooling type, the WordPiece vocabulary in
its "phantom space" form (a word-start piece gets a leading U+2581, a `##` continuation
loses its `##`), the special tokens, and the tensors under llama.cpp's names. Tensors are
written as float32, as stored: the models this is for are small (all-MiniLM-L6-v2 is 22 M
parameters, 87 MiB).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy

from llmsup.supervisor.models.errors import ModelError

# safetensors dtypes this reader takes (sentence-transformers checkpoints are float32).
DTYPES = {"F32": numpy.float32, "F16": numpy.float16}
# Checkpoint tensors llama.cpp's BERT graph does not use: the position ids buffer and the
# next-sentence pooler (sentence embeddings pool the token states instead).
UNUSED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS"}


def convert_bert(folder: Path, out: Path, name: str) -> None:
    """Write `folder`'s checkpoint to `out` as a GGUF (the caller's temporary file: a failed
    conversion leaves it half written)."""
    import gguf

    config = read_json(folder / "config.json")
    positions = config.get("position_embedding_type", "absolute")
    if config.get("model_type") != "bert" or positions != "absolute":
        raise ModelError(f"{folder} is not a BERT checkpoint with absolute positions")
    layers = int(config["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    writer.add_name(name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_block_count(layers)
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_layer_norm_eps(float(config["layer_norm_eps"]))
    writer.add_causal_attention(False)
    writer.add_pooling_type(getattr(gguf.PoolingType, pooling(folder)))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_token_type_count(int(config.get("type_vocab_size", 1)))
    add_vocab(writer, folder, int(config["vocab_size"]))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, layers)
    for hf_name, array in read_safetensors(folder / "model.safetensors", skip=UNUSED):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{folder}: tensor {hf_name} has no llama.cpp BERT name")
        writer.add_tensor(gguf_name, array.astype(numpy.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def pooling(folder: Path) -> str:
    """The sentence-transformers pooling (1_Pooling/config.json) as llama.cpp names it."""
    config = read_json(folder / "1_Pooling" / "config.json")
    modes = [k for k, on in config.items() if k.startswith("pooling_mode_") and on]
    if len(modes) != 1 or modes[0] not in POOLING:
        raise ModelError(f"{folder}: pooling {config} is not mean or cls alone")
    return POOLING[modes[0]]


def add_vocab(writer, folder: Path, size: int) -> None:
    import gguf

    tokenizer = read_json(folder / "tokenizer.json")
    model = tokenizer.get("model") or {}
    if model.get("type") != "WordPiece" or len(model.get("vocab") or ()) != size:
        raise ModelError(f"{folder}: tokenizer.json is not a WordPiece vocabulary of {size}")
    special = {t["id"] for t in tokenizer.get("added_tokens") or () if t.get("special")}
    tokens: list[str] = [""] * size
    for piece, index in model["vocab"].items():
        tokens[index] = piece
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(size)]
    pieces = [
        t if i in special else t[2:] if t.startswith("##") else "\u2581" + t
        for i, t in enumerate(tokens)
    ]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_types(types)
    # [CLS] is written as BOS (SpecialVocab reads the tokenizer's template): gguf-py has no
    # key of its own for it.
    kinds = ("bos", "eos", "unk", "sep", "pad", "mask")
    special_vocab = gguf.SpecialVocab(folder, load_merges=False, special_token_types=kinds)
    special_vocab.add_to_gguf(writer, quiet=True)


def read_safetensors(path: Path, skip: tuple[str, ...] = ()):
    """(name, array) of a .safetensors file, in file order, without a "bert." prefix, but
    those in `skip`: an 8-byte header size, a JSON header of dtype, shape and data
    offsets, then the data."""
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data = f.read()
    header.pop("__metadata__", None)
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        name = name.removeprefix("bert.")
        if name in skip:
            continue
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelError(f"{path}: tensor {name} is {entry['dtype']}, not F32 or F16")
        start, end = entry["data_offsets"]
        yield name, numpy.frombuffer(data[start:end], dtype=dtype).reshape(entry["shape"])


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
