from __future__ import annotations

import threading

import pytest

from veil.errors import VeilError
from veil.privacy.accountant import BudgetExceededError, PrivacyAccountant


def test_charges_add_up_per_principal():
    accountant = PrivacyAccountant(10.0)
    accountant.charge("alice", 3.0)
    accountant.charge("alice", 2.5)
    accountant.charge("bob", 1.0)
    assert accountant.remaining("alice") == pytest.approx(4.5)
    assert accountant.remaining("bob") == pytest.approx(9.0)
    assert accountant.remaining("carol") == 10.0


def test_refusal_changes_nothing_and_says_budget_spent_asked():
    accountant = PrivacyAccountant(5.0)
    accountant.charge("alice", 4.0)
    with pytest.raises(BudgetExceededError) as caught:
        accountant.charge("alice", 2.0)
    assert isinstance(caught.value, VeilError)
    message = str(caught.value)
    assert "budget 5" in message and "spent 4" in message and "asked 2" in message
    assert accountant.remaining("alice") == pytest.approx(1.0)
    accountant.charge("alice", 1.0)  # exactly the rest is allowed
    assert accountant.remaining("alice") == 0.0


@pytest.mark.parametrize("epsilon", [-1.0, float("nan")])
def test_rejects_bad_charges(epsilon):
    with pytest.raises(ValueError):
        PrivacyAccountant(1.0).charge("alice", epsilon)


def test_an_unbounded_charge_is_refused_not_recorded():
    accountant = PrivacyAccountant(1e9)
    with pytest.raises(BudgetExceededError):
        accountant.charge("alice", float("inf"))
    assert accountant.spent("alice") == 0.0


@pytest.mark.parametrize("budget", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_budgets(budget):
    with pytest.raises(ValueError):
        PrivacyAccountant(budget)


def test_concurrent_charges_never_exceed_the_budget():
    accountant = PrivacyAccountant(100.0)
    accepted = []

    def spend() -> None:
        for _ in range(100):
            try:
                accountant.charge("alice", 0.5)
                accepted.append(1)
            except BudgetExceededError:
                pass

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 200
    assert accountant.remaining("alice") == 0.0
