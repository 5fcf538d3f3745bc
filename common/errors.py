"""The one exception type fedtide raises for a user's mistake."""


class FedtideError(Exception):
    """A problem the user can fix; the message says what was wrong and what to do.

    The CLI prints it on one line and exits with code 2, never a traceback.
    """


def require_opacus() -> None:
    """FedtideError unless Opacus (differential privacy's accountant and per-sample gradients)
    is installed."""
    import importlib.util

    if importlib.util.find_spec("opacus") is None:
        raise FedtideError('--dp needs Opacus for its privacy accountant: pip install "fedtide[dp]"')
