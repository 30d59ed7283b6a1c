"""Errors a user can cause and fix: the command line prints their message, never a traceback."""


class UserError(Exception):
    """A problem with the user's input (file, record, field, config); the message names where."""
