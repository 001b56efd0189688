"""Errors that several layers raise, kept below all of them so none imports another to raise one."""


class ModelSourceError(ValueError):
    """The model could not be found, fetched or read; the message says what to do about it."""
