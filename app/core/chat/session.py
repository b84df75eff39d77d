"""Conversations as trees, and a chat session that answers in them.

Editing an earlier message or regenerating an answer adds a sibling, so nothing that followed is
ever erased: the conversation is a tree and the transcript is the active path from the root to the
active leaf. Conversations save as JSON with every answer's routing, and export to Markdown.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from app.core.chat.model import ChatModel, GenerationEvent, GenerationResult, SamplingSettings, StopReason
from app.core.chat.trace import TokenRouting
from app.core.problems import FrankenMoEError

Role = Literal["user", "assistant"]
FORMAT = "frankenmoe-chat"
FORMAT_VERSION = 1
STOP_REASONS = {"eos": "the end of the answer", "length": "the token limit", "stopped": "the user"}


@dataclass(frozen=True, slots=True)
class Generation:
    """How an answer was made: settings, seed, speed, and the routing of every token."""

    settings: SamplingSettings
    seed: int
    stop_reason: StopReason
    time_to_first_token: float
    tokens_per_second: float
    prompt: tuple[TokenRouting, ...]
    generated: tuple[TokenRouting, ...]

    @classmethod
    def from_result(cls, result: GenerationResult, settings: SamplingSettings) -> Generation:
        return cls(
            settings=settings,
            seed=result.seed,
            stop_reason=result.stop_reason,
            time_to_first_token=result.time_to_first_token,
            tokens_per_second=result.tokens_per_second,
            prompt=result.prompt,
            generated=result.generated,
        )

    @property
    def trace(self) -> tuple[TokenRouting, ...]:
        return self.prompt + self.generated

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "seed": self.seed,
            "stop_reason": self.stop_reason,
            "time_to_first_token": self.time_to_first_token,
            "tokens_per_second": self.tokens_per_second,
            "trace": [token.to_json() for token in self.trace],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        trace = [TokenRouting.from_json(token) for token in data["trace"]]
        return cls(
            settings=SamplingSettings(**data["settings"]),
            seed=int(data["seed"]),
            stop_reason=data["stop_reason"],
            time_to_first_token=float(data["time_to_first_token"]),
            tokens_per_second=float(data["tokens_per_second"]),
            prompt=tuple(t for t in trace if not t.generated),
            generated=tuple(t for t in trace if t.generated),
        )


@dataclass(frozen=True, slots=True)
class Message:
    id: str
    role: Role
    content: str
    parent: str | None
    created: float
    generation: Generation | None = None  # answers only

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "role": self.role,
            "content": self.content,
            "parent": self.parent,
            "created": self.created,
        }
        if self.generation is not None:
            data["generation"] = self.generation.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        generation = Generation.from_json(data["generation"]) if data.get("generation") else None
        content = str(data["content"])
        if generation is not None and generation.stop_reason == "eos" and generation.generated:
            # Files saved before the end token was left out of answers end with its text (e.g. "</s>").
            content = content.removesuffix(generation.generated[-1].token)
        return cls(
            id=str(data["id"]),
            role=data["role"],
            content=content,
            parent=data.get("parent"),
            created=float(data.get("created", 0.0)),
            generation=generation,
        )


@dataclass
class Conversation:
    system_prompt: str = ""
    model: str = ""  # the name of the model it was held with, for the record
    messages: dict[str, Message] = field(default_factory=dict)
    active: str | None = None  # the leaf of the transcript shown

    # -- the tree

    def children(self, parent: str | None) -> list[Message]:
        return sorted((m for m in self.messages.values() if m.parent == parent), key=lambda m: m.created)

    def siblings(self, message_id: str) -> list[Message]:
        """The message and its alternatives (edits, regenerations), oldest first."""
        return self.children(self.messages[message_id].parent)

    def path(self, leaf: str | None = None) -> list[Message]:
        """The transcript from the first message down to leaf (the active leaf by default)."""
        node = self.active if leaf is None else leaf
        path = []
        while node is not None:
            message = self.messages[node]
            path.append(message)
            node = message.parent
        return path[::-1]

    def add(self, role: Role, content: str, parent: str | None, generation: Generation | None = None) -> Message:
        if parent is not None and parent not in self.messages:
            raise FrankenMoEError(f"no message {parent} in this conversation", "reload the conversation")
        # Strictly increasing times keep siblings in creation order even within one clock tick.
        latest = max((m.created for m in self.messages.values()), default=0.0)
        message = Message(uuid.uuid4().hex, role, content, parent, max(time.time(), latest + 1e-6), generation)
        self.messages[message.id] = message
        self.active = message.id
        return message

    def edit(self, message_id: str, content: str) -> Message:
        """A new version of a message beside the old one; the old branch stays, the new one is active."""
        old = self.messages[message_id]
        return self.add(old.role, content, old.parent)

    def select(self, message_id: str) -> None:
        """Show the branch through this message, down its most recent replies."""
        node = self.messages[message_id].id
        while children := self.children(node):
            node = children[-1].id
        self.active = node

    def clear(self) -> None:
        self.messages.clear()
        self.active = None

    # -- files

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "system_prompt": self.system_prompt,
            "active": self.active,
            "messages": [m.to_json() for m in sorted(self.messages.values(), key=lambda m: m.created)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        if data.get("format") != FORMAT:
            raise FrankenMoEError("this is not a FrankenMoE Studio conversation", "open a file saved from the chat")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise FrankenMoEError(
                "this conversation was saved by a newer FrankenMoE Studio", "update FrankenMoE Studio to open it"
            )
        messages = [Message.from_json(m) for m in data["messages"]]
        return cls(
            system_prompt=str(data.get("system_prompt", "")),
            model=str(data.get("model", "")),
            messages={m.id: m for m in messages},
            active=data.get("active"),
        )

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Conversation:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FrankenMoEError(f"cannot read the conversation {path} ({exc})", "check the file") from exc
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise FrankenMoEError(f"{path} is not a valid conversation ({exc})", "check the file") from exc

    def to_markdown(self) -> str:
        """The active transcript as Markdown, with each answer's speed and seed."""
        lines = [f"# Chat with {self.model}" if self.model else "# Chat", ""]
        if self.system_prompt:
            lines += ["**System**", "", self.system_prompt, ""]
        for message in self.path():
            lines += [f"**{message.role.title()}**", "", message.content, ""]
            if message.generation is not None:
                info = message.generation
                lines += [
                    f"*{len(info.generated)} tokens, {info.tokens_per_second:.1f} tokens/s, first token after "
                    f"{info.time_to_first_token:.2f} s, seed {info.seed}, ended by {STOP_REASONS[info.stop_reason]}*",
                    "",
                ]
        return "\n".join(lines)


