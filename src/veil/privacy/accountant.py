"""Per-principal privacy budgets, charged by sequential composition (epsilons add up).

The accountant is policy apart from the mechanism: the sanitizer says what a prompt costs
(`Sanitizer.privacy_map`), the accountant decides whether the principal may still spend it. A charge
that would exceed the budget is refused before any state changes, so the caller can refuse to send the
prompt at all.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

from veil.errors import VeilError


class BudgetExceededError(VeilError):
    """A charge would take a principal past its privacy budget; nothing was charged."""

    def __init__(self, principal: str, *, budget: float, spent: float, asked: float) -> None:
        super().__init__(
            f"privacy budget exceeded for {principal!r}: budget {budget:g}, spent {spent:g}, asked {asked:g}"
        )
        self.principal, self.budget, self.spent, self.asked = principal, budget, spent, asked


class Accountant(Protocol):
    """What a client charges before it sends a prompt: in memory (`PrivacyAccountant`) or on disk,
    shared by processes (`veil.privacy.ledger.FileLedger`)."""

    def charge(self, principal: str, epsilon: float) -> None: ...


def check_charge(principal: str, *, budget: float, spent: float, epsilon: float) -> float:
    """The new spending if `principal` may spend `epsilon` more, else `BudgetExceededError` (pure).

    Raises:
        ValueError: epsilon is negative or NaN.
        BudgetExceededError: the charge would exceed the budget, or is infinite (a mechanism with no DP
            bound, e.g. TOP_K candidates without opt-in).
    """
    if not (isinstance(epsilon, (int, float)) and not math.isnan(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
    # A relative tolerance so that charging exactly the remaining budget is never refused.
    if spent + epsilon > budget * (1 + 1e-12) + 1e-12:
        raise BudgetExceededError(principal, budget=budget, spent=spent, asked=float(epsilon))
    return spent + float(epsilon)


def check_budget(budget: float) -> float:
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a non-negative finite number, got {budget!r}")
    return float(budget)


class PrivacyAccountant:
    """Thread-safe ledger of the epsilon each principal has spent against one common budget."""

    def __init__(self, budget: float) -> None:
        self.budget = check_budget(budget)
        self._spent: dict[str, float] = {}
        self._lock = threading.Lock()

    def charge(self, principal: str, epsilon: float) -> None:
        """Add `epsilon` to `principal`'s spending; raises as `check_charge` (state unchanged)."""
        with self._lock:
            spent = self._spent.get(principal, 0.0)
            self._spent[principal] = check_charge(principal, budget=self.budget, spent=spent, epsilon=epsilon)

    def spent(self, principal: str) -> float:
        with self._lock:
            return self._spent.get(principal, 0.0)

    def remaining(self, principal: str) -> float:
        with self._lock:
            return max(self.budget - self._spent.get(principal, 0.0), 0.0)
