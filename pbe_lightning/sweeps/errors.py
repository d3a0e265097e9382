"""The summary's user error: the command prints it as one line, without a traceback."""


class SummaryError(Exception):
    """A user error: one line naming the cause and the fix."""
