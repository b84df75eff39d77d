"""The merge's computed tensors, produced on worker threads ahead of the writer.

A full fine-tune's weights are copied file to file by the kernel, while the writer's thread goes
on; a LoRA expert's are computed (B @ A, scaled, added to W and cast), which in the writer's thread
would take turns with the writing. Here worker threads compute what comes next while the writer
writes what came before and copies the tensors between, and the writer takes the results in plan
order. Where it would wait for them, the writer computes too: on two cores one worker and the
writer keep both busy, where two workers would take turns with the writer on its core.

A producer returns a whole tensor, or (a LoRA weight) a :class:`BlockedTensor`: blocks of rows the
workers compute side by side, so that every worker is busy even on one big weight. A result may be
in buffers its worker reuses, so each worker has at most ``buffers`` blocks that the writer has not
yet written, and a whole tensor counts as all of them: memory stays a few blocks per worker
whatever the model's size.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class BlockedTensor(Protocol[T_co]):
    """A tensor in ``count`` blocks of rows, any of which a thread may compute while others compute the rest."""

    count: int

    def compute(self, index: int) -> T_co: ...


class _Task:
    """One block (or whole tensor) taken by a worker or the writer, and what came of it."""

    __slots__ = ("ahead", "done", "error", "permits", "value", "worker")

    def __init__(self, worker: int, permits: int) -> None:
        self.worker, self.permits = worker, permits
        self.ahead = False  # computed by the writer's thread before its turn
        self.value: object = None
        self.error: BaseException | None = None
        self.done = False


# The worker number of a block the writer computes itself: it holds no worker's permits.
_HERE = -1


class ComputedAhead(Generic[T]):
    """Runs producers (by plan position) on worker threads; :meth:`blocks` hands their results over in order.

    Positions in ``blocked`` produce a :class:`BlockedTensor` at once (their producer only prepares,
    under a lock); the others compute their whole tensor. The workers stop at their next block once
    :meth:`close` is called, which joins them; an error is raised in the writer's thread when its
    block's turn comes.
    """

    def __init__(
        self,
        producers: Mapping[int, Callable[[], T | BlockedTensor[T]]],
        workers: int,
        buffers: int = 1,
        blocked: Collection[int] = (),
        name: str = "frankenmoe-compute",
    ) -> None:
        self._producers = producers
        self._blocked = frozenset(blocked)
        self._buffers = max(1, buffers)
        self._pending = deque(sorted(producers))
        self._current: tuple[int, BlockedTensor[T], int] | None = None  # position, its blocks, the next block
        self._counts: dict[int, int] = {}  # blocks of each position taken so far
        self._tasks: dict[tuple[int, int], _Task] = {}
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._ahead_here = 0  # blocks the writer's thread computed before their turn, not yet handed over
        count = min(max(1, workers), len(producers))
        # A permit per block a worker may have computed and not yet seen written.
        self._unwritten = [threading.Semaphore(self._buffers) for _ in range(count)]
        self._threads = [
            threading.Thread(target=self._work, args=(worker,), name=f"{name}-{worker}", daemon=True)
            for worker in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def __contains__(self, position: int) -> bool:
        return position in self._producers

    def _claim(self, worker: int, permits: int) -> bool:
        """Wait for room for this many more unwritten blocks; False once the merge is closing."""
        for _ in range(permits):
            self._unwritten[worker].acquire()
            if self._closing.is_set():
                return False
        return True

    def _take(self, worker: int) -> tuple[int, int, BlockedTensor[T] | None, _Task] | None:
        """The next block in plan order (blocks None: a whole tensor), or None when all are taken."""
        with self._changed:
            if self._current is None:
                if not self._pending:
                    return None
                position = self._pending.popleft()
                if position not in self._blocked:
                    task = self._tasks[position, 0] = _Task(worker, self._buffers)
                    self._counts[position] = 1
                    self._changed.notify_all()
                    return position, 0, None, task
                try:
                    self._current = (position, self._producers[position](), 0)
                except BaseException as exc:  # raised in the writer's thread by blocks()
                    task = self._tasks[position, 0] = _Task(worker, 1)
                    task.error, task.done = exc, True
                    self._counts[position] = 1
                    self._changed.notify_all()
                    return None
            position, blocked, index = self._current
            self._current = (position, blocked, index + 1) if index + 1 < blocked.count else None
            task = self._tasks[position, index] = _Task(worker, 1)
            self._counts[position] = index + 1
            self._changed.notify_all()
            return position, index, blocked, task

    def _work(self, worker: int) -> None:
        from app.core.devices import one_torch_thread

        # Each worker on one of torch's threads, for as long as it works: the workers are the
        # parallelism, and a few milliseconds' work split over a pool whose threads wait on each
        # other costs far more (measured: 1.7x the CPU time when the count changed at every block).
        with one_torch_thread():
            self._work_on(worker)

    def _work_on(self, worker: int) -> None:
        while self._claim(worker, 1):
            taken = self._take(worker)
            if taken is None:
                return
            position, index, blocked, task = taken
            try:
                if blocked is not None:
                    task.value = blocked.compute(index)
                elif self._claim(worker, self._buffers - 1):  # a whole tensor: nothing more until it is written
                    task.value = self._producers[position]()
                else:
                    return
            except BaseException as exc:  # raised in the writer's thread by blocks()
                task.error = exc
            with self._changed:
                task.done = True
                self._changed.notify_all()
            if task.error is not None:
                return

    def blocks(self, position: int) -> Iterator[T]:
        """The result for this plan position, block by block (a whole tensor as one block).

        Each block is valid until the next is asked for: its buffer is then its worker's again. The
        caller's thread computes too rather than wait: a block no worker has taken when its turn
        comes, and, while a worker computes the block it waits for, blocks of rows further on. Those
        are computed only while the caller is in here, when every block it was handed is written, so
        its thread may hold as many as a worker's.
        """
        index = 0
        while True:
            with self._changed:
                while True:
                    task = self._tasks.get((position, index))
                    if task is not None and task.done:
                        del self._tasks[position, index]
                        break
                    taking = self._current is not None and self._current[0] == position
                    if task is None and not taking and index >= self._counts.get(position, index + 1):
                        return  # every block of it taken, and handed over
                    if task is None and self._is_next(position, index):
                        here = self._take(_HERE)  # None: its producer failed, and left its error as the task
                        if here is not None:
                            task = here[3]
                            self._compute_here(here)
                            del self._tasks[position, index]
                            break
                        continue
                    if task is not None and self._ahead_here < self._buffers and self._next_is_blocked():
                        here = self._take(_HERE)
                        if here is not None:
                            self._ahead_here += 1
                            here[3].ahead = True
                            self._compute_here(here)
                        continue
                    self._changed.wait()
            if task.error is not None:
                raise task.error
            try:
                yield task.value  # type: ignore[misc]
            finally:
                if task.worker != _HERE:
                    self._unwritten[task.worker].release(task.permits)
                elif task.ahead:
                    self._ahead_here -= 1
            index += 1

    def _is_next(self, position: int, index: int) -> bool:
        """Whether block ``index`` of ``position`` is the next one to be taken (called under the lock)."""
        if self._current is not None:
            return self._current[0] == position and self._current[2] == index
        return index == 0 and bool(self._pending) and self._pending[0] == position

    def _next_is_blocked(self) -> bool:
        """Whether the next block to be taken is a block of rows, not a whole tensor (called under the lock)."""
        return self._current is not None or (bool(self._pending) and self._pending[0] in self._blocked)

    def _compute_here(self, taken: tuple[int, int, BlockedTensor[T] | None, _Task]) -> None:
        """Compute a block taken by the caller's thread, with the lock released meanwhile."""
        from app.core.devices import one_torch_thread

        position, index, blocked, task = taken
        self._changed.release()
        try:
            with one_torch_thread():
                task.value = blocked.compute(index) if blocked is not None else self._producers[position]()
        except BaseException as exc:  # raised by blocks(), as a worker's would be
            task.error = exc
        finally:
            self._changed.acquire()
        task.done = True

    def close(self) -> None:
        self._closing.set()
        for unwritten in self._unwritten:
            unwritten.release(self._buffers)
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join()


# What a thread holds while it computes a whole weight, per value of the weight: for a LoRA weight
# merged into float32 output (lora/merged.py), B @ A whole, which PEFT's bits need, and W's rows as
# stored. Merged into a narrower dtype, a LoRA weight takes a few blocks of rows per thread only.
WORKER_BYTES_PER_VALUE = 8
# More workers than two are not measured (the machine at hand has two cores); each holds its blocks only.
MOST_WORKERS = 4


def compute_workers(largest_values: int, available_bytes: int, cores: int) -> int:
    """A worker for every core but the writer's, at most MOST_WORKERS, at least one.

    The writer's thread computes too (see ComputedAhead.blocks), so fewer where the workers' and the
    writer's buffers for the largest whole computed weight would take more than a quarter of the
    memory available (a big float32 model on a small machine). On two cores, one worker and the
    writer beat two workers, whose threads the writer then shares its core with: a 24-layer LoRA
    merge took 1.21 s against 1.37 s in cheap_embed mode, 2.25 s against 2.42 s in hidden mode
    (medians of 6 and 4, merge alone).
    """
    holders = available_bytes // 4 // max(1, WORKER_BYTES_PER_VALUE * largest_values)
    return max(1, min(cores - 1, MOST_WORKERS, holders - 1))
