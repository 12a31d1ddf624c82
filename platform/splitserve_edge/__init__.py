"""splitserve_edge: the torch-free device side (preprocessing, entropy coder, payloads)."""
