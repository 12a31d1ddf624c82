"""The REST gateway: parse + verify payloads, decode once per batch, dispatch to task plugins."""

from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
