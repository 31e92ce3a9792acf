"""Reading an untrusted request body the way vLLM will read it, before vLLM does.

One reading, vLLM's own. The plugin must never decide what a body says by a reading of its own: where
two parsers disagree (which `Content-Type` counts, which charset, whether `\u0066eature_clamps` is
`feature_clamps`), a request the plugin saw nothing in would reach vLLM with a field vLLM drops, and
run unsteered with a 200. So a body is read with the very decoders vLLM's routes use, every way a
route may read it:
- JSON: `json.loads(bytes)` (Starlette's `Request.json()`, which FastAPI's request models and vLLM's
  raw routes such as /invocations call), escapes resolved and the encoding detected from the bytes as
  it does (UTF-8/16/32, byte-order marks), whatever the headers say; through `bounded_json` for its
  limits. Every body is read so, on every route, whatever its content type.
- Forms: Starlette's own form parser (`Request.form()`, what FastAPI's form routes call) where the
  content type is a form's.
What the plugin cannot read the way vLLM will is refused with a 400 on every route that takes a body,
never passed on: more than one `Content-Type` header (Starlette reads the first, other stacks the
last), or a `Content-Encoding` (vLLM decodes none, and the plugin would be reading other bytes).
Every limit answers with a `BodyError` (HTTP 400 naming the field where one can be named), never a
500. Also here: field names one typo away from the plugin's, and client text made safe to echo.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from starlette.requests import Request

from steer_plugin.core import bounded_json
from steer_plugin.core.spec import FIELD, VECTOR_FIELD

RETURN_FEATURES = "return_features"
MAX_BODY_BYTES = 32 * 1024 * 1024
"""Largest request body read (a 128k-token prompt as token ids is about 1 MB)."""
ECHO_CHARS = 120
"""Client text quoted in an error message or log line is cut to this many characters."""
ERROR_CHARS = 600
"""A whole error message (which may quote client text) is cut to this many characters."""

_NEAR_MISSES = {"featureclamps": FIELD, "featureclamp": FIELD, "clamps": FIELD, "featuresclamps": FIELD,
                "returnfeatures": RETURN_FEATURES, "returnfeature": RETURN_FEATURES,
                "returnedfeatures": RETURN_FEATURES, "steeringvectors": VECTOR_FIELD,
                "steeringvector": VECTOR_FIELD, "steervectors": VECTOR_FIELD, "controlvectors": VECTOR_FIELD}
"""Field names, lower-cased with separators dropped, that mean one of the plugin's fields."""
_READ_AT = {(FIELD, ""), (RETURN_FEATURES, ""), (FIELD, "vllm_xargs."), (VECTOR_FIELD, ""), (VECTOR_FIELD, "vllm_xargs.")}
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


FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")
"""Content types Starlette parses as forms (`Request.form()`)."""


def _header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k.lower() == name]


def parse(body: bytes) -> Any:
    """The body's JSON value as `Request.json()` reads it; `NotImplemented` if it is not JSON at all
    (vLLM answers that itself). Raises BodyError for a body over the limits."""
    if len(body) > MAX_BODY_BYTES:
        raise BodyError(f"request body: {len(body)} bytes, at most {MAX_BODY_BYTES} accepted", "body")
    try:
        return bounded_json.loads(body)
    except bounded_json.LimitError as e:
        where = bounded_json.where("", e.path)
        raise BodyError(f"{where}: {e}", bounded_json.where("", e.path[:1])) from None
    except ValueError:
        return NotImplemented


async def read(scope, body: bytes) -> tuple[Any, dict | None]:
    """Every reading vLLM may make of a request body: (its JSON value or NotImplemented, its form fields
    by name, or None where the content type is not a form's or the form does not parse: vLLM's form
    routes, with this very parser, refuse that themselves). Raises BodyError for what the plugin
    cannot read as vLLM would, and for a body over the limits."""
    headers = scope["headers"]
    content_types = _header_values(headers, b"content-type")
    if len(content_types) > 1:
        raise BodyError(f"content-type: header given {len(content_types)} times; send one", "content-type")
    encodings = [v for v in _header_values(headers, b"content-encoding") if v.strip().lower() != b"identity"]
    if encodings:
        raise BodyError(f"content-encoding: {clip(encodings[0].decode('latin-1'))} bodies are not read; "
                        "send the body uncompressed", "content-encoding")
    data = parse(body)
    media = content_types[0].split(b";")[0].strip().lower() if content_types else b""
    if media not in FORM_TYPES:
        return data, None

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request({**scope, "type": "http"}, replay).form()
    except Exception:  # noqa: BLE001 (MultiPartException, HTTPException): the same parser refuses it in vLLM
        return data, None
    fields = {name: value for name, value in form.multi_items()}
    await form.close()
    return data, fields


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
