"""A PEFT adapter on the Hub, before it is downloaded: its base model, rank and size, from its
``adapter_config.json`` and the Hub's file metadata alone.

Reading a downloaded adapter (its tensors, and whether it suits a given model) is
:mod:`app.core.lora`'s work; this only describes what the Hub shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.problems import Problem, Severity
from app.core.progress import format_bytes
from app.core.recipe import looks_local

LORA_TYPE = "LORA"


@dataclass(frozen=True, slots=True)
class AdapterCard:
    """What a Hub adapter's settings and files say. ``base_*`` describe the model it was trained on,
    when that model is on the Hub and could be read (None otherwise)."""

    base_model: str | None
    peft_type: str | None
    r: int | None
    lora_alpha: float | None
    use_rslora: bool
    use_dora: bool
    target_modules: tuple[str, ...]
    ranks_vary: bool  # rank_pattern or alpha_pattern give some modules their own rank or alpha
    modules_to_save: tuple[str, ...]
    weights_bytes: int
    files_bytes: int  # every file an adapter download fetches (weights, config, tokenizer, card)
    base_parameters: int | None = None
    base_bytes: int | None = None
    base_cached: bool = False

    @property
    def base_is_local(self) -> bool:
        """Trained on a folder of its author's machine: the Hub cannot say what that base was."""
        return self.base_model is not None and looks_local(self.base_model)

    def rank_text(self) -> str:
        """For example "r=16, alpha=32, rsLoRA"."""
        alpha = self.lora_alpha
        parts = [f"r={self.r if self.r is not None else '?'}"]
        parts.append(f"alpha={alpha:g}" if alpha is not None else "alpha=?")
        if self.use_rslora:
            parts.append("rsLoRA")
        if self.use_dora:
            parts.append("DoRA")
        if self.ranks_vary:
            parts.append("some modules with their own rank")
        return ", ".join(parts)

    @property
    def fetch_bytes(self) -> int:
        """What using it downloads: the adapter, plus its base unless the cache holds it (or it is unknown)."""
        base = 0 if self.base_cached or self.base_bytes is None else self.base_bytes
        return self.files_bytes + base

    def fetch_text(self) -> str:
        """For example "13.2 kB for the adapter + 1.2 GB for its base org/name (not in the cache)"."""
        text = f"{format_bytes(self.files_bytes)} for the adapter"
        if self.base_model is None or self.base_is_local:
            return text
        if self.base_cached:
            return f"{text}; its base {self.base_model} is already in the cache"
        if self.base_bytes is None:
            return f"{text} + its base {self.base_model} (size unknown)"
        return f"{text} + {format_bytes(self.base_bytes)} for its base {self.base_model} (not in the cache)"


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # peft also allows one regular expression as target_modules
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return ()


def read_adapter_card(settings: Mapping[str, Any], weights_bytes: int, files_bytes: int) -> AdapterCard:
    """The facts of an ``adapter_config.json`` that a person choosing an adapter wants to see, with the
    size of its weights and of all the files a download of it fetches."""
    r = settings.get("r")
    alpha = settings.get("lora_alpha")
    base = settings.get("base_model_name_or_path")
    return AdapterCard(
        base_model=str(base) if isinstance(base, str) and base.strip() else None,
        peft_type=str(settings["peft_type"]) if settings.get("peft_type") is not None else None,
        r=r if isinstance(r, int) and not isinstance(r, bool) else None,
        lora_alpha=float(alpha) if isinstance(alpha, int | float) and not isinstance(alpha, bool) else None,
        use_rslora=settings.get("use_rslora") is True,
        use_dora=settings.get("use_dora") is True,
        target_modules=_strings(settings.get("target_modules")),
        ranks_vary=bool(settings.get("rank_pattern")) or bool(settings.get("alpha_pattern")),
        modules_to_save=_strings(settings.get("modules_to_save")),
        weights_bytes=weights_bytes,
        files_bytes=files_bytes,
    )


def card_problems(card: AdapterCard, repo: str, has_safetensors: bool) -> list[Problem]:
    """What rules the adapter out, or needs the user's attention, before anything is downloaded."""
    problems: list[Problem] = []
    if card.peft_type is not None and card.peft_type.upper() != LORA_TYPE:
        problems.append(
            Problem(
                "model",
                f"{repo} is a {card.peft_type} adapter; only LoRA adapters can become experts",
                "pick a LoRA adapter (peft_type LORA in its adapter_config.json)",
            )
        )
    if not has_safetensors:
        problems.append(
            Problem(
                "model",
                f"{repo} has no adapter_model.safetensors (only a pickle adapter_model.bin, which is not "
                "loaded, as it can run code)",
                "pick a version of the adapter saved as safetensors",
            )
        )
    if card.r is None or card.lora_alpha is None:
        problems.append(
            Problem(
                "model",
                f"the adapter_config.json of {repo} gives no valid r or lora_alpha",
                "pick another adapter; this one's settings are damaged",
            )
        )
    if card.base_model is None:
        problems.append(
            Problem(
                "model",
                f"{repo} does not name the model it was trained on",
                "pair it with the model its card names as the base",
                Severity.WARNING,
            )
        )
    elif card.base_is_local:
        problems.append(
            Problem(
                "model",
                f"{repo} was trained on a local folder of its author ({card.base_model}), so the Hub cannot "
                "say which model that was",
                "pair it with the model its card names as the base",
                Severity.WARNING,
            )
        )
    return problems
