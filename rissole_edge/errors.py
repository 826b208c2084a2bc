"""Errors the user can act on.

Everything that is the user's input (a file, a flag, a config, a bundle) raises a subclass of
`RissoleError` with a one-line message that says what to do. The CLI prints that line and
exits with code 2; an app embedding the runtime catches `RissoleError`.
"""


class RissoleError(Exception):
    """Bad input or an unusable file; the message is one actionable line."""


class UsageError(RissoleError):
    """An argument or setting out of range."""


class DataError(RissoleError):
    """Training data that is missing, unreadable or unfit for the config."""


class ToolchainMissing(RissoleError):
    """A command needs the `[export]` extra (torch), which is not installed."""
