"""Typed errors that users can cause, with messages a site admin understands.

Every error names *where* the problem is (file, line, key) and *how to fix it*.
A raw traceback reaching a user is a bug; these exceptions are the contract.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _rebuild(cls: type[FedtuneError], args: tuple[Any, ...], kwargs: dict[str, Any]) -> FedtuneError:
    return cls(*args, **kwargs)


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose.

    Subclasses keep the arguments they were built with, so an error raised in a worker process
    reaches its parent intact (``pickle`` calls ``__init__`` again with them).
    """

    _init: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the constructor's arguments."""
        args, kwargs = self._init if self._init != ((), {}) else (self.args, {})
        return _rebuild, (type(self), args, kwargs)


class ConfigError(FedtuneError):
    """A policy file, run config or node config is invalid.

    Collects every problem so the user can fix them all at once.
    """

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self._init = ((source, list(problems)), {})
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class DataError(FedtuneError):
    """Site data is unreadable or malformed (message names file:line and the fix)."""

    def __init__(self, path: str, line: int | None, problem: str, fix: str) -> None:
        self._init = ((path, line, problem, fix), {})
        self.path = path
        self.line = line
        self.problem = problem
        self.fix = fix
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class BudgetExceededError(FedtuneError):
    """A round would take the site's cumulative epsilon past its budget."""

    def __init__(self, *, budget: float, spent: float, requested: float, delta: float) -> None:
        self._init = ((), {"budget": budget, "spent": spent, "requested": requested, "delta": delta})
        self.budget = budget
        self.spent = spent
        self.requested = requested
        self.delta = delta
        super().__init__(
            f"privacy budget exhausted: this round would bring epsilon to {requested:.4f} "
            f"(already spent {spent:.4f}) but the site policy allows max-epsilon={budget:g} "
            f"at delta={delta:g}. The site refuses to train; raise max-epsilon in the site "
            "policy only if the site's privacy office approves."
        )


class PolicyViolationError(FedtuneError):
    """The coordinator requested training that the site policy forbids."""


class UpdateRejectedError(FedtuneError):
    """A site's reply failed validation at the coordinator."""
