"""The error type the libraries raise for bad input, so the command line can print one line.

Anything a user can fix (a bad flag, a missing file, a malformed listing line, a corrupt record)
raises ImagenetError with a message that names the file, line or key and says what is wrong.
Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class ImagenetError(Exception):
    """A user-facing error: the message alone must tell what is wrong and where."""
