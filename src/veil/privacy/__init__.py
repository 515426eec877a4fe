"""Privacy inside the client enclave: vocabulary, detection, mechanisms, sanitizer, accountant.

See docs/privacy.md for the guarantees.
"""

from veil.privacy.accountant import BudgetExceededError, PrivacyAccountant
from veil.privacy.sanitizer import SanitizedPrompt, Sanitizer

__all__ = ["BudgetExceededError", "PrivacyAccountant", "SanitizedPrompt", "Sanitizer"]
