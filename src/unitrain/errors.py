"""The one exception type users see: a clear, single-line message, printed by the CLI without a traceback."""


class UnitrainError(Exception):
    """A user-facing error. The message is one line that names the file, row and field where it applies."""
