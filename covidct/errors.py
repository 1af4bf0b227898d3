"""User-facing errors.

A ``CovidCTError`` is a user mistake or a bad input file (missing path, corrupt
image, wrong option value). Its message is one line that names the file or
value and says what was expected. The CLI prints it as ``error: <message>``
and exits with status 2, without a traceback. Anything else is a bug and keeps
its traceback.
"""


class CovidCTError(Exception):
    """A user mistake or bad input, reported as one clear line."""


class DataError(CovidCTError, ValueError):
    """An image, split file, CSV or dataset that cannot be used as it is."""
