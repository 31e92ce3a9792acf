"""Rewriting a reply on its way out of vLLM's app: the one way the plugin holds and edits a response.

A wrapped ASGI `send` holds a reply it wants until its body is complete, edits it, and sends it as
one body with its length set; every other reply passes through untouched. The middleware uses it
for error messages cut short, /metrics with the workers' series joined, `return_features` and
the steering receipt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from steer_plugin.api.request_body import with_length

Send = Callable[[dict], Awaitable[None]]


async def _send_whole(send: Send, start: dict, body: bytes) -> None:
    """Send a reply the plugin rewrote: its held `http.response.start`, its length set, and `body`."""
    await send({**start, "headers": with_length(start["headers"], len(body))})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def header(start: dict, name: bytes) -> bytes:
    """A response header's value (b"" if absent) from an `http.response.start` message."""
    return next((v for k, v in start.get("headers", []) if k.lower() == name), b"")


def holding(send: Send, wants: Callable[[dict], bool], edit: Callable[[dict, bytes], Awaitable[bytes]]) -> Send:
    """`send`, wrapped: a reply whose start message `wants` accepts is held whole and sent as
    `await edit(start, body)`; other replies pass through as they come."""
    start: dict | None = None
    chunks: list[bytes] = []

    async def wrapped(message: dict) -> None:
        nonlocal start
        if message["type"] == "http.response.start" and wants(message):
            start = message
            return None
        if start is None or message["type"] != "http.response.body":
            return await send(message)
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return None
        await _send_whole(send, start, await edit(start, b"".join(chunks)))

    return wrapped
