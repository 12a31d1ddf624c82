"""The edge→server payload format. Its one implementation lives in :mod:`splitserve_edge.payload`
(torch-free, so devices parse and build payloads without torch); this name is kept for the server."""

from splitserve_edge.payload import *  # noqa: F401,F403
from splitserve_edge.payload import __all__  # noqa: F401
