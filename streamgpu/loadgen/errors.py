"""Exceptions of the load generator."""

from __future__ import annotations


class LoadgenError(Exception):
    """A run cannot go on (the CLI prints the message and exits with status 1)."""


class UsageError(LoadgenError):
    """Bad arguments or an unusable endpoint or source (the CLI exits with status 2)."""
