"""Errors of the client: each message says what to do next."""


class SllmStoreError(Exception):
    """A call to the store daemon failed, or a model cannot be loaded."""
