"""The one exception type that reaches the user as a single clear line (see cli.main)."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do. The CLI prints it without a traceback."""
