"""Prompt token ids for router gates and routing previews, without importing transformers.

Gates, previews and the routing evaluation of a merged model tokenize prompts as mergekit-moe does:
the BOS text is prepended to each prompt, which is then encoded with no special tokens added.
`transformers.AutoTokenizer` would do, but importing it pulls in AutoConfig and the model config
chain (about 2.5 s), on the critical path of every merge. Nearly every model ships `tokenizer.json`,
the `tokenizers` library's own serialisation of the whole pipeline, so the fast path reads that file
directly; only a folder without one (e.g. sentencepiece `tokenizer.model` only, or GPT-2 style
`vocab.json` + `merges.txt`) goes through AutoTokenizer.

The fast path gives AutoTokenizer's ids for tokenizers that transformers also loads from
`tokenizer.json` as it is (`PreTrainedTokenizerFast`/`TokenizersBackend`, the Llama 3 style) and
for classes whose pipeline transformers 5 rebuilds identically from the file's vocabulary and merges
(`Qwen2Tokenizer`, `LlamaTokenizer` with a Metaspace pre-tokenizer). It differs where transformers 5
rebuilds a different pipeline: `LlamaTokenizer` always builds a Metaspace pre-tokenizer whose prefix
space depends on `legacy` in tokenizer_config.json, ignoring the file's normalizer. Llama 2 and
Mistral 7B v0.1 style files normalise with Prepend("▁") + Replace(" ", "▁"), so the text after the
BOS token gets its "▁" prefix here, as sentencepiece gives it in training and as transformers 4 (which
loaded tokenizer.json as it is) gave it to mergekit-moe, while transformers 5 with `legacy: false`
drops it ("<s>Hello" -> `<s>`, `Hello` rather than `<s>`, `▁Hello`). Transformers 5 also ignores
`tokenizer_class` for some model types (qwen2, phi3 and others it lists as having a wrong class on
the Hub) and rebuilds its own class for them: Qwen 2's pipeline (one token per digit) even over a
GPT-2 style tokenizer.json. We follow the model's file: it is what the model was published with, and
it makes a base model's preview and its merged model's evaluation (another model type) agree.

`decode` is only for showing each token of a preview: it keeps special tokens and skips
transformers' `clean_up_tokenization_spaces`, which transformers 5 ignores for BPE tokenizers anyway.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.problems import FrankenMoEError
from app.core.sources import MAX_TOKENIZER_JSON_BYTES, read_json_file

if TYPE_CHECKING:
    from tokenizers import AddedToken, Tokenizer

MAX_PROMPT_TOKENS = 1024

# The named special tokens transformers adds to the vocabulary when tokenizer.json lacks them.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")

_FIX = "use a base model folder that includes its tokenizer files (tokenizer.json and tokenizer_config.json)"


class PromptTokenizer(ABC):
    """Encodes prompts as mergekit-moe does and decodes ids for display, whichever library reads the files."""

    def __init__(self, bos_token: str | None) -> None:
        self.bos_token = bos_token

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Each prompt's ids: BOS text + prompt, no special tokens added, at most MAX_PROMPT_TOKENS."""
        bos = self.bos_token or ""
        return [ids[:MAX_PROMPT_TOKENS] for ids in self._encode_texts([bos + prompt for prompt in prompts])]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids, special tokens kept (transformers' `decode` with its default arguments)."""

    @abstractmethod
    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids, no special tokens added, not truncated."""


class _TokenizersPromptTokenizer(PromptTokenizer):
    """The fast path: the model's tokenizer.json run by the `tokenizers` library."""

    def __init__(self, tokenizer: Tokenizer, bos_token: str | None) -> None:
        super().__init__(bos_token)
        self._tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]


class _TransformersPromptTokenizer(PromptTokenizer):
    """The fallback for folders without tokenizer.json: whatever AutoTokenizer builds from the other files."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer.bos_token)
        self._tokenizer = tokenizer

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids)))

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._tokenizer(texts, add_special_tokens=False)["input_ids"]]


def load_prompt_tokenizer(folder: Path) -> PromptTokenizer:
    """The prompt tokenizer of a model folder: tokenizer.json when there is one, else AutoTokenizer."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return _load_tokenizer_json(folder)
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoTokenizer

    try:
        return _TransformersPromptTokenizer(AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(f"cannot load the tokenizer of {folder} ({exc})", _FIX) from exc


def _load_tokenizer_json(folder: Path) -> PromptTokenizer:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    try:
        if path.stat().st_size > MAX_TOKENIZER_JSON_BYTES:
            raise ValueError(f"it is past the {MAX_TOKENIZER_JSON_BYTES // 2**20} MB limit for tokenizer.json")
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
        raise _damaged(path, exc) from exc
    # Padding and truncation saved in the file are for batches of training data, not for our prompts.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    special = _special_tokens(folder)
    # As transformers does: a named special token missing from the file's added tokens is added, so
    # that the BOS text prepended to each prompt becomes one token rather than its characters.
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    tokenizer.add_special_tokens([t for t in special.values() if t is not None and t.content not in added])
    bos = special.get("bos_token")
    return _TokenizersPromptTokenizer(tokenizer, bos.content if bos is not None else None)


def _special_tokens(folder: Path) -> dict[str, AddedToken | None]:
    """Named special tokens from tokenizer_config.json, else special_tokens_map.json; None where set to null."""
    from tokenizers import AddedToken

    config = _read_json(folder / "tokenizer_config.json")
    fallback = _read_json(folder / "special_tokens_map.json")
    tokens: dict[str, AddedToken | None] = {}
    for key in _SPECIAL_TOKEN_KEYS:
        value = config[key] if key in config else fallback.get(key)
        if isinstance(value, str):
            tokens[key] = AddedToken(value, special=True, normalized=False)
        elif isinstance(value, dict) and isinstance(value.get("content"), str):
            tokens[key] = AddedToken(
                value["content"],
                single_word=bool(value.get("single_word", False)),
                lstrip=bool(value.get("lstrip", False)),
                rstrip=bool(value.get("rstrip", False)),
                normalized=bool(value.get("normalized", False)),
                special=True,
            )
        else:
            tokens[key] = None
    return tokens


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file: {} when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = read_json_file(path)
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if not isinstance(data, dict):
        raise _damaged(path, "not a JSON object")
    return data


def _damaged(path: Path, reason: object) -> FrankenMoEError:
    return FrankenMoEError(f"cannot read {path} ({reason})", f"the file is damaged: download it again, or {_FIX}")
