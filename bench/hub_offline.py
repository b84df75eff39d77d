"""How long Hub work takes to say "cannot reach the Hub" when nothing answers; the requirement is 2 s.

Two kinds of "nothing answers", both on loopback (nothing else is ever contacted):
- refused: a port where nothing listens (as when name resolution or routing fails at once);
- silent: a port whose connection queue is full, so the kernel ignores each attempt, as a network
  that drops packets does.
For each, with the default settings (a 1.5 s probe), it times a search, a model's details, a download
and a recipe fetch from a cold start (no probe remembered), and reading a cached model's config.json
while offline, then prints the seconds and the error's first words.

Run from the repository root:
    python bench/hub_offline.py
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LIMIT_S = 2.0


def refused_endpoint() -> tuple[str, Callable[[], None]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}", lambda: None


def silent_endpoint() -> tuple[str, Callable[[], None]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())

    def close() -> None:
        filler.close()
        listener.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}", close


def cache_with_a_model(cache: Path) -> None:
    """A Hugging Face cache holding acme/cached's config.json, laid out as huggingface_hub lays it out."""
    commit = "0" * 40
    repo = cache / "models--acme--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "llama"}')


def main() -> int:
    from app.core.hub import (
        HubConfig,
        HubError,
        download_model,
        ensure_recipe_models,
        fetch_config,
        forget_reachability,
        inspect_model,
        search_models,
    )
    from app.core.progress import run_job
    from app.core.recipe import ModelRef, parse_recipe

    recipe = parse_recipe("base_model: acme/base\ngate_mode: random\nexperts:\n  - source_model: acme/expert\n")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        cache_with_a_model(cache)
        for kind, make in (("refused", refused_endpoint), ("silent", silent_endpoint)):
            endpoint, close = make()
            config = HubConfig(endpoint=endpoint, cache_dir=cache)  # default probe, retries and timeouts
            calls: dict[str, Callable[[], object]] = {
                "search": lambda config=config: search_models("llama", config=config),
                "details": lambda config=config: inspect_model("acme/model", config=config),
                "download": lambda config=config: run_job(download_model("acme/model", config=config)),
                "recipe fetch": lambda config=config: run_job(ensure_recipe_models(recipe, config=config)),
                "cached config": lambda config=config: fetch_config(ModelRef.parse("acme/cached"), config),
            }
            for name, call in calls.items():
                forget_reachability()  # each from a cold start: the probe is not remembered
                start = time.perf_counter()
                try:
                    answer = f"ok: {call()}"
                except HubError as error:
                    answer = error.message
                seconds = time.perf_counter() - start
                worst = max(worst, seconds)
                print(f"{kind:8} {name:14} {seconds:6.2f} s  {answer[:90]}")
            close()
    print(f"slowest: {worst:.2f} s (requirement: under {LIMIT_S:g} s)")
    return 0 if worst < LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
