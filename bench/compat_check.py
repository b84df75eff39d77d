"""How long the compatibility check takes for full-size models: the Models page runs it off the GUI
thread after every change of donors, and the Merge page waits for its answer before enabling Merge.

Writes a Mistral-7B-shaped base and experts (config.json, a 32k or larger tokenizer.json, and three
safetensors shards whose headers are real and whose data are sparse, so nothing large is written),
then times ``check_recipe`` on a recipe with them: it reads configs, tokenizers and headers only.
The first run reads every tokenizer (cold); later ones, as after each edit in the app, reuse their
fingerprints while the files stay the same (warm).

Run from the repository root:
    python bench/compat_check.py [--experts 4] [--vocab 32000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "hidden_act": "silu",
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], 1024
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (config["vocab_size"], hidden)}
    return shapes


def write_sparse_model(folder: Path, vocab: int, shards: int = 3) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    tokens = {f"tok{i}": i for i in range(vocab)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": tokens}, "added_tokens": []}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    names = list(tensor_shapes(CONFIG).items())
    weight_map = {}
    for shard in range(shards):
        part = names[shard::shards]
        header, offset = {}, 0
        for name, shape in part:
            size = 2
            for dim in shape:
                size *= dim
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        file = folder / f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        encoded = json.dumps(header).encode()
        with file.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            handle.truncate(8 + len(encoded) + offset)  # sparse: no data written
        weight_map |= {name: file.name for name, _shape in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from app.core.compat import check_recipe
    from app.core.recipe import parse_recipe

    with tempfile.TemporaryDirectory() as root:
        folders = [Path(root) / name for name in ["base", *(f"expert{i}" for i in range(args.experts))]]
        for folder in folders:
            write_sparse_model(folder, args.vocab)
        experts = "".join(
            f"  - source_model: {folder}\n    positive_prompts: [p{i}]\n" for i, folder in enumerate(folders[1:])
        )
        recipe = parse_recipe(f"base_model: {folders[0]}\nexperts:\n{experts}")
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            problems = check_recipe(recipe)
            seconds.append(time.perf_counter() - start)
        assert not [p for p in problems if p.is_error], problems
    cold, warm = seconds[0], seconds[1:] or seconds
    print(
        f"check_recipe, base + {args.experts} Mistral-7B-shaped experts, vocab {args.vocab}: "
        f"cold {cold * 1000:.0f} ms, warm median {statistics.median(warm) * 1000:.0f} ms over {len(warm)} runs"
    )


if __name__ == "__main__":
    main()
