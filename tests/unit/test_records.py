"""`record` behaves as `@dataclass(frozen=True)` does for the value classes that use it."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass

import pytest

from interceptd.records import FrozenRecordError, record, replace


@record
class Point:
    x: int
    y: int = 0
    label: str = ""

    def moved(self) -> Point:
        return replace(self, x=self.x + 1)


@record
class Other:
    x: int
    y: int = 0
    label: str = ""


@record
class Empty:
    pass


@record(order=True)
class Span:
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Twin:
    x: int
    y: int = 0
    label: str = ""


def test_construction_repr_and_equality_match_a_frozen_dataclass() -> None:
    for args, kwargs in (((1,), {}), ((1, 2), {"label": "a"}), ((), {"x": 3, "label": "b"})):
        p, t = Point(*args, **kwargs), Twin(*args, **kwargs)
        assert repr(p).replace("Point", "Twin") == repr(t)
        assert (p.x, p.y, p.label) == (t.x, t.y, t.label)
        assert p == Point(*args, **kwargs) and hash(p) == hash(Point(*args, **kwargs))
    assert Point(1) != Point(2) and Point(1) != Other(1) and Point(1) != (1, 0, "")
    assert Empty() == Empty() and len({Empty(), Empty()}) == 1


@pytest.mark.parametrize("call", [lambda: Point(), lambda: Point(1, 2, "a", 4), lambda: Point(1, x=2),
                                  lambda: Point(1, z=2)])
def test_wrong_arguments_are_refused(call: object) -> None:
    with pytest.raises(TypeError):
        call()  # type: ignore[operator]


def test_fields_are_frozen() -> None:
    p = Point(1)
    with pytest.raises(FrozenRecordError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x  # type: ignore[misc]


def test_order_replace_match_copy_and_pickle() -> None:
    assert sorted([Span(3, 4), Span(1, 9), Span(1, 2)]) == [Span(1, 2), Span(1, 9), Span(3, 4)]
    assert Span(1, 2) <= Span(1, 2) < Span(2, 0) and Span(5, 5) >= Span(5, 4) > Span(1, 1)
    assert str(Span(1, 2)) == "1-2"  # the class's own methods are kept
    assert Point(1, 2).moved() == Point(2, 2) and replace(Point(1), label="z") == Point(1, 0, "z")
    match Point(4, 5):
        case Point(x, y):
            assert (x, y) == (4, 5)
    assert copy.deepcopy(Point(1, 2)) == Point(1, 2)
    assert pickle.loads(pickle.dumps(Span(1, 2))) == Span(1, 2)


def test_a_mutable_default_is_refused() -> None:
    with pytest.raises(TypeError, match="mutable default"):
        @record
        class Bad:
            items: list[int] = []  # noqa: RUF012
