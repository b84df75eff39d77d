"""The merge's computed tensors on worker threads: results in plan order, whole or in blocks,
buffers not overwritten before they are written, errors and closing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from app.core.merge.ahead import WORKER_BYTES_PER_VALUE, ComputedAhead, compute_workers

WORKER_PREFIX = "frankenmoe-compute"


def compute_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX) and t.is_alive()]


def test_results_come_in_plan_order_whatever_order_the_workers_finish_in():
    # Even positions take longer than odd ones, so the two workers finish out of order.
    def producer(position: int):
        def produce() -> int:
            time.sleep(0.02 if position % 4 == 0 else 0.001)
            return position * 10

        return produce

    positions = [1, 2, 4, 5, 6, 9, 10, 11]
    ahead = ComputedAhead({p: producer(p) for p in positions}, workers=2)
    try:
        taken = []
        for position in range(12):
            if position in ahead:
                taken += list(ahead.blocks(position))
        assert taken == [p * 10 for p in positions]
        assert 3 not in ahead and 0 not in ahead
    finally:
        ahead.close()
    assert not compute_threads()


def test_a_worker_reusing_its_buffer_computes_its_next_only_after_its_last_is_written():
    # Each worker writes every whole result into the same buffer of its own: the value must still be
    # the one produced for this position when the writer uses it.
    buffers = threading.local()

    def producer(position: int):
        def produce() -> list[int]:
            buffer = buffers.__dict__.setdefault("buffer", [0])
            buffer[0] = position
            return buffer

        return produce

    ahead = ComputedAhead({p: producer(p) for p in range(20)}, workers=2, buffers=3)
    try:
        for position in range(20):
            for buffer in ahead.blocks(position):
                time.sleep(0.005)  # the writer's write, which a worker racing ahead would overwrite meanwhile
                assert buffer[0] == position
    finally:
        ahead.close()


class Rows:
    """A BlockedTensor whose blocks land in each thread's own ring of `ring` buffers, as MergedRows' do."""

    rings = threading.local()

    def __init__(self, position: int, count: int, ring: int, pause: float = 0.0) -> None:
        self.position, self.count, self.ring, self.pause = position, count, ring, pause
        self.threads: list[str] = []

    def compute(self, index: int) -> list[tuple[int, int]]:
        # Per ring size: the writer's thread outlives a test, and computes blocks too.
        buffers = self.rings.__dict__.setdefault(f"buffers{self.ring}", [[(0, 0)] for _ in range(self.ring)])
        turn = self.rings.__dict__[f"turn{self.ring}"] = (
            self.rings.__dict__.get(f"turn{self.ring}", -1) + 1
        ) % self.ring
        time.sleep(self.pause)
        self.threads.append(threading.current_thread().name)
        buffer = buffers[turn]
        buffer[0] = (self.position, index)
        return buffer


def test_blocks_come_in_order_and_each_workers_ring_is_reused_only_once_written():
    # Each block must still hold its own value when the writer writes it, however slowly, while the
    # workers share out the blocks of one weight and go on to the next.
    ring = 3
    made = {p: Rows(p, p % 4 + 1, ring) for p in range(16)}
    producers = {p: (lambda p=p: made[p]) for p in range(16)}
    ahead = ComputedAhead(producers, workers=2, buffers=ring, blocked=range(16))
    try:
        for position in range(16):
            seen = []
            for buffer in ahead.blocks(position):
                time.sleep(0.002)
                seen.append(buffer[0])
            assert seen == [(position, block) for block in range(position % 4 + 1)]
    finally:
        ahead.close()
    assert not compute_threads()


def test_the_threads_compute_the_blocks_of_one_weight_side_by_side():
    rows = Rows(0, 12, ring=4, pause=0.01)
    ahead = ComputedAhead({0: lambda: rows, 1: lambda: 1}, workers=2, buffers=4, blocked=[0])
    try:
        assert [buffer[0] for buffer in ahead.blocks(0)] == [(0, index) for index in range(12)]
        assert list(ahead.blocks(1)) == [1]
    finally:
        ahead.close()
    # The workers, and the writer's thread while it waits for theirs.
    assert len(set(rows.threads)) >= 2
    assert any(name.startswith(WORKER_PREFIX) for name in rows.threads)


def test_the_writers_thread_computes_blocks_ahead_while_it_waits_as_many_as_its_ring_holds():
    # The one worker is slow; the writer computes blocks further on while it waits for the worker's,
    # and keeps each block's value until it is written: computing more than its ring holds would
    # overwrite a block not yet written.
    ring = 3

    class SlowWorker(Rows):
        def compute(self, index: int) -> list[tuple[int, int]]:
            if threading.current_thread().name.startswith(WORKER_PREFIX):
                time.sleep(0.05)
            return super().compute(index)

    rows = SlowWorker(0, 10, ring)
    ahead = ComputedAhead({0: lambda: rows, 1: lambda: 7}, workers=1, buffers=ring, blocked=[0])
    try:
        seen = []
        for buffer in ahead.blocks(0):
            time.sleep(0.002)  # the writer's write
            seen.append(buffer[0])
        assert seen == [(0, index) for index in range(10)]
        assert list(ahead.blocks(1)) == [7]
    finally:
        ahead.close()
    assert rows.threads.count(threading.current_thread().name) >= 4
    assert not compute_threads()


class Failing:
    count = 3

    def compute(self, index: int) -> int:
        if index == 1:
            raise OSError("the adapter ended early")
        return index


def unreadable() -> Failing:
    raise OSError("no adapter file")


def test_a_blocks_error_midway_is_raised_after_the_blocks_before_it():
    ahead = ComputedAhead({0: Failing}, workers=1, buffers=2, blocked=[0])
    try:
        taken = []
        with pytest.raises(OSError, match="ended early"):
            for block in ahead.blocks(0):
                taken.append(block)
        assert taken == [0]
    finally:
        ahead.close()
    assert not compute_threads()


def test_a_blocked_tensor_that_cannot_be_prepared_fails_in_its_turn():
    ahead = ComputedAhead({0: lambda: 0, 1: unreadable, 2: lambda: 2}, workers=2, buffers=2, blocked=[1])
    try:
        assert list(ahead.blocks(0)) == [0]
        with pytest.raises(OSError, match="no adapter file"):
            list(ahead.blocks(1))
    finally:
        ahead.close()
    assert not compute_threads()


def test_a_producers_error_is_raised_in_the_writers_thread_when_its_turn_comes():
    def produce_value(position: int):
        return lambda: position

    def fail() -> int:
        raise OSError("the disk went away")

    producers = {0: produce_value(0), 1: produce_value(1), 2: fail, 3: produce_value(3), 4: produce_value(4)}
    ahead = ComputedAhead(producers, workers=2)
    try:
        for position in (0, 1):
            assert list(ahead.blocks(position)) == [position]
        with pytest.raises(OSError, match="disk went away"):
            list(ahead.blocks(2))
    finally:
        ahead.close()
    assert not compute_threads()


def test_closing_midway_stops_the_workers_without_computing_the_rest():
    calls: list[int] = []

    def producer(position: int):
        def produce() -> int:
            calls.append(position)
            return position

        return produce

    ahead = ComputedAhead({p: producer(p) for p in range(50)}, workers=2)
    assert list(ahead.blocks(0)) == [0]
    ahead.close()
    assert not compute_threads()
    # What was taken, plus at most one weight in flight per worker.
    assert len(calls) <= 1 + 2


def test_each_worker_computes_on_one_torch_thread_and_gives_the_count_back():
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a machine with two cores or more
    try:
        ahead = ComputedAhead({p: torch.get_num_threads for p in range(4)}, workers=2)
        try:
            for position in range(4):
                assert list(ahead.blocks(position)) == [1]
        finally:
            ahead.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads_before)


def test_no_producers_start_no_threads():
    ahead = ComputedAhead({}, workers=2)
    assert not compute_threads()
    ahead.close()


def test_workers_where_there_are_cores_and_memory_for_them_else_one():
    bench_weight = 3072 * 1024  # bench/lora_merge.py's MLP weights
    seven_b_weight = 14336 * 4096  # a 7B Mistral's
    # A worker for each core but the writer's (which computes too), at most four, as many as memory allows.
    assert compute_workers(bench_weight, available_bytes=8 * 2**30, cores=2) == 1
    assert compute_workers(bench_weight, available_bytes=8 * 2**30, cores=3) == 2
    assert compute_workers(seven_b_weight, available_bytes=32 * 2**30, cores=16) == 4
    assert compute_workers(bench_weight, available_bytes=8 * 2**30, cores=1) == 1
    assert compute_workers(0, available_bytes=2**30, cores=3) == 2
    # Three threads' buffers for a 7B weight (about 1.4 GB) fit in a quarter of 6 GB, four do not.
    assert 3 * WORKER_BYTES_PER_VALUE * seven_b_weight <= 6 * 2**30 // 4 < 4 * WORKER_BYTES_PER_VALUE * seven_b_weight
    assert compute_workers(seven_b_weight, available_bytes=6 * 2**30, cores=16) == 2
    # Not even the writer and one worker fit: one worker all the same, the least there can be.
    assert compute_workers(seven_b_weight, available_bytes=3 * 2**30, cores=16) == 1
