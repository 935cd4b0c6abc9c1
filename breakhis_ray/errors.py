"""User-facing errors: one clear line saying what went wrong and where."""


class BreakhisError(Exception):
    """An error caused by the user's input (data, config, storage); printed as one line, exit 2."""


class ConfigError(BreakhisError):
    """A configuration key or value is invalid."""


class StorageError(BreakhisError):
    """A URI cannot be reached, read or written."""


class DataError(BreakhisError):
    """Input data does not have the expected shape, names or content."""
