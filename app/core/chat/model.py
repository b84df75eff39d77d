"""A loaded chat model and its generation job: our own token loop with a KV cache.

Our own loop, rather than ``model.generate``, so that the stop flag is checked before every token,
the routing of each step comes to the host in one copy, and every
token is reported the moment it exists. Sampling follows transformers' definitions (repetition
penalty as in CTRL, then temperature, top-k, top-p), seeded on the device for reproducibility.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Collection, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from app.core.chat.capture import RouterCapture, StepRouting, decoder_layers
from app.core.chat.trace import ExpertLegend, TokenRouting, token_routings
from app.core.devices import free_device_memory
from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled

if TYPE_CHECKING:
    import torch

StopReason = Literal["eos", "length", "stopped"]

# Used when a tokenizer has no chat template: plain, and readable by any base model.
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 0.9
    top_k: int = 50  # 0 means no top-k cut
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    seed: int | None = None  # None: a fresh seed, reported in the result so the answer can be repeated

    def validated(self) -> SamplingSettings:
        if self.temperature < 0:
            raise FrankenMoEError("the temperature cannot be negative", "use 0 for greedy decoding, or e.g. 0.7")
        if not 0 < self.top_p <= 1:
            raise FrankenMoEError(f"top-p {self.top_p} is outside (0, 1]", "use e.g. 0.9, or 1 to switch it off")
        if self.top_k < 0:
            raise FrankenMoEError("top-k cannot be negative", "use e.g. 50, or 0 to switch it off")
        if self.repetition_penalty <= 0:
            raise FrankenMoEError("the repetition penalty must be positive", "use 1 to switch it off, or e.g. 1.1")
        if self.max_new_tokens < 1:
            raise FrankenMoEError("max new tokens must be at least 1", "use e.g. 512")
        return self


@dataclass(frozen=True, slots=True)
class PromptProcessed:
    """The prompt went through the model: its tokens with their routing."""

    tokens: tuple[TokenRouting, ...]
    seconds: float


@dataclass(frozen=True, slots=True)
class TokenGenerated:
    """One new token: its routing, the text it adds to the answer, and the running speed."""

    token: TokenRouting
    text: str  # what to append to the answer shown so far (empty mid-character, and for the end token)
    count: int  # tokens generated so far
    time_to_first_token: float
    tokens_per_second: float


GenerationEvent = PromptProcessed | TokenGenerated


@dataclass(frozen=True, slots=True)
class GenerationResult:
    text: str
    prompt: tuple[TokenRouting, ...]
    generated: tuple[TokenRouting, ...]
    stop_reason: StopReason
    seed: int
    time_to_first_token: float
    tokens_per_second: float  # decoding speed: tokens after the first over the time they took

    @property
    def trace(self) -> tuple[TokenRouting, ...]:
        return self.prompt + self.generated


class IncrementalDecoder:
    """Text of a growing token sequence, emitted as it becomes complete characters.

    Decoding a window of recent tokens (not each token alone) keeps spaces and multi-byte characters
    right; a window ending in U+FFFD is a character still missing bytes, so it waits for the next.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""


