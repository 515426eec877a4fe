"""CMIF: split inference with a differentially-private prompt sanitizer (see docs/privacy.md)."""

from veil.cmif.accountant import BudgetExceededError, PrivacyAccountant
from veil.cmif.sanitizer import SanitizedPrompt, Sanitizer

__all__ = ["BudgetExceededError", "PrivacyAccountant", "SanitizedPrompt", "Sanitizer"]
