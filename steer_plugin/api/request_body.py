"""Reading an untrusted JSON request body before vLLM does: size, nesting and number limits, field
names one typo away from the plugin's, and client text made safe to echo in errors and logs.

Every limit answers with a `BodyError` (HTTP 400 naming the field where one can be named), never a
500: a body nested thousands deep makes JSON parsers recurse until they fail, and an integer with
thousands of digits makes Python's int() refuse it, in vLLM's own parsing as much as in ours.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from steer_plugin.spec import FIELD

RETURN_FEATURES = "return_features"
MAX_BODY_BYTES = 32 * 1024 * 1024
"""Largest request body read (a 128k-token prompt as token ids is about 1 MB)."""
MAX_DEPTH = 64
"""Deepest JSON nesting accepted (chat messages with tool calls nest about 8 deep)."""
MAX_INT_DIGITS = 100
"""Longest integer accepted (seeds and token ids have at most 20 digits)."""
ECHO_CHARS = 120
"""Client text quoted in an error message or log line is cut to this many characters."""
ERROR_CHARS = 600
"""A whole error message (which may quote client text) is cut to this many characters."""

_LONG_INT = re.compile(rb"\d{%d}" % (MAX_INT_DIGITS + 1))
_NEAR_MISSES = {"featureclamps": FIELD, "featureclamp": FIELD, "clamps": FIELD, "featuresclamps": FIELD,
                "returnfeatures": RETURN_FEATURES, "returnfeature": RETURN_FEATURES,
                "returnedfeatures": RETURN_FEATURES}
"""Field names, lower-cased with separators dropped, that mean one of the plugin's fields."""
_READ_AT = {(FIELD, ""), (RETURN_FEATURES, ""), (FIELD, "vllm_xargs.")}
"""Where the plugin reads its fields: (name, place)."""


class BodyError(ValueError):
    """A body the server refuses; `param` names the field (or "body")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    """ASGI headers with `content-length` set to `length` (for a body the plugin rewrote)."""
    return [(k, v) for k, v in headers if k.lower() != b"content-length"] + [(b"content-length", str(length).encode())]


def clip(text: Any, limit: int = ECHO_CHARS) -> str:
    """Client text fit to quote: control characters escaped, cut to `limit` characters."""
    text = str(text)
    cut = text[:limit]
    safe = "".join(c if unicodedata.category(c) != "Cc" else repr(c)[1:-1] for c in cut)
    return safe + (f"…({len(text) - limit} more characters)" if len(text) > limit else "")


class _Huge:
    """An integer literal too long to convert, kept as its digit count until its field is known."""

    def __init__(self, digits: str):
        self.digits = len(digits)


def _int(digits: str) -> int | _Huge:
    return _Huge(digits) if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)


def _where(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{clip(part)}" if out else clip(part))
    return out or "body"


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


def parse(body: bytes) -> Any:
    """The body's JSON value; `NotImplemented` if it is not JSON at all (vLLM answers that itself).
    Raises BodyError for a body over the limits."""
    if len(body) > MAX_BODY_BYTES:
        raise BodyError(f"request body: {len(body)} bytes, at most {MAX_BODY_BYTES} accepted", "body")
    long_ints = _LONG_INT.search(body) is not None
    try:
        data = json.loads(body, parse_int=_int) if long_ints else json.loads(body)
    except RecursionError:
        raise BodyError(f"request body: JSON nested deeper than {MAX_DEPTH} levels", "body") from None
    except ValueError:
        return NotImplemented
    if long_ints or body.count(b"[") + body.count(b"{") > MAX_DEPTH:  # cheap tests first: most bodies pass
        for value, path, depth in _walk(data):
            if isinstance(value, _Huge):
                raise BodyError(f"{_where(path)}: a number with {value.digits} digits; at most "
                                f"{MAX_INT_DIGITS} accepted", _where(path[:1]))
            if depth > MAX_DEPTH:
                raise BodyError(f"{_where(path[:3])}: JSON nested deeper than {MAX_DEPTH} levels", _where(path[:1]))
    return data


def near_miss(data: dict) -> None:
    """Refuse a field name that means one of the plugin's fields but is spelled otherwise (at top level,
    in `vllm_xargs`, or under an `extra_body` sent literally): such a request would run unsteered."""
    places = [("", data)]
    for wrapper in ("vllm_xargs", "extra_body"):
        if isinstance(data.get(wrapper), dict):
            places.append((f"{wrapper}.", data[wrapper]))
    for prefix, fields in places:
        for key in fields:
            wanted = _NEAR_MISSES.get(re.sub(r"[^a-z]", "", str(key).lower()))
            if wanted is None or (key, prefix) in _READ_AT:
                continue
            if key == wanted:
                raise BodyError(f"{prefix}{wanted}: not read there; send {wanted} at the top level of the request "
                                "body (with the openai client: extra_body={...})", wanted)
            raise BodyError(f"{prefix}{clip(key)}: unknown field; did you mean {wanted}?", wanted)
