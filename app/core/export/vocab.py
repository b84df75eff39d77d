"""The tokenizer as llama.cpp reads it from a GGUF: vocabulary, scores, token types, merges, special tokens.

Two kinds, as llama.cpp's converter writes them:
- SentencePiece ("llama"): a tokenizer.model (needs the sentencepiece package), or a tokenizer.json holding a
  BPE model with byte fallback (Llama 2 / Mistral style), read with the gguf package's own vocab classes;
- byte-level BPE ("gpt2"): tokens, token types and merges from tokenizer.json, and the pre-tokenizer named
  the way llama.cpp names it: the hash of the model's tokenization of llama.cpp's check text.
Special token ids, add-BOS/EOS flags and the chat template come from gguf's SpecialVocab.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.export.pre_tokenizer_hashes import CHECK_TEXT, KNOWN_HASHES
from app.core.problems import FrankenMoEError

# gguf.TokenType values, spelled out so that this module imports without gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
# What llama.cpp runs for a pre-tokenizer it cannot name: its "default" BPE splitting.
DEFAULT_PRE = "default"


@dataclass
class GgufVocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # tokenizer.ggml.pre
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab: merges, special ids, add-BOS/EOS flags, chat template
    warnings: list[str] = field(default_factory=list)


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The tokenizer of model_dir padded to vocab_size rows, as llama.cpp's converter writes it."""
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else None
    model = (data or {}).get("model", {})
    if data is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = _byte_level_bpe(model_dir, data, vocab_size)
    elif (model_dir / "tokenizer.model").is_file() or (data is not None and model.get("type") == "BPE"):
        vocab = _sentencepiece(model_dir, vocab_size)
    else:
        kind = model.get("type") if data is not None else "none"
        raise FrankenMoEError(
            f"the tokenizer in {model_dir} ({kind}) is not one llama.cpp reads from a converted model "
            "(SentencePiece or byte-level BPE)",
            "export a model whose tokenizer.json holds a BPE model, or which has a SentencePiece tokenizer.model",
        )
    vocab.special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    return vocab


def _byte_level_bpe(model_dir: Path, data: dict[str, Any], vocab_size: int) -> GgufVocab:
    ids: dict[int, str] = {index: token for token, index in data["model"]["vocab"].items()}
    kinds = {index: NORMAL for index in ids}
    for added in data.get("added_tokens", []):
        ids[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    if max(ids) >= vocab_size:
        raise FrankenMoEError(
            f"the tokenizer has token id {max(ids)}, beyond the model's {vocab_size} embedding rows",
            "export a model whose tokenizer matches its embeddings",
        )
    tokens, types = [], []
    for index in range(vocab_size):
        # Rows the tokenizer never produces get placeholder names, as llama.cpp's converter writes them.
        tokens.append(ids.get(index, f"[PAD{index}]").encode("utf-8"))
        types.append(kinds.get(index, UNUSED))
    pre, warnings = identify_pre_tokenizer(model_dir, data)
    return GgufVocab("gpt2", pre, tokens, types, None, None, warnings)


def identify_pre_tokenizer(model_dir: Path, data: dict[str, Any]) -> tuple[str, list[str]]:
    """(tokenizer.ggml.pre, warnings): llama.cpp's name for the hash of the check text's ids, else a fallback."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(CHECK_TEXT).ids
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_HASHES:
        return KNOWN_HASHES[digest], []
    # A plain GPT-2 byte-level pre-tokenizer (regex on) splits exactly as llama.cpp's "gpt-2" does.
    pre_tokenizer = data.get("pre_tokenizer") or {}
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2", []
    return DEFAULT_PRE, [
        f"unknown pre-tokenizer (llama.cpp hash {digest[:12]}…): written as {DEFAULT_PRE!r}, so llama.cpp may split "
        "some text (digits, punctuation, non-Latin scripts) into other tokens than transformers does"
    ]


def _sentencepiece(model_dir: Path, vocab_size: int) -> GgufVocab:
    import gguf

    try:
        if (model_dir / "tokenizer.model").is_file():
            source = gguf.vocab.SentencePieceVocab(model_dir)
        else:
            source = gguf.vocab.LlamaHfVocab(model_dir)
    except (RuntimeError, ImportError) as exc:
        raise FrankenMoEError(
            f"reading the SentencePiece tokenizer of {model_dir} needs a package that is missing ({exc})",
            "pip install sentencepiece",
        ) from exc
    except (FileNotFoundError, TypeError, ValueError) as exc:
        raise FrankenMoEError(
            f"the tokenizer in {model_dir} cannot be read as a SentencePiece vocabulary: {exc}",
            "export a model with a Llama/Mistral-style tokenizer.model or tokenizer.json",
        ) from exc
    tokens, scores, types = [], [], []
    for text, score, kind in source.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    if len(tokens) > vocab_size:
        raise FrankenMoEError(
            f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embedding rows",
            "export a model whose tokenizer matches its embeddings",
        )
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)
    return GgufVocab("llama", DEFAULT_PRE, tokens, types, scores, None)
