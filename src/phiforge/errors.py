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


# Where an unexpected error's traceback goes: RUN/errors/ once a command's run directory exists (set by the
# training engine), else a file in the temporary directory. The CLI names the file in its one-line message.
_error_dir = None


def set_error_dir(path) -> None:
    global _error_dir
    _error_dir = path


def error_dir():
    return _error_dir
