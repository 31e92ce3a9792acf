"""JSON from untrusted clients, read exactly as `json.loads` reads it but with limits that end in a
clear error instead of a crash: nesting depth and integer length.

A value nested thousands deep makes any recursive JSON parser fail with RecursionError (a 500 if
nobody catches it), and an integer with thousands of digits makes Python's int() refuse it with a
ValueError that names no field. Both the request body (`api/request_body.py`) and the JSON-string
form of the steering fields (`spec.py`: `feature_clamps` as a string, at top level or in
`vllm_xargs`) go through `loads`, so both answer with the same limits, naming where in the value
the limit was hit.

`loads(bytes)` decodes like `json.loads(bytes)`, which is what Starlette's `Request.json()` calls:
the encoding (UTF-8, -16 or -32, with or without a byte-order mark) is detected from the first
bytes, whatever the request's headers say.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64
"""Deepest JSON nesting accepted (chat messages with tool calls nest about 8 deep)."""
MAX_INT_DIGITS = 100
"""Longest integer accepted (seeds and token ids have at most 20 digits)."""

_LONG_INT = re.compile(r"\d{%d}" % (MAX_INT_DIGITS + 1))


class LimitError(ValueError):
    """A JSON value over a limit; `path` is where (keys and list indices from the top)."""

    def __init__(self, message: str, path: tuple = ()):
        super().__init__(message)
        self.path = path


class _Huge:
    """An integer literal too long to convert, kept as its digit count until its place is known."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))


def _int(digits: str) -> int | _Huge:
    return _Huge(digits) if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)


def _walk(data: Any):
    """Depth-first (value, path, depth) over containers, iteratively (no recursion to exhaust)."""
    stack = [(data, (), 1)]
    while stack:
        value, path, depth = stack.pop()
        yield value, path, depth
        if isinstance(value, dict):
            stack.extend((v, path + (k,), depth + 1) for k, v in value.items() if isinstance(v, (dict, list, _Huge)))
        elif isinstance(value, list):
            stack.extend((v, path + (i,), depth + 1) for i, v in enumerate(value) if isinstance(v, (dict, list, _Huge)))


def decode(raw: bytes) -> str:
    """Text of a JSON document given as bytes, decoded as `json.loads(bytes)` decodes it.
    Raises UnicodeDecodeError (a ValueError) where json.loads would."""
    return raw.decode(json.detect_encoding(raw), "surrogatepass")


def loads(raw: str | bytes) -> Any:
    """The JSON value of `raw`, as `json.loads(raw)` gives it. Raises LimitError for a value nested
    deeper than MAX_DEPTH or holding an integer longer than MAX_INT_DIGITS, and ValueError
    (json.JSONDecodeError, UnicodeDecodeError) for what is not JSON."""
    text = decode(raw) if isinstance(raw, (bytes, bytearray)) else raw
    long_ints = _LONG_INT.search(text) is not None
    try:
        data = json.loads(text, parse_int=_int) if long_ints else json.loads(text)
    except RecursionError:
        raise LimitError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if long_ints or text.count("[") + text.count("{") > MAX_DEPTH:  # cheap tests first: most values pass
        for value, path, depth in _walk(data):
            if isinstance(value, _Huge):
                raise LimitError(f"a number with {value.digits} digits; at most {MAX_INT_DIGITS} accepted", path)
            if depth > MAX_DEPTH:
                raise LimitError(f"JSON nested deeper than {MAX_DEPTH} levels", path[:2])
    return data


def where(field: str, path: tuple) -> str:
    """`field` followed by a path into its value: feature_clamps[0].feature ("body" for neither)."""
    out = field
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = str(part)  # client text: cut short (control characters are escaped where it is sent)
        key = key if len(key) <= 64 else f"{key[:64]}…({len(key) - 64} more characters)"
        out += f".{key}" if out else key
    return out or "body"
