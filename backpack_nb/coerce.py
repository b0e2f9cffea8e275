"""Values as the configuration's types: YAML, the command line and papermill all hand over
text (``"1e-3"``, ``"true"``, ``"50_000"``), numbers and lists; :func:`coerce` turns one into
a field's type (bool, int, float, str, list[str], ``X | None``) or raises ValueError saying
what was expected and what came."""

from __future__ import annotations

import math
import typing
from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


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
        # 5e4 or "50_000" read as text/float still mean a whole number of iterations
        number = value
        if isinstance(value, str):
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
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {describe(value)}")
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
