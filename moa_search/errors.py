"""The one base of every error a user can cause (a bad file, flag or folder).

`moa` catches MoaError and prints its message as one line naming the file, field or value;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class MoaError(ValueError):
    """Bad input: the message names the file, field or value and what was expected."""
