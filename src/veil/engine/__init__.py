"""Engines: the workloads that move data across the confidential-computing boundary."""
