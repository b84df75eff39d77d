"""How fast `publish` uploads and how much memory it holds, against the test Hub on loopback.

A synthetic merge folder (shards written by the merge's own ShardWriter, with its index and sample
hashes) is published to tests/hubserver.py's Hub, which runs in a process of its own so that its
copy of the uploaded bytes does not count. Printed: the checks' time (plan_publish: the shard sizes
and sample hashes, whoami, the scans), the upload's time and throughput, the client's peak RSS
above what it held before the upload, and the time of a second publish of the same folder (every
file already on the Hub: nothing is sent again).

Run from the repository root:
    python bench/publish.py [--shards 3] [--shard-mb 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "hf_bench_write_token"


def serve(urls: multiprocessing.Queue, stop: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    from tests.hubserver import HubServer

    server = HubServer().start()
    server.add_token(TOKEN, "bench", "write")
    urls.put(server.url)
    stop.wait()
    server.stop()


def make_model(folder: Path, shards: int, shard_mb: int) -> None:
    """Run in a process of its own, so that its tensors do not count in the publishing process's peak."""
    import torch

    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.merge.shards import PlannedTensor, ShardWriter, plan_shards

    folder.mkdir(parents=True)
    elements = shard_mb * 2**20 // 4
    planned = [PlannedTensor(f"model.layers.{i}.weight", (elements,), "float32") for i in range(shards)]
    generator = torch.Generator().manual_seed(0)
    with ShardWriter(folder, plan_shards(planned, shard_mb * 2**20)) as writer:
        for tensor in planned:
            writer.write(tensor.name, torch.rand(elements, generator=generator))
    (folder / "config.json").write_text('{"model_type": "mixtral"}\n')
    (folder / RECIPE_FILENAME).write_text(
        "base_model: donor-a\ngate_mode: random\nexperts:\n  - source_model: donor-a\n  - source_model: donor-b\n"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=200)
    args = parser.parse_args()
    urls: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(urls, stop), daemon=True)
    server.start()
    url = urls.get(timeout=30)
    with tempfile.TemporaryDirectory(prefix="frankenmoe-bench-publish-") as work:
        os.environ.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(Path(work) / "hf"))
        os.environ.pop("HF_HUB_OFFLINE", None)
        maker = multiprocessing.Process(target=make_model, args=(Path(work) / "bench-moe", args.shards, args.shard_mb))
        maker.start()
        maker.join()
        from app.core.progress import run_job
        from app.core.publish import PublishRequest, plan_publish, publish

        request = PublishRequest(Path(work) / "bench-moe", "bench/bench-moe", token=TOKEN, license="apache-2.0")
        started = time.perf_counter()
        plan = plan_publish(request)
        checked = time.perf_counter() - started
        assert not plan.errors, plan.problems
        before = peak_rss_mb()
        started = time.perf_counter()
        run_job(publish(plan))
        upload = time.perf_counter() - started
        after = peak_rss_mb()
        started = time.perf_counter()
        run_job(publish(plan_publish(request)))
        again = time.perf_counter() - started
    stop.set()
    server.join(10)
    print(f"model: {args.shards} shards of {args.shard_mb} MiB ({plan.total_bytes / 1e6:.0f} MB to upload)")
    print(f"checks (plan_publish): {checked:.2f} s")
    print(f"upload: {upload:.2f} s, {plan.total_bytes / 1e6 / upload:.0f} MB/s on loopback")
    print(f"client peak RSS: {before:.0f} MB after the checks, {after:.0f} MB after the upload")
    print(f"second publish of the same folder (nothing sent again): {again:.2f} s")


if __name__ == "__main__":
    main()
