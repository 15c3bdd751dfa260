"""Errors that mean the user gave bad input; the CLI prints them as one line."""


class LmfleetError(Exception):
    """A problem with what the user asked for (a path, a file, a setting), not a bug."""


class ConfigError(LmfleetError, ValueError):
    """An invalid configuration value; the message names the field."""


class CheckpointError(LmfleetError):
    """A model directory that is missing, incomplete or corrupt."""


class DataError(LmfleetError):
    """A text source or corpus directory that cannot be used."""
