"""Prompt tokenization from tokenizer.json, checked against transformers' AutoTokenizer as the reference.

Every tokenizer here is trained locally with the `tokenizers` library and saved as a real model folder
(tokenizer.json, tokenizer_config.json, special_tokens_map.json where that family ships one, and a
config.json naming the model type, which AutoTokenizer reads to pick its class).

Two kinds differ from AutoTokenizer on purpose (see app/core/prompt_tokens.py), where transformers 5
rebuilds a pipeline other than the file's: Llama 2 style files whose normalizer is Prepend("▁") +
Replace(" ", "▁"), which its LlamaTokenizer replaces by its own Metaspace pipeline, and models of type
qwen2 whose tokenizer.json is not Qwen 2's pipeline. The tests named "..._not_as_transformers_5_rebuilds_..."
pin what differs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.core.problems import FrankenMoEError
from app.core.prompt_tokens import MAX_PROMPT_TOKENS, load_prompt_tokenizer
from tests.models import write_tokenizer

REPO = Path(__file__).resolve().parents[2]

CORPUS = [
    "What is 12 plus 30? The answer is 42. Compute 7 times 8: 56.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)",
    "The old lighthouse keeper watched the storm roll in over the grey sea.",
    "She opened the letter slowly, afraid of what it might say. Don't worry, I'm sure they'll come.",
    "Le chat dort sur le rebord de la fenêtre. Größe, naïve café, 東京, Ελληνικά 🙂",
    "  indented\n\n\ttabs and\r\nwindows lines",
]

LONG_PROMPT = "The quick brown fox jumps over the lazy dog, again and again. " * 400

PROMPTS = [
    "What is 12 plus 30?",
    " leading and trailing spaces ",
    "two  spaces,\tone tab",
    "line one\nline two\n\n  indented line three",
    "Windows\r\nline ends",
    "café naïve Größe: 東京, Ελληνικά, emoji 🙂👍🏽",
    "def add(a, b):\n    return a + b  # sum\n",
    "Digits 0123456789, 3.14159 and 1,000,000",
    "don't WON'T I'm they'll",
    "",
    "   ",
    "<s> and </s> as plain text, <|im_end|> too",
    LONG_PROMPT,
]

# The pre-tokenizer regexes of the Llama 3 and Qwen 2 tokenizer.json files: they differ only in how digits group.
SPLIT_HEAD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
SPLIT_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA_3_SPLIT = SPLIT_HEAD + r"\p{N}{1,3}" + SPLIT_TAIL
QWEN_2_SPLIT = SPLIT_HEAD + r"\p{N}" + SPLIT_TAIL


def save_folder(folder: Path, tokenizer: Tokenizer, config: dict, model_type: str, special_tokens_map=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def byte_level_bpe(split: str, special_tokens: list[str], normalizer=None) -> Tokenizer:
    """A Llama 3 / Qwen 2 style tokenizer: regex split, then byte-level BPE that ignores merges for whole words."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def tiny_folder(folder: Path) -> Path:
    """The project's own test tokenizer (byte-level BPE, <s> as BOS, saved by transformers)."""
    write_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def llama_3_folder(folder: Path, bos_in_tokenizer_config: bool = True) -> Path:
    """Llama 3 style: <|begin_of_text|> as BOS, added by a TemplateProcessing post-processor."""
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = byte_level_bpe(LLAMA_3_SPLIT, special)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos_id)],
            ),
        ]
    )
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": True,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if not bos_in_tokenizer_config:
        del config["bos_token"]
    special_tokens_map = {
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False},
        "eos_token": {"content": "<|end_of_text|>", "lstrip": False, "normalized": False, "rstrip": False},
    }
    return save_folder(folder, tokenizer, config, "llama", special_tokens_map)


def qwen_2_folder(folder: Path) -> Path:
    """Qwen 2 style: NFC, its own split regex, byte-level BPE and no BOS at all."""
    tokenizer = byte_level_bpe(QWEN_2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], normalizers.NFC())
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    return save_folder(folder, tokenizer, config, "qwen2")


