"""Values as the configuration's types: YAML, the command line and papermill all hand over
text (``"1e-3"``, ``"true"``, ``"50_000"``), numbers and lists; :func:`coerce` turns one into
a field's type (bool, int, float, str, list[str], ``X | None``) or raises ValueError saying
what was expected and what came. :func:`documented` declares a setting with its help text."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from typing import Any, Callable

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}

# The most characters of a value an error message echoes: enough to recognise it, short
# enough that a pasted essay or a million-item list still gives a one-line error.
BRIEF_CHARS = 200
# reprlib bounds the work as well as the text: it never builds the whole repr of a huge value.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = BRIEF_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 10
_REPR.maxlevel = 3


def documented(default: Any = dataclasses.MISSING, doc: str = "", *,
               factory: Callable[[], Any] | None = None, kw_only: bool = False) -> Any:
    """A dataclass field with its help text as metadata (``--help``, the docs read it there):
    ``name: int = documented(512, "Longest context in tokens.")``; ``factory`` for a mutable
    default (``documented(factory=list, doc=...)``)."""
    meta = {"help": " ".join(doc.split())}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta, kw_only=kw_only)
    return dataclasses.field(default=default, metadata=meta, kw_only=kw_only)


def field_help(cls: type) -> dict[str, str]:
    """Each field of the dataclass ``cls`` -> its help text (empty where it has none)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def brief(value: Any, limit: int = BRIEF_CHARS, *, quote: bool = True) -> str:
    """``repr(value)`` (or, with ``quote=False``, the text itself) cut to about ``limit``
    characters, saying how long a cut text was: what error messages echo of a value."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value) if quote else value
        head = value[:limit]
        return f"{repr(head) if quote else head}... ({len(value):,} characters)"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's str() digit limit
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= limit else text[:limit] + "..."


def describe(value: Any) -> str:
    """A value as a type error shows it: ``'lots' (str)``, cut short if long."""
    return f"{brief(value)} ({type(value).__name__})"


def coerce(value: Any, typ: Any) -> Any:
    """``value`` as ``typ`` (bool, int, float, str, list[str], int | None) or ValueError."""
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X]; for a switch (bool | None), None is "auto"
        (inner,) = [a for a in args if a is not type(None)]
        nulls = {"none", "null", ""} | ({"auto"} if inner is bool else set())
        if value is None or (isinstance(value, str) and value.strip().lower() in nulls):
            return None
        if inner is bool and not (isinstance(value, bool) or isinstance(value, str)
                                  and value.strip().lower() in _TRUE | _FALSE):
            raise ValueError(f"expected true, false or auto, got {describe(value)}")
        return coerce(value, inner)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"expected true or false, got {describe(value)}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {describe(value)}")
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:  # exactly, digit for digit: through a float, seed 2**53 + 1 would change
                return int(value)
            except ValueError:
                pass
            # 5e4 read as text (YAML 1.1 reads 5e4 so) still means a whole number
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected an integer, got {describe(value)}") from None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError(f"expected an integer, got {describe(value)}")
    if typ is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {describe(value)}")
        number: float | None = None
        try:
            if isinstance(value, (int, float, str)):
                number = float(value)
        except ValueError:  # not a number
            pass
        except OverflowError:  # an int beyond float's range
            number = math.inf
        if number is None:
            raise ValueError(f"expected a number, got {describe(value)}")
        if not math.isfinite(number):
            # inf and nan pass checks such as "> 0" and surface later as a NaN loss
            raise ValueError(f"expected a finite number, got {describe(value)}")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected text, got {describe(value)}")
    if typing.get_origin(typ) is list:
        if isinstance(value, str):
            return [w.strip() for w in value.split(",") if w.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value):
            return [w for w in value if w.strip()]
        raise ValueError(f"expected a list of words or a comma-separated string, got {describe(value)}")
    raise TypeError(f"unsupported config field type {typ!r}")  # a programming error
