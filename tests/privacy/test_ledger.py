"""The on-disk budget ledger: two processes charging at once lose nothing (defect 5)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from veil.privacy.accountant import BudgetExceededError
from veil.privacy.ledger import FileLedger

CHARGER = """
import sys
from pathlib import Path
from veil.privacy.ledger import FileLedger
from veil.privacy.accountant import BudgetExceededError
ledger, accepted = FileLedger(Path(sys.argv[1]), 60.0), 0
for _ in range(100):
    try:
        ledger.charge("alice", 0.5)
        accepted += 1
    except BudgetExceededError:
        pass
print(accepted)
"""


def test_two_processes_never_lose_a_charge(tmp_path: Path) -> None:
    """Defect 5: two clients read the file, spent, and rewrote it whole: one charge was lost."""
    path = tmp_path / "ledger.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", CHARGER, str(path)], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    accepted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(accepted) == 120  # 60 / 0.5: exactly the budget, across both processes
    assert FileLedger(path, 60.0).spent("alice") == pytest.approx(60.0)


def test_threads_with_their_own_handles(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    accepted: list[int] = []

    def spend() -> None:
        ledger = FileLedger(path, 10.0)
        for _ in range(30):
            try:
                ledger.charge("bob", 1.0)
                accepted.append(1)
            except BudgetExceededError:
                pass

    threads = [threading.Thread(target=spend) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 10 and FileLedger(path, 10.0).remaining("bob") == 0.0


def test_refused_and_unbounded_charges_change_nothing(tmp_path: Path) -> None:
    ledger = FileLedger(tmp_path / "ledger.json", 1.0)
    ledger.charge("carol", 0.75)
    for epsilon in (0.5, float("inf")):
        with pytest.raises(BudgetExceededError):
            ledger.charge("carol", epsilon)
    with pytest.raises(ValueError):
        ledger.charge("carol", -1.0)
    assert ledger.spent("carol") == 0.75
