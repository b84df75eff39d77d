"""The chat worker's update cap, on a real tiny model with a clock the test controls: deterministic
whatever the speed of the machine."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from app.core.chat import Conversation, LoadRequest, SamplingSettings
from app.gui import chat_worker
from app.gui.chat_worker import AnswerKind, AnswerRequest, ChatWorker


@pytest.fixture(scope="module")
def moe(tiny_mixtral):
    return tiny_mixtral


class SteppingClock:
    """A monotonic clock that moves on by a fixed step each time it is read: one read per token."""

    def __init__(self, step: float) -> None:
        self.now = 1000.0
        self.step = step

    def monotonic(self) -> float:
        self.now += self.step
        return self.now


@pytest.mark.parametrize("tokens_per_second", [1000, 10])
def test_tokens_reach_the_gui_at_most_30_times_a_second(qtbot, moe, monkeypatch, tokens_per_second) -> None:
    clock = SteppingClock(1 / tokens_per_second)
    monkeypatch.setattr(chat_worker, "time", SimpleNamespace(monotonic=clock.monotonic))
    # Driven in this thread: signals are delivered as they are emitted, so every batch is counted.
    worker = ChatWorker(threading.Event(), threading.Event())
    batches: list[int] = []
    finished: list[object] = []
    worker.tokens_generated.connect(lambda events: batches.append(len(events)))
    worker.answer_finished.connect(finished.append)
    worker.load_failed.connect(lambda error: pytest.fail(str(error)))
    worker.load(LoadRequest(str(moe), device="cpu"))
    try:
        started = clock.now
        request = AnswerRequest(AnswerKind.SEND, Conversation(), SamplingSettings(max_new_tokens=60, seed=1), "Hi")
        worker.answer(request)
        elapsed = clock.now - started
    finally:
        worker.release_model()
    assert len(finished) == 1
    generated = sum(batches)
    assert generated >= 30  # enough tokens for batching to show
    if tokens_per_second > 30:
        # At most one batch per 1/30 s of the clock, plus the first and the last.
        assert len(batches) <= 2 + elapsed * chat_worker.UPDATES_PER_SECOND
    else:
        assert batches == [1] * generated  # slower than the cap: no token is held back
