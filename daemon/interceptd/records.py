"""Frozen records: what `@dataclass(frozen=True)` gives a value class, without its start-up cost.

An init container's `istio-iptables` and a CNI ADD are whole processes, and every class they define is paid
at each start: `@dataclass(frozen=True)` compiles six methods per class from source text (about 0.4 ms a
class, 12 ms for the 30 value classes `apply` defines) and its import pulls in `inspect` (7 ms). `record`
gives a class the same behaviour from functions shared by every record, compiled once with this module:
`__init__` taking the fields positionally or by keyword (class attributes are the defaults), `__repr__`,
`__eq__` and `__hash__` over the fields in order (equal only to the same class), frozen fields,
`__match_args__`, and with `order=True` the comparisons. mypy checks records as frozen dataclasses
(`dataclass_transform`). Methods the class defines itself are kept.
"""

from __future__ import annotations

from operator import attrgetter

TYPE_CHECKING = False  # typing is for mypy only: see docs/architecture.md
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform, overload

    T = TypeVar("T")
_MISSING = object()


class FrozenRecordError(AttributeError):
    """A record's fields cannot be assigned or deleted (use `replace`)."""


def _values_of(fields: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    if len(fields) > 1:
        return attrgetter(*fields)
    return lambda obj: tuple(getattr(obj, name) for name in fields)


def _methods(cls: type, order: bool) -> dict[str, Any]:
    name = cls.__name__
    # Not inspect.get_annotations: importing inspect is the cost this module avoids.
    fields = tuple(cls.__dict__.get("__annotations__", {}))  # noqa: RUF063
    defaults = {f: cls.__dict__[f] for f in fields if f in cls.__dict__}
    for field, default in defaults.items():
        if isinstance(default, list | dict | set):
            raise TypeError(f"{name}.{field}: a mutable default would be shared by every instance")
    values = _values_of(fields)
    set_field = object.__setattr__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(fields):
            raise TypeError(f"{name}() takes {len(fields)} arguments, {len(args)} were given")
        for field, value in zip(fields, args, strict=False):
            set_field(self, field, value)
        for field in fields[len(args):]:
            value = kwargs.pop(field, defaults.get(field, _MISSING))
            if value is _MISSING:
                raise TypeError(f"{name}() is missing the argument {field!r}")
            set_field(self, field, value)
        if kwargs:
            raise TypeError(f"{name}() got unexpected or repeated arguments: {', '.join(kwargs)}")

    def __repr__(self: Any) -> str:
        return f"{type(self).__qualname__}({', '.join(f'{f}={getattr(self, f)!r}' for f in fields)})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(values(self) == values(other))

    def __hash__(self: Any) -> int:
        return hash(values(self))

    def __setattr__(self: Any, field: str, value: object) -> None:
        raise FrozenRecordError(f"cannot assign to field {field!r} of {name}")

    def __delattr__(self: Any, field: str) -> None:
        raise FrozenRecordError(f"cannot delete field {field!r} of {name}")

    methods: dict[str, Any] = {"__init__": __init__, "__repr__": __repr__, "__eq__": __eq__, "__hash__": __hash__,
                               "__setattr__": __setattr__, "__delattr__": __delattr__, "__match_args__": fields,
                               "__record_fields__": fields}
    if order:
        for dunder, compare in (("__lt__", tuple.__lt__), ("__le__", tuple.__le__), ("__gt__", tuple.__gt__),
                                ("__ge__", tuple.__ge__)):
            methods[dunder] = _comparison(values, compare)
    return methods


def _comparison(values: Callable[[Any], tuple[Any, ...]], compare: Callable[[tuple[Any, ...], tuple[Any, ...]], bool],
                ) -> Callable[[Any, object], Any]:
    def method(self: Any, other: object) -> Any:  # a bool, or NotImplemented for another class
        if other.__class__ is not self.__class__:
            return NotImplemented
        return bool(compare(values(self), values(other)))
    return method


def _record(cls: type[T] | None = None, /, *, order: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """`@record` or `@record(order=True)` on a class whose annotated attributes are its fields."""
    def wrap(cls: type[T]) -> type[T]:
        for attr, method in _methods(cls, order).items():
            if attr not in cls.__dict__ or (attr == "__hash__" and cls.__dict__[attr] is None):
                setattr(cls, attr, method)
        return cls
    return wrap if cls is None else wrap(cls)


if TYPE_CHECKING:  # how mypy sees `record`: both spellings, and what it makes of the class
    @overload
    def record(cls: type[T], /) -> type[T]: ...

    @overload
    def record(*, order: bool = False) -> Callable[[type[T]], type[T]]: ...

    @dataclass_transform(frozen_default=True)
    def record(cls: type[T] | None = None, /, *, order: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
        return _record(cls, order=order)
else:
    record = _record


def replace(obj: T, **changes: Any) -> T:
    """A copy of the record with some fields changed (dataclasses.replace)."""
    fields: tuple[str, ...] = getattr(obj, "__record_fields__")  # noqa: B009 (T is any record)
    return type(obj)(**{f: changes.pop(f) if f in changes else getattr(obj, f) for f in fields}, **changes)
