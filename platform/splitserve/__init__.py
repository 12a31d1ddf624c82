"""splitserve: supervised feature compression for split computing — a tiny edge encoder,
a gateway that decodes once, and task heads that share the decoded feature."""

__version__ = "0.1.0"
