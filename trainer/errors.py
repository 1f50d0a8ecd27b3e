"""Errors that the command line turns into one clear line and a non-zero exit (no traceback)."""


class UserError(Exception):
    """Bad usage or bad input (exit code 2): the message says what is wrong and, if it can, what to do."""


class DatasetError(UserError):
    """A data folder or file that cannot be used: missing folder, empty train/good, unreadable image."""


class CapabilityError(Exception):
    """A capability this machine lacks (exit code 3): CUDA asked for but absent, TensorRT missing."""
