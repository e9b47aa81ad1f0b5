"""Stands in for pip inside the sandbox, which has no network: see ``jupybox_pip``."""
