"""User-facing errors.

Anything that is the user's to fix (a bad file, a bad flag, a diverged run) is raised
as a :class:`SaelabError`. The CLI prints its message as one line and exits non-zero;
library callers can catch it. Bugs stay ordinary exceptions with tracebacks.
"""


class SaelabError(Exception):
    """An error whose message tells the user what is wrong and how to fix it."""


class InputError(SaelabError):
    """The data or files given to saelab are unusable as they are."""


class TrainingDiverged(SaelabError):
    """The loss became non-finite; the last good checkpoint is kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
