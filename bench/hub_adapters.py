"""What a Hub LoRA adapter costs to find, inspect and download, against the local test Hub on loopback.

The adapter repo is shaped like a published one: a rank-8 adapter of a Llama-7B-sized model on all
seven linear modules (bfloat16, about 40 MB), plus what such repos often carry besides: the same
weights as a pickle ``adapter_model.bin``, the optimizer state, ``training_args.bin`` and two
``checkpoint-*`` folders. Tensor data is zeros (only sizes matter here). It prints the seconds of an
adapter search, of the adapter's details (adapter_config.json plus its base's config and sizes),
and of its download, with the bytes the download fetched against the repo's total. The local Hub
hashes a repo's files (sha256) for every file listing and file request, as the real Hub does not
need to: most of these seconds are that server's own (about 1.4 s per listing of this repo).

Run from the repository root:
    python bench/hub_adapters.py
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HIDDEN, INTERMEDIATE, LAYERS, KV = 4096, 11008, 32, 1024
RANK = 8
MODULES = {  # module: (in features, out features)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, KV),
    "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def safetensors_of(shapes: dict[str, tuple[int, ...]], dtype: str = "BF16", item: int = 2) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = item
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(offset)


def adapter_repo() -> dict[str, bytes]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        for module, (fan_in, fan_out) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{prefix}.lora_A.weight"] = (RANK, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, RANK)
    weights = safetensors_of(shapes)
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": "acme/llama-7b",
        "r": RANK,
        "lora_alpha": 16,
        "target_modules": [m.split(".")[-1] for m in MODULES],
        "task_type": "CAUSAL_LM",
    }
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": weights,
        "adapter_model.bin": weights,
        "optimizer.pt": weights + weights,
        "training_args.bin": b"\x80\x04" + bytes(6000),
        "README.md": b"---\nlibrary_name: peft\nbase_model: acme/llama-7b\n---\n# A maths adapter\n",
        "checkpoint-500/adapter_model.safetensors": weights,
        "checkpoint-1000/adapter_model.safetensors": weights,
    }


def base_repo() -> dict[str, bytes]:
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    }
    # A stand-in for the weights: only the base's listing and config are read.
    return {"config.json": json.dumps(config).encode(), "model.safetensors": safetensors_of({"w": (1024, 1024)})}


def main() -> None:
    from huggingface_hub import constants

    from app.core.hub import HubConfig, download_model, forget_reachability, inspect_model, search_models
    from app.core.progress import run_job
    from tests.hubserver import HubServer

    server = HubServer()
    files = adapter_repo()
    server.add_model("acme/llama-7b", base_repo())
    server.add_model(
        "acme/llama-7b-maths-lora",
        files,
        library_name="peft",
        extra_tags=("lora", "base_model:adapter:acme/llama-7b"),
    )
    server.start()
    try:
        with tempfile.TemporaryDirectory() as home:
            constants.HF_HUB_OFFLINE = False
            forget_reachability()
            config = HubConfig(endpoint=server.url, cache_dir=Path(home) / "hub")
            start = time.perf_counter()
            found = search_models("maths", adapters=True, config=config).models
            search_s = time.perf_counter() - start
            start = time.perf_counter()
            report = inspect_model("acme/llama-7b-maths-lora", config=config)
            inspect_s = time.perf_counter() - start
            start = time.perf_counter()
            folder = run_job(download_model("acme/llama-7b-maths-lora", config=config))
            download_s = time.perf_counter() - start
            fetched = [p.name for p in folder.iterdir()]
            fetched_bytes = sum(len(files[name]) for name in fetched)
            total = sum(len(content) for content in files.values())
            card = report.adapter
            assert card is not None and [m.repo_id for m in found] == ["acme/llama-7b-maths-lora"]
            print(f"adapter search:   {search_s:.3f} s, base {found[0].base_model}")
            print(f"adapter details:  {inspect_s:.3f} s ({card.rank_text()}, {card.fetch_text()})")
            print(f"adapter download: {download_s:.3f} s, {fetched_bytes / 1e6:.1f} MB of the repo's "
                  f"{total / 1e6:.1f} MB ({', '.join(sorted(fetched))})")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
