"""One exception type per boundary, so callers (CLI, gateway) can turn each into a clear message."""


from splitserve_edge.errors import FingerprintMismatch, PayloadError, SplitserveError

__all__ = ["BundleError", "DataError", "FingerprintMismatch", "PayloadError", "PluginError", "SplitserveError",
           "Stopped", "excerpt"]


def excerpt(text: str, limit: int = 40) -> str:
    """A short, printable, quoted excerpt of client input for error messages (never the whole thing)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return repr(clean + ("…" if len(text) > limit else ""))


class BundleError(SplitserveError):
    """A bundle directory is missing, corrupt, or its weights disagree with its manifest."""


class DataError(SplitserveError):
    """A dataset path or annotation file is missing or malformed."""


class PluginError(SplitserveError):
    """A task plugin is unknown, duplicated, or incompatible with the bundle."""


class Stopped(Exception):
    """A training run stopped by SIGTERM/SIGINT after saving its checkpoint; the command exits
    128 + the signal number (every training command raises it from the one training loop)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
