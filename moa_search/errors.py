"""The one base of every error a user can cause (a bad file, flag or folder).

`moa` catches MoaError and prints its message as one line naming the file, field or value;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class MoaError(ValueError):
    """Bad input: the message names the file, field or value and what was expected."""


def check_counts(*flags: tuple[str, int | None]) -> None:
    """Counts given on the command line (items, steps, batch sizes): each >= 1 where given."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise MoaError(f"{flag} must be >= 1, got {value}")


def check(ok: bool, message: str) -> None:
    """A flag's value is out of range: say which flag, what it got and what it takes."""
    if not ok:
        raise MoaError(message)

