"""The chat's one long-lived worker thread, which owns the loaded model.

The page talks to the worker only through signals (queued, so every slot runs in the thread that
owns its object) and two flags it may set at any time: ``stop`` ends an answer before its next
token, ``cancel`` ends a load at its next chunk. The worker never touches a widget.

Tokens can come far faster than anyone reads them; the worker sends them in batches at most
:data:`UPDATES_PER_SECOND` times a second, so the GUI stays smooth whatever the generation speed.

The conversation is shared with the page: the worker changes it only while an answer runs, and the
page reads or changes it only while none does (its buttons say so).

The routing override (experts per token, experts switched off) is set by the page at any time and
applied by the worker, in its own thread, before each token: a change reaches the next token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from app.core.chat import (
    ChatSession,
    Conversation,
    ExpertLegend,
    LoadRequest,
    Message,
    PromptProcessed,
    SamplingSettings,
    TokenGenerated,
)
from app.core.eval.controls import RoutingOverride
from app.core.progress import Cancelled, Progress

if TYPE_CHECKING:
    from app.core.chat import ChatModel

UPDATES_PER_SECOND = 30
UPDATE_INTERVAL_S = 1 / UPDATES_PER_SECOND
JOIN_TIMEOUT_MS = 30_000

# Strong references until each thread ends: a QThread destroyed while running takes the process down,
# and a page can go without its shutdown having run (a window whose close was refused, then dropped).
_running_threads: set[QThread] = set()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What the page may know of the loaded model; the model itself stays in the worker thread."""

    name: str
    description: str
    legend: ExpertLegend
    is_moe: bool
    panel_unavailable_reason: str
    layers: tuple[int, ...]  # decoder layer index of each routed layer
    top_k: int
    has_shared_expert: bool

    @classmethod
    def of(cls, model: ChatModel) -> LoadedModel:
        return cls(
            name=model.name,
            description=model.description,
            legend=model.legend,
            is_moe=model.is_moe,
            panel_unavailable_reason=model.panel_unavailable_reason,
            layers=model.capture.layers,
            top_k=model.capture.rule.top_k,
            has_shared_expert=model.has_shared_expert,
        )


class AnswerKind(Enum):
    SEND = "send"
    REGENERATE = "regenerate"
    EDIT = "edit"


@dataclass(frozen=True, slots=True)
class AnswerRequest:
    kind: AnswerKind
    conversation: Conversation
    settings: SamplingSettings
    text: str = ""  # the message sent, or the edited text
    message_id: str = ""  # the message edited


