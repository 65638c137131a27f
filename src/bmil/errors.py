"""Errors that mean "the user gave bmil something it cannot use".

The CLI catches :class:`BmilError` and prints its message as one sentence, exit code 2,
no traceback. Library code raises it (or a subclass) for bad paths, layouts, images,
configuration keys and checkpoints; programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class BmilError(Exception):
    """A user-facing error whose message is one clear sentence."""


class DatasetError(BmilError, ValueError):
    """A dataset root, layout, split file or image is missing or malformed."""


class ConfigError(BmilError, ValueError):
    """An unknown configuration key, a wrong type or an invalid value."""


class CheckpointError(BmilError, ValueError):
    """A checkpoint is missing, corrupt or does not fit the model."""