@dataclass
class _Sampler:
    settings: SamplingSettings
    generator: torch.Generator
    seen: torch.Tensor  # vocabulary mask of tokens in the sequence, for the repetition penalty

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after the repetition penalty, temperature, top-k and top-p (-inf where cut)."""
        import torch

        scores = logits.float()
        penalty = self.settings.repetition_penalty
        if penalty != 1.0:
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen, penalised, scores)
        if self.settings.temperature == 0:
            return scores
        scores = scores / self.settings.temperature
        if 0 < self.settings.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.settings.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.settings.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # Drop a token when the tokens before it already cover top_p; the first always stays.
            drop = (probs.cumsum(dim=-1) - probs) >= self.settings.top_p
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return scores

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        scores = self.scores(logits)
        if self.settings.temperature == 0:
            chosen = scores.argmax(dim=-1, keepdim=True)
        else:
            chosen = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)
        self.seen[chosen] = True
        return chosen


@dataclass
class ChatModel:
    """A loaded causal LM with its tokenizer and router capture. Owned by one worker thread."""

    model: Any
    tokenizer: Any
    name: str
    device: str
    folder: Path | None = None
    description: str = ""  # how it was loaded, e.g. "cuda, bfloat16"
    capture: RouterCapture = field(init=False)
    legend: ExpertLegend = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.capture = RouterCapture(self.model)
        self.legend = ExpertLegend.default(self.capture.rule.num_experts)
        if self.folder is not None and self.capture.is_moe:
            from app.core.chat.trace import read_legend

            self.legend = read_legend(self.folder, self.capture.rule.num_experts)
        parameters = inspect.signature(self.model.forward).parameters
        self._keeps_last_logits = "logits_to_keep" in parameters
        # transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning).
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"

    # -- description

    @property
    def is_moe(self) -> bool:
        return self.capture.is_moe

    @property
    def has_shared_expert(self) -> bool:
        """Whether the MoE layers also run a shared expert for every token (Qwen2-MoE), which no router picks."""
        layers = decoder_layers(self.model)
        return any(hasattr(getattr(layers[index], "mlp", None), "shared_expert") for index in self.capture.layers)

    @property
    def panel_unavailable_reason(self) -> str:
        """Why there is no routing panel, or "" when there is one."""
        if self.is_moe:
            return ""
        architecture = type(self.model).__name__
        return (
            f"{self.name} is a dense model ({architecture}): no layer has a router, so every token goes "
            "through the same MLP and there are no expert choices to show"
        )

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- prompts

    def prompt_ids(self, messages: Sequence[Mapping[str, str]], stop: threading.Event | None = None) -> list[int]:
        """Token ids of a conversation, ending where the assistant's answer begins.

        Setting ``stop`` cancels rendering the chat template (Cancelled).
        """
        text = self._chat_text([dict(m) for m in messages], stop)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _chat_text(self, messages: list[dict[str, str]], stop: threading.Event | None = None) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            from app.core.chat.template import TemplateLimitError, render_chat_template

            try:
                # As apply_chat_template(tokenize=False) renders it, but with time and size limits.
                return render_chat_template(
                    self.tokenizer.get_chat_template(),
                    messages,
                    self.tokenizer.special_tokens_map,
                    add_generation_prompt=True,
                    cancel=stop,
                )
            except (TemplateLimitError, Cancelled):
                raise
            except Exception as exc:  # templates raise their own errors, e.g. for a system role
                if messages and messages[0]["role"] == "system" and len(messages) > 1:
                    # Many templates refuse a system message; fold it into the first user turn.
                    system, first, *rest = messages
                    merged = {"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}
                    return self._chat_text([merged, *rest], stop)
                raise FrankenMoEError(
                    f"the chat template of {self.name} failed ({exc})", "fix the template or remove it"
                ) from exc
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        turns = [f"{FALLBACK_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
        return bos + "\n\n".join([*turns, "Assistant:"])

    def stop_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, Sequence):
                ids.update(int(v) for v in value)
        return ids

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        return list(self.tokenizer.batch_decode([[i] for i in ids]))

    # -- generation

    def generate(
        self,
        prompt_ids: Sequence[int],
        settings: SamplingSettings,
        stop: threading.Event | None = None,
        capture: bool = True,
        stop_token_ids: Collection[int] | None = None,
    ) -> Generator[GenerationEvent, None, GenerationResult]:
        """Generate an answer, yielding the prompt's routing and then one event per token.

        Setting ``stop`` ends the answer before the next token (not an error: the result keeps what
        was generated). ``capture`` off skips routing capture (the tokens then carry no routing).
        """
        import torch

        settings = settings.validated()
        if not prompt_ids:
            raise FrankenMoEError("the prompt has no tokens", "type a message")
        stops = set(self.stop_token_ids() if stop_token_ids is None else stop_token_ids)
        seed = settings.seed if settings.seed is not None else secrets.randbits(63)
        capturing = capture and self.is_moe
        started = time.perf_counter()
        decoder = IncrementalDecoder(self.tokenizer)
        answer: list[str] = []
        generated: list[TokenRouting] = []
        first_token_at = last_token_at = 0.0
        position = len(prompt_ids)

        with torch.inference_mode():
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.input_device)
            logits, cache, routing = self._step(ids, None, capturing)
            sampler = _Sampler(
                settings,
                torch.Generator(device=logits.device).manual_seed(seed),
                torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device),
            )
            sampler.seen[ids[0].to(logits.device)] = True
            next_token = sampler.next_token(logits)
        prompt = tuple(self._routings(0, list(prompt_ids), False, routing))
        yield PromptProcessed(prompt, time.perf_counter() - started)

        stop_reason: StopReason = "length"
        while True:
            token_id = int(next_token)  # the one sync a token needs besides the routing copy
            # A token's routing exists once it has gone through the model as input, so it is fed
            # before it is reported; the logits of that step give the token after it.
            with torch.inference_mode():
                logits, cache, routing = self._step(next_token.view(1, 1).to(self.input_device), cache, capturing)
            (token,) = self._routings(position, [token_id], True, routing)
            generated.append(token)
            # The token that ends the answer (e.g. "</s>") is markup for the model, not text for the
            # reader: it keeps its routing in the trace but adds nothing to the answer.
            text = "" if token_id in stops else decoder.add(token_id)
            answer.append(text)
            last_token_at = time.perf_counter()
            first_token_at = first_token_at or last_token_at
            rate = (len(generated) - 1) / (last_token_at - first_token_at) if len(generated) > 1 else 0.0
            yield TokenGenerated(token, text, len(generated), first_token_at - started, rate)
            position += 1
            if token_id in stops:
                stop_reason = "eos"
                break
            if len(generated) >= settings.max_new_tokens:
                break
            if stop is not None and stop.is_set():
                stop_reason = "stopped"
                break
            with torch.inference_mode():
                next_token = sampler.next_token(logits)

        rate = (len(generated) - 1) / (last_token_at - first_token_at) if len(generated) > 1 else 0.0
        return GenerationResult(
            text="".join(answer),
            prompt=prompt,
            generated=tuple(generated),
            stop_reason=stop_reason,
            seed=seed,
            time_to_first_token=first_token_at - started,
            tokens_per_second=rate,
        )

    def _step(self, ids: torch.Tensor, cache: Any, capturing: bool) -> tuple[torch.Tensor, Any, StepRouting | None]:
        """One forward pass: the last position's logits, the cache, and the step's routing on the host."""
        kwargs: dict[str, Any] = {"input_ids": ids, self._cache_argument: cache, "use_cache": True}
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1  # the prompt's other logits are never used; skip computing them
        self.capture.enabled = capturing
        self.capture.begin_step()
        try:
            output = self.model(**kwargs)
            routing = self.capture.finish_step() if capturing else None
        finally:
            self.capture.enabled = False
        return output.logits[0, -1], getattr(output, self._cache_argument), routing

    def _routings(
        self,
        first_position: int,
        ids: list[int],
        generated: bool,
        routing: StepRouting | None,
    ) -> list[TokenRouting]:
        import numpy as np

        texts = self.token_texts(ids)
        if routing is None:
            empty = np.zeros((len(ids), 0, 0))
            return token_routings(first_position, ids, texts, generated, (), empty, empty, empty)
        return token_routings(
            first_position, ids, texts, generated, self.capture.layers, routing.probs, routing.experts, routing.weights
        )

    # -- releasing

    def unload(self) -> None:
        """Free the model's memory (GPU memory included); the object is unusable afterwards."""
        self.capture.remove()
        self.model = None
        free_device_memory()