def llama_2_folder(folder: Path, metaspace: bool) -> Path:
    """Llama 2 style, as converted from sentencepiece: ▁ for spaces, byte fallback, <s> added by the post-processor.

    metaspace: a Metaspace pre-tokenizer (newer conversions); else the Hub's Llama 2 / Mistral 7B v0.1
    files' Prepend("▁") + Replace(" ", "▁") normalizer.
    """
    special = ["<unk>", "<s>", "</s>"]
    sentencepiece_like = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_model = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_model.normalizer = sentencepiece_like
    trainer_model.train_from_iterator(
        CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=500, special_tokens=special, show_progress=False)
    )
    trained = json.loads(trainer_model.to_str())["model"]
    vocab = {token: index for index, token in enumerate([*special, *(f"<0x{b:02X}>" for b in range(256))])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in trained["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    if metaspace:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tokenizer.normalizer = sentencepiece_like
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "LlamaTokenizer",
    }
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return save_folder(folder, tokenizer, config, "llama", special_tokens_map)


def bos_not_an_added_token_folder(folder: Path) -> Path:
    """A Llama 3 folder whose tokenizer.json has the BOS in its vocabulary but not among its added tokens."""
    llama_3_folder(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] != "<|begin_of_text|>"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def padding_and_truncation_saved_folder(folder: Path) -> Path:
    """A Llama 3 folder whose tokenizer.json was saved with padding and truncation enabled."""
    llama_3_folder(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<|end_of_text|>"), pad_token="<|end_of_text|>", length=64)
    tokenizer.enable_truncation(max_length=16)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny": tiny_folder,
    "llama-3": llama_3_folder,
    "llama-3, BOS only in special_tokens_map.json": lambda folder: llama_3_folder(folder, False),
    "llama-3, BOS not an added token": bos_not_an_added_token_folder,
    "llama-3, padding and truncation saved": padding_and_truncation_saved_folder,
    "qwen-2": qwen_2_folder,
    "llama-2, Metaspace": lambda folder: llama_2_folder(folder, metaspace=True),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer_folder(request, tmp_path_factory) -> Path:
    return BUILDERS[request.param](tmp_path_factory.mktemp("tokenizer"))


def reference_ids(auto, prompts) -> list[list[int]]:
    """mergekit-moe's tokenization, written out with AutoTokenizer: BOS text + prompt, no special tokens added."""
    return [auto((auto.bos_token or "") + prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]


def test_encode_equals_autotokenizer(tokenizer_folder):
    auto = AutoTokenizer.from_pretrained(tokenizer_folder)
    ours = load_prompt_tokenizer(tokenizer_folder)
    assert ours.bos_token == auto.bos_token
    expected = reference_ids(auto, PROMPTS)
    assert len(expected[-1]) > MAX_PROMPT_TOKENS  # the long prompt really gets truncated
    assert ours.encode(PROMPTS) == [ids[:MAX_PROMPT_TOKENS] for ids in expected]
    if auto.bos_token is not None:
        assert all(ids[0] == auto.bos_token_id for ids in ours.encode(PROMPTS))  # the BOS text is one token


def test_decode_equals_autotokenizer(tokenizer_folder):
    auto = AutoTokenizer.from_pretrained(tokenizer_folder)
    ours = load_prompt_tokenizer(tokenizer_folder)
    assert [ours.decode([i]) for i in range(len(auto))] == [auto.decode([i]) for i in range(len(auto))]
    for ids in ours.encode(PROMPTS[:-1]):
        assert ours.decode(ids) == auto.decode(ids)


def test_llama_2_files_are_read_as_saved_not_as_transformers_5_rebuilds_them(tmp_path):
    """The one kind where our ids differ from AutoTokenizer's, on purpose.

    Transformers 5's LlamaTokenizer rebuilds its pipeline (Metaspace, with no prefix space after a
    special token when legacy is false) instead of the Prepend + Replace normalizer in the Hub's Llama 2
    files. Transformers itself reads the file as saved when asked for PreTrainedTokenizerFast, as
    transformers 4's LlamaTokenizerFast (and so mergekit-moe) did: that is what we match, and it keeps
    the "▁" that sentencepiece puts before the first word of a text.
    """
    folder = llama_2_folder(tmp_path, metaspace=False)
    ours = load_prompt_tokenizer(folder)
    as_saved = PreTrainedTokenizerFast.from_pretrained(folder)
    assert ours.encode(PROMPTS) == [ids[:MAX_PROMPT_TOKENS] for ids in reference_ids(as_saved, PROMPTS)]

    hello = ours.encode(["Hello world"])[0]
    assert as_saved.convert_ids_to_tokens(hello)[:2] == ["<s>", "▁"]  # "H" is no token of this tiny vocabulary
    # With the BOS added as an id (as for generation), AutoTokenizer gives these same ids for a plain prompt.
    assert hello == AutoTokenizer.from_pretrained(folder)("Hello world")["input_ids"]
    if int(transformers.__version__.split(".")[0]) >= 5:
        rebuilt = AutoTokenizer.from_pretrained(folder)
        assert type(rebuilt).__name__ == "LlamaTokenizer"
        assert reference_ids(rebuilt, ["Hello world"])[0] == [hello[0], *hello[2:]]  # the "▁" after <s> is gone


def test_a_qwen2_model_is_read_as_saved_not_as_transformers_5_rebuilds_it(tmp_path):
    """The other kind where our ids differ from AutoTokenizer's, on purpose.

    A model of type qwen2 whose tokenizer.json is not Qwen 2's pipeline (like the project's tiny donors):
    transformers 5 ignores its tokenizer_class and rebuilds Qwen 2's pre-tokenizer from the vocabulary,
    so digits become one token each.
    """
    folder = tiny_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    ours = load_prompt_tokenizer(folder)
    as_saved = PreTrainedTokenizerFast.from_pretrained(folder)
    assert ours.encode(PROMPTS) == [ids[:MAX_PROMPT_TOKENS] for ids in reference_ids(as_saved, PROMPTS)]
    assert as_saved.convert_ids_to_tokens(ours.encode(["42"])[0]) == ["<s>", "42"]
    if int(transformers.__version__.split(".")[0]) >= 5:
        rebuilt = AutoTokenizer.from_pretrained(folder)
        assert type(rebuilt).__name__ == "Qwen2Tokenizer"
        assert rebuilt.convert_ids_to_tokens(reference_ids(rebuilt, ["42"])[0]) == ["<s>", "4", "2"]


def test_without_tokenizer_json_autotokenizer_reads_the_other_files(tmp_path):
    """A GPT-2 style folder (vocab.json + merges.txt) goes through AutoTokenizer, with the same ids as the fast path."""
    fast_folder = tiny_folder(tmp_path / "fast")
    slow_folder = tmp_path / "slow"
    slow_folder.mkdir()
    Tokenizer.from_file(str(fast_folder / "tokenizer.json")).model.save(str(slow_folder))
    assert sorted(p.name for p in slow_folder.iterdir()) == ["merges.txt", "vocab.json"]
    (slow_folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
                "pad_token": "<pad>",
            }
        )
    )
    (slow_folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    ours = load_prompt_tokenizer(slow_folder)
    auto = AutoTokenizer.from_pretrained(slow_folder)
    assert ours.bos_token == "<s>"
    expected = [ids[:MAX_PROMPT_TOKENS] for ids in reference_ids(auto, PROMPTS)]
    assert ours.encode(PROMPTS) == expected
    assert ours.encode(PROMPTS) == load_prompt_tokenizer(fast_folder).encode(PROMPTS)
    assert [ours.decode([i]) for i in range(len(auto))] == [auto.decode([i]) for i in range(len(auto))]


def test_the_fast_path_does_not_import_transformers(tmp_path):
    folder = llama_3_folder(tmp_path)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.core.prompt_tokens import load_prompt_tokenizer\n"
        f"tokenizer = load_prompt_tokenizer(Path({str(folder)!r}))\n"
        "ids = tokenizer.encode(['Hello world', 'def f(x): return x'])\n"
        "assert len(ids) == 2 and all(len(i) > 2 for i in ids), ids\n"
        "tokenizer.decode(ids[0])\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'transformers'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_folder_without_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FrankenMoEError) as caught:
        load_prompt_tokenizer(tmp_path)
    assert str(tmp_path) in caught.value.message
    assert "tokenizer files" in caught.value.hint


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_tokenizer_json_is_a_clear_error(tmp_path, damage):
    folder = llama_3_folder(tmp_path)
    path = folder / "tokenizer.json"
    path.write_text(path.read_text()[:5000] if damage == "truncate" else "not json at all")
    with pytest.raises(FrankenMoEError) as caught:
        load_prompt_tokenizer(folder)
    assert str(path) in caught.value.message
    assert "download it again" in caught.value.hint


def test_a_corrupt_tokenizer_config_is_a_clear_error(tmp_path):
    folder = llama_3_folder(tmp_path)
    (folder / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(FrankenMoEError) as caught:
        load_prompt_tokenizer(folder)
    assert str(folder / "tokenizer_config.json") in caught.value.message
