"""The receipt of a steered request: what ran, on its reply.

Every 200 reply to a request with `feature_clamps` (top level or in `vllm_xargs`) carries
- `x-steer-digest`: SHA-256 (hex) of the canonical clamp set, the very form whose digest keys the
  request's prefix-cache salt (`ClampPlan.canonical`: every clamp after validation, sorted, values in
  activation units), and `x-steer-clamps`: how many clamps ran; on streamed replies too, as headers
  go out before the first token;
- non-streamed JSON replies also carry `"steering": {"digest", "clamps", "canonical"}`, the canonical
  form itself, so a reader sees which clamps ran at which values without the request at hand.
Unsteered replies, and error replies, carry none.
"""

from __future__ import annotations

import json

from steer_plugin.api.reply import Send, header, holding
from steer_plugin.core.spec import ClampPlan

DIGEST_HEADER = b"x-steer-digest"
COUNT_HEADER = b"x-steer-clamps"
FIELD = "steering"
"""Key of the receipt in a non-streamed JSON reply."""


def receipt(plan: ClampPlan) -> dict:
    """The receipt as the JSON reply carries it."""
    return {"digest": plan.digest, "clamps": len(plan), "canonical": json.loads(plan.canonical)}


def with_receipt(send: Send, plan: ClampPlan) -> Send:
    """`send`, wrapped so that a successful reply carries the receipt of `plan`."""
    headers = [(DIGEST_HEADER, plan.digest.encode()), (COUNT_HEADER, str(len(plan)).encode())]

    def is_json(start: dict) -> bool:
        return start["status"] == 200 and header(start, b"content-type").startswith(b"application/json")

    async def add(start: dict, body: bytes) -> bytes:
        reply = json.loads(body)
        if isinstance(reply, dict):
            reply[FIELD] = receipt(plan)
        return json.dumps(reply).encode()

    held = holding(send, is_json, add)

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            message = {**message, "headers": [*message.get("headers", []), *headers]}
        await held(message)

    return wrapped
