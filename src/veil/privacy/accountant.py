"""Per-principal privacy budgets, charged by sequential composition (epsilons add up).

The accountant is policy apart from the mechanism: the sanitizer says what a prompt costs
(`Sanitizer.privacy_map`), the accountant decides whether the principal may still spend it. A charge
that would exceed the budget is refused before any state changes, so the caller can refuse to send the
prompt at all.
"""

from __future__ import annotations

import math
import threading

from veil.errors import VeilError


class BudgetExceededError(VeilError):
    """A charge would take a principal past its privacy budget; nothing was charged."""

    def __init__(self, principal: str, *, budget: float, spent: float, asked: float) -> None:
        super().__init__(
            f"privacy budget exceeded for {principal!r}: budget {budget:g}, spent {spent:g}, asked {asked:g}"
        )
        self.principal, self.budget, self.spent, self.asked = principal, budget, spent, asked


class PrivacyAccountant:
    """Thread-safe ledger of the epsilon each principal has spent against one common budget."""

    def __init__(self, budget: float) -> None:
        if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
            raise ValueError(f"budget must be a non-negative finite number, got {budget!r}")
        self.budget = float(budget)
        self._spent: dict[str, float] = {}
        self._lock = threading.Lock()

    def charge(self, principal: str, epsilon: float) -> None:
        """Add `epsilon` to `principal`'s spending.

        Raises:
            ValueError: epsilon is negative or NaN.
            BudgetExceededError: the charge would exceed the budget, or is infinite (a mechanism with
                no DP bound, e.g. TOP_K candidates without opt-in); state unchanged.
        """
        if not (isinstance(epsilon, (int, float)) and not math.isnan(epsilon) and epsilon >= 0):
            raise ValueError(f"epsilon must be a non-negative number, got {epsilon!r}")
        with self._lock:
            spent = self._spent.get(principal, 0.0)
            # A relative tolerance so that charging exactly the remaining budget is never refused.
            if spent + epsilon > self.budget * (1 + 1e-12) + 1e-12:
                raise BudgetExceededError(principal, budget=self.budget, spent=spent, asked=float(epsilon))
            self._spent[principal] = spent + float(epsilon)

    def spent(self, principal: str) -> float:
        with self._lock:
            return self._spent.get(principal, 0.0)

    def remaining(self, principal: str) -> float:
        with self._lock:
            return max(self.budget - self._spent.get(principal, 0.0), 0.0)
