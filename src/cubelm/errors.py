"""User-facing errors.

A ``CubelmError`` (a ``ValueError``) is a mistake the user can fix (bad flag, missing file, unsupported model). The CLI prints its
message on one line and exits with code 2, never a traceback. Messages say what is wrong and what to do.
"""


class CubelmError(ValueError):
    """An error caused by the user's input; its message is shown as is."""
