"""User-facing errors: one line, exit code 2, no traceback unless --debug."""

from __future__ import annotations


class CirError(Exception):
    """An error caused by the user's input (file, key or value), reported as one line.

    The message names what is wrong and what is expected. The CLI turns it into exit code 2.
    """

    exit_code = 2
