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

    def __str__(self) -> str:
        where = f"{self.field}" + (f" (line {self.line})" if self.line is not None else "")
        text = f"{self.severity.value}: {where}: {self.message}"
        return f"{text} Fix: {self.hint}" if self.hint else text


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
