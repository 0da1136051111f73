"""Errors meant for people: one sentence that says what was wrong and what to do."""


class UserError(Exception):
    """A problem with the user's input or environment. The CLI prints it and exits 2."""


class DataError(UserError):
    """The dataset is missing, malformed or fails validation."""
