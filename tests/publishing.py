"""Shared by the publish tests: the tokens the local Hub knows (its ``publish_config`` fixture, in
tests/hubserver.py, adds them) and a real tiny merge of Hub and local donors."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from app.core.hub import HubConfig, ensure_recipe_models
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe

WRITE_TOKEN = "hf_alice_write_0123456789abcdef"
READ_TOKEN = "hf_bob_read_0123456789abcdef"


def local_donor(source: Path, folder: Path, license_id: str | None) -> Path:
    shutil.copytree(source, folder)
    if license_id:
        (folder / "README.md").write_text(f"---\nlicense: {license_id}\n---\n# A local donor\n")
    return folder


def hub_merge(config: HubConfig, llama_donors: dict[str, Path], tmp_path: Path) -> Path:
    """A sharded merge of three Hub models (one gated, one under llama3) and a local folder."""
    local = local_donor(llama_donors["expert2"], tmp_path / "donors" / "my-local-expert", "apache-2.0")
    recipe = parse_recipe(
        "\n".join(
            [
                "base_model: acme/tiny-llama-instruct",
                "gate_mode: random",
                "dtype: float32",
                "experts_per_token: 2",
                "experts:",
                "  - source_model: acme/tiny-llama-chat",
                "  - source_model: acme/gated-llama",
                f"  - source_model: {local}",
            ]
        )
    )
    run_job(ensure_recipe_models(recipe, config=replace(config, token=WRITE_TOKEN)))
    out = tmp_path / "out" / "tiny-moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out, shard_size=40_000, device="cpu", cache_dir=config.cache_dir)))
    return out
