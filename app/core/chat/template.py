"""Chat templates rendered with a time limit, an output-size limit and a cancel flag.

A chat template is Jinja code from the model's repository. transformers renders it in a sandbox
that stops it reaching Python's internals, but not from running for ever (nested ``range(99999)``
loops) or building a string of gigabytes (``'x' * 3000000000``). Here the same sandbox renders it,
as transformers' ``apply_chat_template`` does (same environment settings, filters and globals), with
a budget checked at every loop step, every operator and call that can grow a value, and every piece
of output: past the deadline or the size limit the render stops with a message saying which, and a
set cancel flag stops it as a cancel.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled

# A rendered prompt far longer than any model's context (about 2 million tokens) is a runaway template.
MAX_RENDERED_CHARS = 8 * 2**20
# Real templates render in milliseconds.
RENDER_TIME_LIMIT_S = 10.0
# An exponent past this makes integers of thousands of digits, which no template needs.
MAX_EXPONENT = 4096


class TemplateLimitError(FrankenMoEError):
    """A chat template ran past its time or size limit."""


@dataclass(slots=True)
class _Budget:
    deadline: float
    max_chars: int
    time_limit_s: float
    cancel: threading.Event | None

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled while the chat template was rendered")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(
                f"the chat template ran past the {self.time_limit_s:g} s limit (it may loop without end)",
                "fix or replace the model's chat template (chat_template in tokenizer_config.json, "
                "or chat_template.jinja)",
            )

    def check_size(self, size: int, what: str = "a value") -> None:
        if size > self.max_chars:
            raise TemplateLimitError(
                f"the chat template built {what} past the limit of {self.max_chars:,} characters",
                "fix or replace the model's chat template (chat_template in tokenizer_config.json, "
                "or chat_template.jinja)",
            )


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # the environment is only used through render_chat_template
        raise RuntimeError("a limited chat template was rendered without a budget")
    return budget


def _size(value: object) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _limited_iter(value: Iterable[Any]) -> Iterator[Any]:
    """Every template loop goes through this: each step checks the deadline and the cancel flag."""
    budget = _budget()
    for item in value:
        budget.check()
        yield item


def _limited_join(values: list[Any]) -> str:
    """The ``~`` operator: the parts' lengths are checked before they are joined."""
    parts = [str(value) for value in values]
    _budget().check_size(sum(map(len, parts)))
    return "".join(parts)