class ChatWorker(QObject):
    """Loads, answers and unloads in its own thread; reports only through its signals."""

    load_progress = Signal(object)  # Progress
    loaded = Signal(object)  # LoadedModel
    load_failed = Signal(object)  # the exception; ModelDoesNotFit carries the plan with what fits
    load_cancelled = Signal()
    unloaded = Signal()
    prompt_processed = Signal(object)  # PromptProcessed
    tokens_generated = Signal(list)  # a batch of TokenGenerated, oldest first
    answer_finished = Signal(object)  # the new Message (None for an edited answer, which is not generated)
    answer_failed = Signal(object)  # the exception

    def __init__(self, stop: threading.Event, cancel: threading.Event) -> None:
        super().__init__()
        self._stop = stop
        self._cancel = cancel
        self._model: ChatModel | None = None
        self._routing_lock = threading.Lock()
        self._routing = RoutingOverride()

    def set_routing(self, override: RoutingOverride) -> None:
        """Route from the next token on as override says; called from any thread."""
        with self._routing_lock:
            self._routing = override

    @property
    def routing(self) -> RoutingOverride:
        with self._routing_lock:
            return self._routing

    @Slot(object)
    def load(self, request: LoadRequest) -> None:
        from app.core.chat import load_chat_model

        self.release_model()
        last_sent, last_stage = 0.0, ""
        try:
            job = load_chat_model(request, self._cancel)
            while True:
                try:
                    record: Progress = next(job)
                except StopIteration as finished:
                    self._model = finished.value
                    break
                now = time.monotonic()
                if record.stage != last_stage or now - last_sent >= UPDATE_INTERVAL_S:
                    self.load_progress.emit(record)
                    last_sent, last_stage = now, record.stage
        except Cancelled:
            self.load_cancelled.emit()
            return
        except Exception as error:  # reported to the page, which explains it
            self.load_failed.emit(error)
            return
        assert self._model is not None
        self.loaded.emit(LoadedModel.of(self._model))

    @Slot()
    def unload(self) -> None:
        self.release_model()
        self.unloaded.emit()

    def release_model(self) -> None:
        """Free the model's memory. Called in the worker thread, or once it has been joined."""
        if self._model is not None:
            self._model.unload()
            self._model = None

    @Slot(object)
    def answer(self, request: AnswerRequest) -> None:
        if self._model is None:
            return  # unloaded while the request was queued; the page already says so
        session = ChatSession(self._model, request.conversation, request.settings)
        job: Generator[Any, None, Message | None]
        if request.kind is AnswerKind.SEND:
            job = session.send(request.text, self._stop)
        elif request.kind is AnswerKind.REGENERATE:
            job = session.regenerate(self._stop)
        else:
            job = session.edit(request.message_id, request.text, self._stop)
        pending: list[TokenGenerated] = []
        last_sent = 0.0
        routing = _AppliedRouting(self._model)
        try:
            while True:
                routing.apply(self.routing)
                try:
                    event = next(job)
                except StopIteration as finished:
                    message = finished.value
                    break
                if isinstance(event, PromptProcessed):
                    self.prompt_processed.emit(event)
                    continue
                pending.append(event)
                now = time.monotonic()
                if now - last_sent >= UPDATE_INTERVAL_S:
                    self.tokens_generated.emit(pending)
                    pending, last_sent = [], now
        except Exception as error:  # reported to the page, which explains it
            if pending:
                self.tokens_generated.emit(pending)
            self.answer_failed.emit(error)
            return
        finally:
            routing.leave()
        if pending:
            self.tokens_generated.emit(pending)
        self.answer_finished.emit(message)


class _AppliedRouting:
    """The override in force on the worker's model during one answer; swapped between tokens."""

    def __init__(self, model: ChatModel) -> None:
        self._model = model
        self._rule = model.capture.rule
        self._applied = RoutingOverride()
        self._stack = ExitStack()

    def apply(self, wanted: RoutingOverride) -> None:
        if wanted == self._applied:
            return
        from app.core.eval.controls import overridden_rule, routing_override

        self.leave()
        self._stack.enter_context(routing_override(self._model.model, wanted))
        # The routing panel reads the picks from the router logits with the capture's rule: its k follows.
        self._model.capture.rule = overridden_rule(self._rule, wanted)
        self._applied = wanted

    def leave(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._model.capture.rule = self._rule
        self._applied = RoutingOverride()


class ChatBackend(QObject):
    """The GUI thread's side of the worker: requests go out as queued signals, results come back."""

    load_requested = Signal(object)
    unload_requested = Signal()
    answer_requested = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.stop = threading.Event()
        self.cancel = threading.Event()
        self.worker = ChatWorker(self.stop, self.cancel)
        self.thread = QThread()
        self.thread.setObjectName("chat model")
        self.worker.moveToThread(self.thread)
        queued = Qt.ConnectionType.QueuedConnection
        self.load_requested.connect(self.worker.load, queued)
        self.unload_requested.connect(self.worker.unload, queued)
        self.answer_requested.connect(self.worker.answer, queued)
        self.thread.finished.connect(lambda: _running_threads.discard(self.thread))

    def load(self, request: LoadRequest) -> None:
        # Started on the first load, so that a page never used for chatting holds no thread.
        if not self.thread.isRunning():
            _running_threads.add(self.thread)
            self.thread.start()
        self.cancel.clear()
        self.load_requested.emit(request)

    def unload(self) -> None:
        self.unload_requested.emit()

    def set_routing(self, override: RoutingOverride) -> None:
        self.worker.set_routing(override)

    def answer(self, request: AnswerRequest) -> None:
        self.stop.clear()
        self.answer_requested.emit(request)

    def shutdown(self) -> bool:
        """Stop what runs at its next token or chunk, join the thread, then free the model."""
        self.stop.set()
        self.cancel.set()
        self.thread.quit()
        joined = self.thread.wait(JOIN_TIMEOUT_MS)
        if joined:
            # The thread has ended, so this thread is now the model's only user.
            self.worker.release_model()
        return joined
