"""Run a function right after a module is imported (now, if it already is).

``import hf_memopt`` stays cheap (the ``hf-memopt`` command answers ``--help`` without loading torch), yet the stock
``optim="galore_*"`` names must point at hf_memopt before any ``Trainer`` builds an optimizer: the rerouting is hooked
to the import of ``transformers.trainer`` (the same idea as ``wrapt``'s post-import hooks, PEP 369).
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["call_after_import"]


def call_after_import(name: str, function: Callable[[], None]) -> None:
    """Call ``function()`` once ``name`` has been imported: now if it is loaded, else right after its import ends."""
    module = sys.modules.get(name)
    if module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False):
        function()
        return
    sys.meta_path.insert(0, _Finder(name, function))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the finders after it and wraps the loader, so ``function`` runs after the module body."""

    def __init__(self, name: str, function: Callable[[], None]):
        self.name, self.function = name, function

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the finders below locate the module as usual
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, self.function)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any, function: Callable[[], None]):
        self._loader, self._function = loader, function

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader  # inspect, pkgutil and tracebacks see the real loader
        self._loader.exec_module(module)
        self._function()

    def __getattr__(self, attribute: str) -> Any:  # get_source, get_filename ... of the real loader
        return getattr(self._loader, attribute)
