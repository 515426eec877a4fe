"""The `veil` command line."""
