"""Exceptions shared across veil's layers."""


class VeilError(Exception):
    """Base class of veil's own errors."""


class UsageError(VeilError, ValueError):
    """Bad input from a user (CLI flag, path, parameter): reported as one line, exit status 2."""
