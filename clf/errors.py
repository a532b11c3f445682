"""Errors the library raises for the jobs to turn into one-line messages."""


class ClfError(Exception):
    """Base class: a problem the user can fix, reported as one line."""


class UsageError(ClfError):
    """A bad flag, config value or input path. Jobs exit with code 2."""


class ModelLoadError(UsageError):
    """Pretrained weights or an artifact that do not fit what was asked for."""


class StorageError(ClfError):
    """A permanent storage failure (missing object, access denied), naming the URI."""


class TransientStorageError(StorageError):
    """An object-store failure that outlived the client's retries (throttling, resets): worth
    retrying the whole task, never worth recording as an input's answer."""
