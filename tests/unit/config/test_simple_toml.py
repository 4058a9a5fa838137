"""read_toml's fast reader (simple_toml) must give exactly tomllib's settings for every text it reads, and leave
every other text to tomllib (None): checked on random texts near the shape it reads, and on that shape itself,
which it must never leave to tomllib. The shipped configuration files are read by the fast reader too."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from interceptd.config.options import read_toml, simple_toml

settings.load_profile(os.environ.get("FUZZ_PROFILE", "ci"))
SCALE = int(os.environ.get("FUZZ_EXAMPLES", "0")) or 1  # make fuzz multiplies every budget
ROOT = Path(__file__).resolve().parents[3]


def by_tomllib(text: str) -> str | None:
    """tomllib's answer as its repr (True and 1 differ there, unlike ==), None when it refuses the text."""
    try:
        return repr(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        return None


_WS = st.sampled_from(["", " ", "\t", "  "])
# Plain pieces the fast reader takes, and near misses it must leave to tomllib.
_KEY = st.sampled_from(["a", "b", "key_1", "x-y", "9", "A"])
_ODD_KEY = st.sampled_from(["a.b", '"q"', "'q'", "", "k y", "é", "a . b", "[t]", "[[t]]"])
_INT = st.integers(-10**18 + 1, 10**18 - 1).map(str)  # up to 18 digits: longer ones are left to tomllib
_ODD_INT = st.sampled_from(["01", "+0", "-0", "1_000", "0x10", "0o7", "0b1", "1e3", "1.5", "inf", "nan", "--1",
                            "12345678901234567890", "+", "-", "1979-05-27"])
_BOOL = st.sampled_from(["true", "false"])
_ODD_BOOL = st.sampled_from(["True", "FALSE", "yes"])
_TEXT = st.text(alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=("Cc",), exclude_characters='"\\\''),
                                   st.sampled_from("\t\x85")), max_size=8)  # no control characters but tab
_BASIC = _TEXT.map(lambda t: f'"{t}"')
_LITERAL = _TEXT.map(lambda t: f"'{t}'")
_ODD_STRING = st.builds(lambda q, t, end: f"{q}{t}{end}", st.sampled_from(['"', "'", '"""', "'''"]),
                        st.text(alphabet='ab"\\\'#\t\r\x01\x7f\u2028 n', max_size=6),
                        st.sampled_from(['"', "'", '"""', "'''", ""]))
_SCALAR = st.one_of(_INT, _BOOL, _BASIC, _LITERAL)
_ODD_SCALAR = st.one_of(_SCALAR, _ODD_INT, _ODD_BOOL, _ODD_STRING)


def _array(items: st.SearchStrategy[str], seps: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(lambda first, xs, ends: first + "".join(s + x for s, x in xs) + ends[0] + "]" + ends[1],
                     st.sampled_from(["[", "[ ", "[\t"]), st.lists(st.tuples(seps, items), max_size=5),
                     st.tuples(st.sampled_from(["", ",", " , ", " "]), st.sampled_from(["", " "])))


def _line(key: st.SearchStrategy[str], value: st.SearchStrategy[str], tail: st.SearchStrategy[str],
          ) -> st.SearchStrategy[str]:
    return st.builds(lambda w1, k, w2, w3, v, t: f"{w1}{k}{w2}={w3}{v}{t}", _WS, key, _WS, _WS, value, tail)


_COMMENT = st.builds(lambda w, t: f"{w}#{t}", _WS, st.text(alphabet="ab #\"'\t=[]", max_size=6))
_BLANK = st.one_of(_WS, _COMMENT)
# The shape the fast reader must always read: items between commas, maybe one after the last ([,] is invalid).
_SIMPLE_ARRAY = st.builds(lambda first, items, sep, end: first + sep.join(items) + (end if items else "") + "]",
                          st.sampled_from(["[", "[ ", "[\t"]), st.lists(_SCALAR, max_size=5),
                          st.sampled_from([", ", ",", " , ", ",\t"]), st.sampled_from(["", ",", " , ", " "]))
_SIMPLE_LINE = st.one_of(_line(_KEY, st.one_of(_SCALAR, _SIMPLE_ARRAY), _WS), _BLANK)
_NEAR_MISS = st.one_of(_ODD_INT, _ODD_BOOL, _ODD_STRING)
_ODD_LINE = st.one_of(  # one thing off in an otherwise simple line
    _line(_ODD_KEY, _SCALAR, _WS),
    _line(_KEY, _NEAR_MISS, _WS),
    _line(_KEY, _array(st.one_of(_SCALAR, _NEAR_MISS), st.sampled_from([",", ", ", ",,", "", " ", "\n", ",\n"])), _WS),
    _line(_KEY, st.one_of(_SCALAR, _SIMPLE_ARRAY), _COMMENT.map(" ".__add__)),
    st.sampled_from(["[t]", "[[t]]", "a = {x = 1}", "a = [[1], [2]]", "a = [", "]", "=", "a =", "a = 1 = 2"]))


def _distinct_keys(lines: list[str]) -> bool:
    keys = [line.split("=")[0].strip() for line in lines if "=" in line and not line.lstrip().startswith("#")]
    return len(keys) == len(set(keys))


@settings(max_examples=2000 * SCALE)
@given(st.lists(_SIMPLE_LINE, max_size=4), st.lists(_ODD_LINE, min_size=1, max_size=2), st.integers(0, 4),
       st.sampled_from(["\n", "\n", "\r\n", "\n\n"]), st.booleans())
def test_what_the_fast_reader_reads_is_what_tomllib_reads(lines: list[str], odd: list[str], at: int, newline: str,
                                                          final: bool) -> None:
    """Mostly lines of the common shape, with one or two near misses among them."""
    lines[at:at] = odd
    text = newline.join(lines) + (newline if final else "")
    fast = simple_toml(text)
    if fast is not None:
        assert repr(fast) == by_tomllib(text), text


@settings(max_examples=1000 * SCALE)
@given(st.lists(_SIMPLE_LINE, max_size=6).filter(_distinct_keys), st.booleans())
def test_the_common_shape_never_falls_back(lines: list[str], final: bool) -> None:
    text = "\n".join(lines) + ("\n" if final else "")
    fast = simple_toml(text)
    assert fast is not None, text
    assert repr(fast) == by_tomllib(text), text


@pytest.mark.parametrize("text", [
    "a = 1 # a comment after a value", "a.b = 1", "[table]\na = 1", 'a = "tab\\tescaped"', "a = 1\na = 2",
    "a = [\n  1,\n]", "a = 1.5", "a = 1_000", "a = 0x1f", "a = 1\r\nb = 2", 'a = """x"""', "\ufeffa = 1",
    "a = 1979-05-27", 'a = ["x" "y"]', "a = [,]", "a = [1,,2]", 'a = "x" "y"', "a = 12345678901234567890",
])
def test_the_rest_is_left_to_tomllib(text: str) -> None:
    assert simple_toml(text) is None


@pytest.mark.parametrize("path", sorted((ROOT / "config").rglob("*.toml")), ids=lambda p: p.name)
def test_the_shipped_files_are_read_alike(path: Path) -> None:
    text = path.read_text()
    assert repr(read_toml(str(path))) == by_tomllib(text)
