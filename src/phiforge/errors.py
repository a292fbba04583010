"""User-facing errors. The CLI prints these as one line and exits non-zero (traceback only with --debug)."""


class PhiforgeError(Exception):
    """A problem with the user's input: a path, a file, a config key, a record."""

    exit_code = 1


class ConfigError(PhiforgeError):
    """Unknown preset or config key, or a value of the wrong type."""


class CheckpointError(PhiforgeError):
    """A checkpoint directory or weight file that is missing, corrupt or does not fit the model."""


class DataError(PhiforgeError):
    """A data directory, shard or record that cannot be used."""
