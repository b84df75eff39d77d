"""Chat with a loaded model while recording which experts its routers chose for every token.

- :mod:`~app.core.chat.loading`: memory estimate, load plan with fallbacks, loading job.
- :mod:`~app.core.chat.model`: :class:`ChatModel`, which owns the model, and its generation job.
- :mod:`~app.core.chat.capture`: router discovery and per-step routing capture.
- :mod:`~app.core.chat.session`: conversation trees with branches, save/load, Markdown export.
- :mod:`~app.core.chat.trace`: the JSON Lines routing trace, CSV exports, usage statistics, legend.
"""

from app.core.chat.loading import (
    LoadMode,
    LoadOption,
    LoadPlan,
    LoadRequest,
    ModelDoesNotFit,
    load_chat_model,
    plan_load,
)
from app.core.chat.model import (
    ChatModel,
    GenerationEvent,
    GenerationResult,
    PromptProcessed,
    SamplingSettings,
    TokenGenerated,
)
from app.core.chat.session import ChatSession, Conversation, Generation, Message
from app.core.chat.trace import ExpertLegend, ExpertUsage, TokenRouting, read_trace, trace_csv, write_trace

__all__ = [
    "ChatModel",
    "ChatSession",
    "Conversation",
    "ExpertLegend",
    "ExpertUsage",
    "Generation",
    "GenerationEvent",
    "GenerationResult",
    "LoadMode",
    "LoadOption",
    "LoadPlan",
    "LoadRequest",
    "Message",
    "ModelDoesNotFit",
    "PromptProcessed",
    "SamplingSettings",
    "TokenGenerated",
    "TokenRouting",
    "load_chat_model",
    "plan_load",
    "read_trace",
    "trace_csv",
    "write_trace",
]
