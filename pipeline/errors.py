"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a config field, a file, an argument).

    The message must name the offending field path or file and fit on one line; the CLI prints
    ``error: <message>`` and exits with status 2. Raise it before anything is written.
    """