def _check_arguments(budget: _Budget, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse, before the call, what would build a value past the limit in one step.

    A width or count past the size limit (``center(10**10)``) is refused outright; ``join`` and
    ``replace`` are sized from their inputs. Anything else is checked on its result, after one step.
    """
    budget.check()
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > budget.max_chars:
            raise TemplateLimitError(
                f"the chat template calls {name} with {value}, past the limit of {budget.max_chars:,}",
                "fix or replace the model's chat template",
            )
    if name == "format" and args and isinstance(args[0], str):  # the format filter; str.format: wrap_str_format
        _check_format_widths(budget, args[0])
    if name == "join" and args and isinstance(args[0], list | tuple):
        separator = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
        budget.check_size(sum(_size(item) for item in args[0]) + len(separator) * len(args[0]))
    elif name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]):
        text, old, new = args[:3]
        if old and len(new) > len(old):
            budget.check_size(len(text) + text.count(old) * (len(new) - len(old)))


# Widths and precisions in printf-style ("%10s", "%.3f") and str.format ("{:>10}") specifications.
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*)(?:\.(\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


def _check_format_widths(budget: _Budget, text: str) -> None:
    """A format string padding a value to billions of characters is refused before it runs."""
    numbers = [n for match in _PRINTF_SPEC.finditer(text) for n in match.groups() if n]
    numbers += [n for match in _FORMAT_SPEC.finditer(text) for n in re.findall(r"\d+", match.group(1))]
    for number in numbers:
        if len(number) > 7 and int(number) > budget.max_chars:
            raise TemplateLimitError(
                f"the chat template formats a value {number} characters wide, past the limit of {budget.max_chars:,}",
                "fix or replace the model's chat template",
            )


def _limited_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Filters marked to receive the context or environment get it as their first argument.
    passes_first = hasattr(function, "jinja_pass_arg")

    def limited(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        _check_arguments(budget, name, args[1:] if passes_first else args, kwargs)
        result = function(*args, **kwargs)
        budget.check_size(_size(result))
        return result

    if passes_first:
        limited.jinja_pass_arg = function.jinja_pass_arg  # type: ignore[attr-defined]
    return limited


class _GenerationTag(Extension):
    """transformers' ``{% generation %}`` block: it marks the assistant's text and renders it as it is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """``dict`` as transformers gives it to templates: a callable without the type's attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(Namespace):
    """``namespace`` as transformers gives it: no underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # As transformers does: Jinja's own tojson escapes HTML characters, which prompts must keep.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _BudgetedTree(NodeTransformer):
    """Every for loop steps through _limited_iter, and every ``~`` joins through _limited_join."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, "_limited_iter", [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        parts = nodes.List(list(node.nodes), lineno=node.lineno)
        return nodes.Filter(parts, "_limited_join", [], [], None, None, lineno=node.lineno)


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template sandbox, with every way to run long or grow large going through the budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
        self.filters = {name: _limited_filter(name, function) for name, function in self.filters.items()}
        self.filters["tojson"] = _limited_filter("tojson", _tojson)
        self.filters["_limited_iter"] = _limited_iter
        self.filters["_limited_join"] = _limited_join
        self.globals.update(
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Jinja has no public hook into the syntax tree, so the tree is rewritten here.
        tree = _BudgetedTree().visit(super()._parse(source, name, filename))
        assert isinstance(tree, nodes.Template)
        return tree

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.check()
        if operator == "*":
            count, sequence = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(count, int) and _size(sequence):
                budget.check_size(_size(sequence) * count)
        elif operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise TemplateLimitError(
                f"the chat template raises a number to the power {right}, past the limit of {MAX_EXPONENT}",
                "fix or replace the model's chat template",
            )
        elif operator == "+" and _size(left) and _size(right):
            budget.check_size(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            _check_format_widths(budget, left)
            arguments = right.values() if isinstance(right, dict) else right if isinstance(right, tuple) else (right,)
            budget.check_size(len(left) + sum(len(str(a)) for a in arguments))
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox hands templates its own function for a string's format method, at attribute
        # access; its format string is checked before it runs.
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format_widths(_budget(), text)
            return wrapped(*args, **kwargs)

        checked.__name__ = value.__name__
        return checked

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        bound_to = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "a function")
        _check_arguments(budget, name, (bound_to, *args) if isinstance(bound_to, str) else args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.check_size(_size(result))
        return result


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    return _LimitedEnvironment().from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    variables: Mapping[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
    cancel: threading.Event | None = None,
    time_limit_s: float = RENDER_TIME_LIMIT_S,
    max_chars: int = MAX_RENDERED_CHARS,
) -> str:
    """Render a chat template as transformers' apply_chat_template(tokenize=False) does, within limits.

    variables are what the template sees besides the messages: transformers passes the tokenizer's
    special tokens (bos_token, eos_token, ...). Raises TemplateLimitError past a limit, Cancelled
    once cancel is set, and FrankenMoEError for a template that does not compile.
    """
    budget = _Budget(time.monotonic() + time_limit_s, max_chars, time_limit_s, cancel)
    token = _BUDGET.set(budget)
    try:
        try:
            compiled = _compiled(template)
        except TemplateError as exc:
            raise FrankenMoEError(
                f"the chat template does not compile ({exc})", "fix the template or remove it"
            ) from exc
        pieces: list[str] = []
        length = 0
        for piece in compiled.generate(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **(variables or {}),
        ):
            length += len(piece)
            budget.check_size(length, "a prompt")
            budget.check()
            pieces.append(piece)
        return "".join(pieces)
    finally:
        _BUDGET.reset(token)
