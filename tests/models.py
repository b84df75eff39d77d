"""Tiny deterministic donor models for tests and benchmarks, generated offline.

Each model is a real transformers model saved with save_pretrained (safetensors), with a real fast
tokenizer trained here with the `tokenizers` library, so nothing is downloaded.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

CORPUS = [
    "What is 12 plus 30? The answer is 42.",
    "Compute 7 times 8 and subtract 6: 50.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "The old lighthouse keeper watched the storm roll in over the grey sea.",
    "She opened the letter slowly, afraid of what it might say.",
    "Translate into French: the cat sleeps on the warm windowsill.",
    "Le chat dort sur le rebord de la fenetre.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int, extra_text: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*CORPUS, extra_text] * 4, trainer=trainer)
    return tokenizer.to_str()


def write_tokenizer(
    folder: Path,
    vocab_size: int = 320,
    extra_text: str = "",
    chat_template: str = CHAT_TEMPLATE,
    eos_token: str = "</s>",
) -> int:
    """Write tokenizer files into folder and return the vocabulary size."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, extra_text))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token=eos_token, unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return raw.get_vocab_size(with_added_tokens=True)


def make_tiny_model(
    folder: Path,
    family: str = "llama",
    seed: int = 0,
    *,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    dtype: str = "float32",
    tokenizer_vocab: int = 320,
    config_overrides: dict[str, Any] | None = None,
    max_shard_size: str | None = None,
) -> Path:
    """A tiny random model of the given family, deterministic for a seed, saved as safetensors.

    Families: llama, mistral, qwen2 (with q/k/v biases) and qwen3 (with q/k norms; head dim as
    hidden size / heads unless config_overrides sets it, since Qwen3's own default is 128).
    """
    import torch
    import transformers

    folder = Path(folder)
    vocab_size = write_tokenizer(folder, tokenizer_vocab)
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        settings["head_dim"] = hidden_size // num_attention_heads
    settings.update(config_overrides or {})
    config = config_class(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family.capitalize()}ForCausalLM")(config)
    with torch.no_grad():
        # Default init leaves norms at exactly 1 and biases at 0; perturb them so that copying the wrong one shows.
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())
