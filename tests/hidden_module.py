"""A sitecustomize.py that makes one module unimportable in a subprocess: as if a compiled
extension had not been built (no compiler at install). Put it in a directory on PYTHONPATH."""
from __future__ import annotations


def sitecustomize_hiding(module: str) -> str:
    return f'''\
import sys


class _Hide:
    """As if {module} had not been built (no compiler at install)."""

    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise ImportError("hidden by the test")
        return None


sys.meta_path.insert(0, _Hide())
'''
