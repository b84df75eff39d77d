"""Structured problems: what is wrong, where, and how to fix it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Problem:
    field: str
    message: str
    hint: str = ""
    severity: Severity = Severity.ERROR
    line: int | None = None

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    @property
    def text(self) -> str:
        """What a person reads: "Message. Fix: Hint." as sentences, without the field's path."""
        return explain(self.message, self.hint)

    def __str__(self) -> str:
        where = f"{self.field}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{self.severity.value}: {where}: {self.text}"


def sentence(clause: str) -> str:
    """A message or hint (written as a lowercase clause, to fit after a field's name) as a sentence:
    a capital first letter and a full stop."""
    clause = clause.strip()
    if not clause:
        return clause
    clause = clause[0].upper() + clause[1:]
    return clause if clause.endswith((".", "!", "?")) else f"{clause}."


def explain(message: str, hint: str = "") -> str:
    return f"{sentence(message)} Fix: {sentence(hint)}" if hint.strip() else sentence(message)


class FrankenMoEError(Exception):
    """An error a user can act on: a message that names the problem and a hint that names the fix."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ProblemsError(FrankenMoEError):
    """Raised when a list of problems contains at least one error."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        errors = [p for p in self.problems if p.is_error]
        summary = "; ".join(str(p) for p in errors) or "no errors"
        super().__init__(f"{len(errors)} problem(s): {summary}")


def errors_only(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.is_error]


def raise_if_errors(problems: Iterable[Problem]) -> None:
    problems = list(problems)
    if errors_only(problems):
        raise ProblemsError(problems)
