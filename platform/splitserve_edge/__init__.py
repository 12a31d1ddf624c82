"""splitserve_edge: the torch-free device side (preprocessing, entropy coder, payloads).

Importing this package loads only numpy, safetensors and constriction; never torch, torchvision
or compressai.
"""

from .coder import CoderError, CodingTables, EntropyCoder

__all__ = ["CoderError", "CodingTables", "EntropyCoder"]
