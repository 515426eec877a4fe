"""A privacy-budget ledger on disk that several processes charge safely.

Contract: `charge` takes an exclusive `fcntl.flock` on a lock file beside the ledger, reads the spending,
decides with `check_charge` (the same rule as the in-memory accountant), writes the new spending to a
temporary file and renames it over the ledger, then releases the lock. Two processes charging at once
are serialized: neither charge is lost, and together they never exceed the budget. A refused charge
changes nothing. Call `charge` before the prompt is sent (charge-before-send): a charge stands even if
the server then fails, since the sanitized prompt may have reached it. POSIX only (fcntl).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from veil.privacy.accountant import check_budget, check_charge


class FileLedger:
    """Epsilon spent per principal in a JSON file, against one budget."""

    def __init__(self, path: Path, budget: float) -> None:
        self.path = path
        self.budget = check_budget(budget)
        self._lock_path = path.with_name(path.name + ".lock")

    def charge(self, principal: str, epsilon: float) -> None:
        """Add `epsilon` to `principal`'s spending, or raise `BudgetExceededError` / `ValueError`."""
        with self._locked(fcntl.LOCK_EX):
            spent = self._read()
            spent[principal] = check_charge(
                principal, budget=self.budget, spent=spent.get(principal, 0.0), epsilon=epsilon
            )
            tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(spent))
            os.replace(tmp, self.path)

    def spent(self, principal: str) -> float:
        with self._locked(fcntl.LOCK_SH):
            return self._read().get(principal, 0.0)

    def remaining(self, principal: str) -> float:
        return max(self.budget - self.spent(principal), 0.0)

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _read(self) -> dict[str, float]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        if not isinstance(raw, dict) or not all(isinstance(v, (int, float)) for v in raw.values()):
            raise ValueError(f"{self.path} is not a budget ledger")
        return {str(k): float(v) for k, v in raw.items()}
