"""Errors a user can fix, reported as one line without a traceback."""


class UserError(Exception):
    """A problem with the user's input: the message says what is wrong, where, and how to fix it."""


def one_line(exc: BaseException) -> str:
    """The one-line message of ``exc``. An error raised in a DataLoader worker comes back re-raised by PyTorch as
    ``Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...``: the original message is kept."""
    text = str(exc).strip()
    lines = text.splitlines()
    if "Original Traceback" in text and lines:
        head, sep, rest = lines[-1].partition(": ")
        return rest.strip() if sep and " " not in head else lines[-1].strip()
    return lines[0].strip() if lines else type(exc).__name__
