"""Errors raised while decoding one value of one sample."""


class DecodeError(ValueError):
    """A value (a file's bytes, a text, a number) that cannot be turned into model input.

    The message says what is wrong in words a user can act on; callers add the row and column.
    """
