"""A tiny name -> factory registry, shared by heads, losses, metrics and weightings.

Configs select components by name (as timm's ``create_model`` does). An unknown name fails
with the list of accepted ones, so a typo is caught before training starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from lightning_mtl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions) of one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@HEADS.register("classification")``."""

        def add(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            if isinstance(factory, type):  # the class knows the name configs select it by
                factory.registered_name = name  # type: ignore[attr-defined]
            return factory

        return add

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def get(self, name: str, key: str) -> Callable[..., T]:
        """The factory for ``name``; ``key`` is the config key that held it, for the error."""
        if name not in self._factories:
            raise ConfigError(unknown_name_message(key, name, self.kind, self.names()))
        return self._factories[name]

    def build(self, name: str, key: str, /, *args: object, **kwargs: object) -> T:
        """Create the component ``name``; a wrong keyword argument names ``key`` in the error."""
        factory = self.get(name, key)
        try:
            return factory(*args, **kwargs)
        except TypeError as err:
            if "argument" not in str(err):
                raise
            raise ConfigError(f"{key}: cannot build {self.kind} {name!r}: {err}") from err


def unknown_name_message(key: str, value: object, kind: str, accepted: list[str]) -> str:
    close = difflib.get_close_matches(str(value), accepted, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"{key}={value!r} is not a known {kind}. Accepted values: {', '.join(accepted)}.{hint}"
