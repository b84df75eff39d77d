"""The demo's training: single-threaded while it runs (tiny models train faster so), the caller's threads after."""

from __future__ import annotations

import torch

from app.core.demo import DEMO_DOMAINS, train_domain_models
from app.core.progress import run_job


def test_training_runs_on_one_thread_and_gives_the_threads_back(tmp_path):
    before = torch.get_num_threads()
    seen: set[int] = set()
    recipe = run_job(
        train_domain_models(tmp_path, DEMO_DOMAINS, base_steps=2, expert_steps=1),
        lambda _record: seen.add(torch.get_num_threads()),
    )
    assert seen == {1}
    assert torch.get_num_threads() == before
    assert len(recipe.experts) == len(DEMO_DOMAINS)
