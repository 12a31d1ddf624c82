"""The errors the device side can raise; :mod:`splitserve.errors` builds the server's on them, so
one class means one thing on both ends (the gateway maps ``PayloadError`` to 400)."""


class SplitserveError(Exception):
    """Base class: anything the user can fix. The CLI prints it as one line; the gateway maps it to 4xx."""


class PayloadError(SplitserveError):
    """A payload is malformed, truncated, corrupted or out of bounds."""


class FingerprintMismatch(PayloadError):
    """A well-formed payload produced by a different encoder/prior than the one being served."""
