"""The receipt of a steered request: what ran, on its reply.

Every 200 reply to a steered request (`feature_clamps` or `steering_vectors`, top level or in
`vllm_xargs`, or a steered variant's model id) carries
- `x-steer-digest`: SHA-256 (hex) of the canonical steering, the very form whose digest keys the
  request's prefix-cache salt (`Steering.canonical`: every clamp and vector after validation, sorted,
  values in activation units), `x-steer-clamps` and `x-steer-vectors`: how many clamps and vectors
  ran; on streamed replies too, as headers go out before the first token;
- non-streamed JSON replies also carry `"steering": {"digest", "clamps", "vectors", "canonical"}`, the
  canonical form itself, so a reader sees what ran at which values without the request at hand.
Unsteered replies, and error replies, carry none.
"""

from __future__ import annotations

import json

from steer_plugin.api.reply import Send, header, holding
from steer_plugin.core.spec import Steering

DIGEST_HEADER = b"x-steer-digest"
CLAMPS_HEADER = b"x-steer-clamps"
VECTORS_HEADER = b"x-steer-vectors"
FIELD = "steering"
"""Key of the receipt in a non-streamed JSON reply."""


def receipt(steering: Steering) -> dict:
    """The receipt as the JSON reply carries it."""
    clamps, vectors = steering.counts
    return {"digest": steering.digest, "clamps": clamps, "vectors": vectors, "canonical": json.loads(steering.canonical)}


def with_receipt(send: Send, steering: Steering) -> Send:
    """`send`, wrapped so that a successful reply carries the receipt of `steering`."""
    clamps, vectors = steering.counts
    headers = [(DIGEST_HEADER, steering.digest.encode()), (CLAMPS_HEADER, str(clamps).encode()),
               (VECTORS_HEADER, str(vectors).encode())]

    def is_json(start: dict) -> bool:
        return start["status"] == 200 and header(start, b"content-type").startswith(b"application/json")

    async def add(start: dict, body: bytes) -> bytes:
        reply = json.loads(body)
        if isinstance(reply, dict):
            reply[FIELD] = receipt(steering)
        return json.dumps(reply).encode()

    held = holding(send, is_json, add)

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await held(message)

    return wrapped
