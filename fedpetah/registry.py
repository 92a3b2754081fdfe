"""A small named registry: one instance per extension kind (backbones, adapters, tasks, ...)."""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps lower-case unique names to objects; unknown names fail with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form: ``@REGISTRY.register("name")``. A registered class gets the name as ``cls.name``
        (written only here: a class that sets its own ``name`` is refused)."""

        def add(item: T) -> T:
            if isinstance(item, type) and "name" in vars(item):
                raise ValueError(f"{item.__name__} sets its own name; {self.kind} names come from register()")
            self.add(name, item)
            if isinstance(item, type):
                setattr(item, "name", name)  # noqa: B010 (the class declares name: ClassVar[str])
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name != name.lower() or not name:
            raise ValueError(f"{self.kind} names must be non-empty and lower-case, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def type_argument(cls: type, bound: type[Any]) -> type[Any] | None:
    """The class that ``cls`` passes to a generic base for a parameter bounded by ``bound``: ``C`` in
    ``class X(Base[C])``, or the bound of the type variable in ``class X(Base[V])``; None when ``cls`` names none.
    """
    for base in vars(cls).get("__orig_bases__", ()):
        for arg in typing.get_args(base):
            arg = getattr(arg, "__bound__", None) if isinstance(arg, TypeVar) else arg
            if isinstance(arg, type) and issubclass(arg, bound):
                return arg
    return None
