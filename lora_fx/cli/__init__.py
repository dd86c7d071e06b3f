"""The ``lorafx`` command line: a thin click layer over the library, one module per command
(``main`` holds the group and the entry point; ``common`` the shared formatting)."""
from .main import cli, main

__all__ = ["cli", "main"]
