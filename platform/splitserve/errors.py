"""One exception type per boundary, so callers (CLI, gateway) can turn each into a clear message."""


class SplitserveError(Exception):
    """Base class: anything the user can fix. The CLI prints it as one line; the gateway maps it to 4xx."""


class PayloadError(SplitserveError):
    """A payload is malformed, truncated, corrupted or out of bounds."""


class FingerprintMismatch(PayloadError):
    """A well-formed payload produced by a different encoder/prior than the one being served."""


class BundleError(SplitserveError):
    """A bundle directory is missing, corrupt, or its weights disagree with its manifest."""


class DataError(SplitserveError):
    """A dataset path or annotation file is missing or malformed."""


class PluginError(SplitserveError):
    """A task plugin is unknown, duplicated, or incompatible with the bundle."""
