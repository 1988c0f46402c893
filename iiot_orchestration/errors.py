"""Errors a user can act on: the CLI prints the message and exits non-zero, no traceback."""


class IiotError(Exception):
    """Base of every error whose message is meant for the person running iiot."""