class ChatSession:
    """A conversation held with a loaded model. Every answer is a generator of token events."""

    def __init__(
        self,
        model: ChatModel,
        conversation: Conversation | None = None,
        settings: SamplingSettings | None = None,
    ) -> None:
        self.model = model
        self.conversation = conversation or Conversation()
        self.conversation.model = self.conversation.model or model.name
        self.settings = settings or SamplingSettings()

    def send(self, text: str, stop: threading.Event | None = None) -> Generator[GenerationEvent, None, Message]:
        """Add a user message at the end of the transcript and answer it."""
        if not text.strip():
            raise FrankenMoEError("the message is empty", "type a message")
        question = self.conversation.add("user", text, self.conversation.active)
        return (yield from self._answer(question, stop))

    def regenerate(self, stop: threading.Event | None = None) -> Generator[GenerationEvent, None, Message]:
        """Answer the last question again, beside the previous answer."""
        path = self.conversation.path()
        if not path:
            raise FrankenMoEError("there is nothing to regenerate yet", "send a message first")
        question = path[-1] if path[-1].role == "user" else self.conversation.messages[path[-1].parent or ""]
        return (yield from self._answer(question, stop))

    def edit(
        self, message_id: str, text: str, stop: threading.Event | None = None
    ) -> Generator[GenerationEvent, None, Message | None]:
        """Edit an earlier message on a new branch; an edited question is answered afresh."""
        edited = self.conversation.edit(message_id, text)
        if edited.role == "assistant":
            return None
        return (yield from self._answer(edited, stop))

    def _answer(self, question: Message, stop: threading.Event | None) -> Generator[GenerationEvent, None, Message]:
        turns = [{"role": m.role, "content": m.content} for m in self.conversation.path(question.id)]
        if self.conversation.system_prompt:
            turns.insert(0, {"role": "system", "content": self.conversation.system_prompt})
        settings = self.settings
        result = yield from self.model.generate(self.model.prompt_ids(turns, stop), settings, stop)
        generation = Generation.from_result(result, settings)
        return self.conversation.add("assistant", result.text, question.id, generation)
