"""The tokenizer as llama.cpp reads it from a GGUF: vocabulary, scores, token types, merges, special tokens.

Two kinds, as llama.cpp's converter writes them:
- SentencePiece ("llama"): a tokenizer.json holding a BPE model with byte fallback (Llama 2 / Mistral style),
  scored by merge rank, or else a tokenizer.model, read with the gguf package's SentencePieceVocab (needs the
  sentencepiece package);
- byte-level BPE ("gpt2"): tokens, token types and merges from tokenizer.json, and the pre-tokenizer named
  the way llama.cpp names it: the hash of the model's tokenization of llama.cpp's check text.
Special token ids, add-BOS/EOS flags and the chat template come from gguf's SpecialVocab.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.export.pre_tokenizer_hashes import CHECK_TEXT, KNOWN_HASHES
from app.core.problems import FrankenMoEError

# gguf.TokenType values, spelled out so that this module imports without gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space
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
    # SentencePiece: whether a "▁" goes before the text (None: llama.cpp's default, yes).
    add_space_prefix: bool | None = None


def read_vocab(model_dir: Path, vocab_size: int) -> GgufVocab:
    """The tokenizer of model_dir padded to vocab_size rows, as llama.cpp's converter writes it."""
    import gguf

    tokenizer_json = model_dir / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text(encoding="utf-8")) if tokenizer_json.is_file() else None
    model = (data or {}).get("model", {})
    if data is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        vocab = _byte_level_bpe(model_dir, data, vocab_size)
    elif data is not None and model.get("type") == "BPE":
        vocab = _sentencepiece_from_json(data, vocab_size)
    elif (model_dir / "tokenizer.model").is_file():
        vocab = _sentencepiece(model_dir, vocab_size)
    else:
        kind = model.get("type") if data is not None else "none"
        raise FrankenMoEError(
            f"the tokenizer in {model_dir} ({kind}) is not one llama.cpp reads from a converted model "
            "(SentencePiece or byte-level BPE)",
            "export a model whose tokenizer.json holds a BPE model, or which has a SentencePiece tokenizer.model",
        )
    vocab.special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    if data is not None:
        _settle_added_specials(model_dir, vocab.special)
    return vocab


def _settle_added_specials(model_dir: Path, special: Any) -> None:
    """Write add-BOS/EOS always: without them llama.cpp guesses from the tokenizer kind (a SentencePiece vocab,
    or Llama 3's pre-tokenizer, adds a BOS), which may not be what the model's own tokenizer does."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("a").ids
    for kind, position in (("bos", 0), ("eos", -1)):
        if kind not in special.add_special_token:
            token = special.special_token_ids.get(kind)
            special.add_special_token[kind] = token is not None and bool(ids) and ids[position] == token


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
        source = gguf.vocab.SentencePieceVocab(model_dir)
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
    return _padded_sentencepiece(tokens, scores, types, vocab_size, add_space_prefix=None)


def _sentencepiece_from_json(data: dict[str, Any], vocab_size: int) -> GgufVocab:
    """A Llama 2 / Mistral style tokenizer.json (BPE with byte fallback on "▁"-escaped text) as SentencePiece.

    llama.cpp's SentencePiece tokenizer merges the neighbouring pair whose joined text is the token with the
    highest score. Scoring each token by minus the rank of the merge that makes it replays BPE's merge order
    (what a SentencePiece BPE model's own scores do); characters and bytes are never merged into, so their score
    does not matter.
    """
    model = data["model"]
    rank: dict[str, int] = {}
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    ids: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    kinds = {index: BYTE if _BYTE_TOKEN.fullmatch(token) else NORMAL for index, token in ids.items()}
    if model.get("unk_token") in model["vocab"]:
        kinds[model["vocab"][model["unk_token"]]] = UNKNOWN
    for added in data.get("added_tokens", []):
        ids[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    count = max(ids) + 1
    tokens = [ids.get(i, f"[PAD{i}]").encode("utf-8") for i in range(count)]
    scores = [-float(rank[ids[i]]) if kinds.get(i) == NORMAL and ids.get(i) in rank else 0.0 for i in range(count)]
    types = [kinds.get(i, UNUSED) for i in range(count)]
    return _padded_sentencepiece(tokens, scores, types, vocab_size, add_space_prefix=_adds_space_prefix(data))


def _adds_space_prefix(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a "▁" before the text (llama.cpp's tokenizer.ggml.add_space_prefix)."""

    def steps(part: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
        if not part:
            return []
        return list(part.get(key, [])) if part.get("type") == "Sequence" else [part]

    prepends = any(
        n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in steps(data.get("normalizer"), "normalizers")
    )
    metaspace = any(
        p.get("type") == "Metaspace" and (p.get("prepend_scheme") in ("always", "first") or p.get("add_prefix_space"))
        for p in steps(data.get("pre_tokenizer"), "pretokenizers")
    )
    return prepends or metaspace


def _padded_sentencepiece(
    tokens: list[bytes], scores: list[float], types: list[int], vocab_size: int, add_space_prefix: bool | None
) -> GgufVocab:
    if len(tokens) > vocab_size:
        raise FrankenMoEError(
            f"the tokenizer has {len(tokens)} tokens, more than the model's {vocab_size} embedding rows",
            "export a model whose tokenizer matches its embeddings",
        )
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)
    return GgufVocab("llama", DEFAULT_PRE, tokens, types, scores, None, add_space_prefix=add_space_prefix)
