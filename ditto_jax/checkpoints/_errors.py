"""The one error type of the checkpoint store."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A model source cannot be found, recognised, fetched or read; the message is one line naming the path,
    file, tensor or field (the CLI prints it as ``error: ...``)."""
