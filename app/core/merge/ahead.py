"""The merge's computed tensors, produced on worker threads ahead of the writer.

A full fine-tune's weights are copied file to file by the kernel, while the writer's thread goes
on; a LoRA expert's are computed (B @ A, scaled, added to W and cast), which in the writer's thread
would take turns with the writing. Here up to ``workers`` threads compute the next weights while
the writer writes the ones before and copies the tensors between, and the writer takes the results
in plan order.

Each worker computes one weight at a time and starts its next only once the writer has written
its last: a producer may hand back a buffer it reuses for its next weight (lora/merged.py), and it
bounds the memory to one weight in flight per worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class ComputedAhead(Generic[T]):
    """Runs producers (by plan position) on worker threads; :meth:`taken` hands their results over in order.

    The workers stop at their next weight once :meth:`close` is called, which joins them; a
    producer's error is raised in the writer's thread when its result is taken.
    """

    def __init__(
        self, producers: Mapping[int, Callable[[], T]], workers: int, name: str = "frankenmoe-compute"
    ) -> None:
        positions = sorted(producers)
        workers = min(max(1, workers), len(positions))
        self._producers = producers
        self._results: dict[int, T] = {}
        self._errors: dict[int, BaseException] = {}
        self._ready = {position: threading.Event() for position in positions}
        self._worker_of = {position: index % workers for index, position in enumerate(positions)}
        # Released when the writer has written a worker's last result: the worker may then compute its next.
        self._written = [threading.Semaphore(1) for _ in range(workers)]
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._work, args=(positions[worker::workers], worker), name=f"{name}-{worker}", daemon=True
            )
            for worker in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self, positions: list[int], worker: int) -> None:
        from app.core.devices import one_torch_thread

        for position in positions:
            self._written[worker].acquire()
            if self._closing.is_set():
                return
            try:
                # Each worker on one of torch's threads: the workers are the parallelism, and a few
                # milliseconds' work split over a pool whose threads wait on each other costs far more.
                with one_torch_thread():
                    self._results[position] = self._producers[position]()
            except BaseException as exc:  # raised in the writer's thread by taken()
                self._errors[position] = exc
                self._ready[position].set()
                return
            self._ready[position].set()

    def __contains__(self, position: int) -> bool:
        return position in self._ready

    @contextmanager
    def taken(self, position: int) -> Iterator[T]:
        """The result for this plan position, valid until the block ends (its worker then computes its next)."""
        self._ready[position].wait()
        if position in self._errors:
            raise self._errors.pop(position)
        try:
            yield self._results.pop(position)
        finally:
            self._written[self._worker_of[position]].release()

    def close(self) -> None:
        self._closing.set()
        for written in self._written:
            written.release()
        for thread in self._threads:
            thread.join()


# What a worker holds while it merges a LoRA weight, per value of the weight: B @ A in float32, and
# W as stored (at most 4 bytes) with the result cast over it (lora/merged.py).
WORKER_BYTES_PER_VALUE = 8


def compute_workers(largest_values: int, available_bytes: int, cores: int) -> int:
    """Two workers where there are two cores or more: while one computes, the other's weight is written.

    One where two workers' buffers for the largest computed weight would take more than a quarter
    of the memory available (a big model on a small machine). Not more than two: each worker holds a
    weight's buffers (350-470 MB for a 7B model's MLP weight), and only two were measured (on two
    cores, a 24-layer LoRA merge in hidden mode took 1.16x the full merge with two, 1.35x with one).
    """
    if cores < 2 or 2 * WORKER_BYTES_PER_VALUE * largest_values > available_bytes // 4:
        return 1
    return 2
