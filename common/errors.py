"""The one exception type fedtide raises for a user's mistake."""


class FedtideError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do.

    The CLI prints it on one line and exits with code 2, never a traceback.
    """
