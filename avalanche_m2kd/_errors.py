"""Errors shared by modules that must not import each other."""


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or applied; the message says why and what to do."""
