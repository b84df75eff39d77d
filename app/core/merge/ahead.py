"""The merge's computed tensors, produced on worker threads ahead of the writer.

A full fine-tune's weights are copied file to file by the kernel, while the writer's thread goes
on; a LoRA expert's are computed (B @ A, scaled, added to W and cast), which in the writer's thread
would take turns with the writing. Here up to ``workers`` threads compute the next weights while
the writer writes the ones before and copies the tensors between, and the writer takes the results
in plan order.

A producer returns a whole tensor, or an iterator of blocks of rows (a LoRA weight, computed a
block at a time while the block is in the cache). Either may be in buffers its worker reuses, so
each worker has at most ``buffers`` blocks that the writer has not yet written, and a whole tensor
counts as all of them: memory stays a few blocks per worker whatever the model's size, and a
worker goes on computing while the writer catches up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()  # a position's last block has been handed over


class ComputedAhead(Generic[T]):
    """Runs producers (by plan position) on worker threads; :meth:`blocks` hands their results over in order.

    The workers stop at their next block once :meth:`close` is called, which joins them; a
    producer's error is raised in the writer's thread when its position's blocks are taken.
    """

    def __init__(
        self,
        producers: Mapping[int, Callable[[], T | Iterator[T]]],
        workers: int,
        buffers: int = 1,
        name: str = "frankenmoe-compute",
    ) -> None:
        positions = sorted(producers)
        workers = min(max(1, workers), len(positions))
        self._producers = producers
        self._buffers = max(1, buffers)
        self._handed: dict[int, queue.SimpleQueue[object]] = {position: queue.SimpleQueue() for position in positions}
        self._worker_of = {position: index % workers for index, position in enumerate(positions)}
        # A permit per block a worker may have computed and not yet seen written.
        self._unwritten = [threading.Semaphore(self._buffers) for _ in range(workers)]
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._work, args=(positions[worker::workers], worker), name=f"{name}-{worker}", daemon=True
            )
            for worker in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _claim(self, worker: int, permits: int) -> bool:
        """Wait for room for this many more unwritten blocks; False once the merge is closing."""
        for _ in range(permits):
            self._unwritten[worker].acquire()
            if self._closing.is_set():
                return False
        return True

    def _work(self, positions: list[int], worker: int) -> None:
        from app.core.devices import one_torch_thread

        for position in positions:
            handed = self._handed[position]
            try:
                if not self._claim(worker, 1):
                    return
                # Each worker on one of torch's threads: the workers are the parallelism, and a few
                # milliseconds' work split over a pool whose threads wait on each other costs far more.
                with one_torch_thread():
                    produced = self._producers[position]()
                if not isinstance(produced, Iterator):
                    # A whole tensor may be in the worker's reused buffers: nothing more until it is written.
                    if not self._claim(worker, self._buffers - 1):
                        return
                    handed.put((produced, self._buffers))
                else:
                    claimed = True  # the permit claimed above, for the first block
                    while True:
                        if not claimed and not self._claim(worker, 1):
                            return
                        with one_torch_thread():
                            block = next(produced, _END)
                        if block is _END:
                            self._unwritten[worker].release()  # claimed for a block that did not come
                            break
                        handed.put((block, 1))
                        claimed = False
                handed.put(_END)
            except BaseException as exc:  # raised in the writer's thread by blocks()
                handed.put(_Failed(exc))
                return

    def __contains__(self, position: int) -> bool:
        return position in self._handed

    def blocks(self, position: int) -> Iterator[T]:
        """The result for this plan position, block by block (a whole tensor as one block).

        Each block is valid until the next is asked for: its buffer is then the worker's again.
        """
        handed, worker = self._handed[position], self._worker_of[position]
        while True:
            item = handed.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            block, permits = item  # type: ignore[misc]
            try:
                yield block
            finally:
                self._unwritten[worker].release(permits)

    def close(self) -> None:
        self._closing.set()
        for unwritten in self._unwritten:
            unwritten.release(self._buffers)
        for thread in self._threads:
            thread.join()


# What a worker holds while it merges a LoRA weight, per value of the weight, where the output is
# float32 (lora/merged.py): B @ A whole, which PEFT's bits need, and W as stored (at most 4 bytes).
# Into a narrower dtype it holds a few blocks of rows only.
WORKER_BYTES_PER_VALUE = 8


def compute_workers(largest_values: int, available_bytes: int, cores: int) -> int:
    """Two workers where there are two cores or more: while one computes, the other's weight is written.

    One where two workers' buffers for the largest whole computed weight would take more than a
    quarter of the memory available (a big float32 model on a small machine). Not more than two:
    only two were measured (on two cores, a 24-layer LoRA merge in hidden mode took 1.16x the full
    merge with two, 1.35x with one).
    """
    if cores < 2 or 2 * WORKER_BYTES_PER_VALUE * largest_values > available_bytes // 4:
        return 1
    return 2
