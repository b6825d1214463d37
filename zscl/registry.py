"""A small name -> object registry, the pattern timm's ``@register_model`` uses.

Datasets, merge rules and averaging callbacks register here; tests parametrize over each
registry so that a new entry is tested automatically. Lookups are case-insensitive and an
unknown name raises :class:`RegistryError` listing what exists and the closest matches.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar, overload

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown or duplicate registry name. ``str(err)`` is a full sentence."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps canonical names to objects; ``kind`` names the registry in error messages."""

    def __init__(self, kind: str, loader: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._canonical: dict[str, str] = {}
        # ``loader`` imports the modules holding the built-in entries, on first use only,
        # so that importing a registry has no side effects.
        self._loader = loader
        self._loaded = loader is None

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            assert self._loader is not None
            self._loaded = True  # set first: the loader registers entries, which calls back here
            try:
                self._loader()
            except BaseException:
                self._loaded = False  # a failed import is retried (and re-raised) on the next lookup
                raise

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    @overload
    def register(self, name: str, obj: None = None, *, overwrite: bool = False) -> Callable[[T], T]: ...

    def register(self, name, obj=None, *, overwrite=False):
        """Register ``obj`` under ``name``; without ``obj`` this is a decorator."""
        if obj is None:
            return lambda o: self.register(name, o, overwrite=overwrite)
        key = name.lower()
        if key in self._canonical and not overwrite:
            raise RegistryError(f"{self.kind} {name!r} is already registered; pass overwrite=True to replace it")
        if key in self._canonical:
            del self._items[self._canonical[key]]
        self._canonical[key] = name
        self._items[name] = obj
        return obj

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (lookup is case-insensitive)."""
        self._ensure_loaded()
        key = name.lower()
        if key not in self._canonical:
            close = difflib.get_close_matches(key, list(self._canonical), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(self._canonical[c] for c in close)}?" if close else ""
            raise RegistryError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}")
        return self._canonical[key]

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        self._ensure_loaded()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        self._ensure_loaded()
        return iter(list(self._items.items()))

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return isinstance(name, str) and name.lower() in self._canonical

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._items)
