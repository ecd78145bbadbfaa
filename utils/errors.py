"""Errors a user can fix, reported as one line without a traceback."""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong, where, and how to fix it."""
