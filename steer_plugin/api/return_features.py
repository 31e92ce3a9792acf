"""`"return_features": k` (or `{"top_k": k, "sae": ID}`) on /v1/chat/completions and /v1/completions:
the top-k features of one SAE at every generated token, returned with the reply.

The request gets a `steer_record_features` entry (scope "generation"); the worker records the
features of the positions that produce generated tokens, and when the reply is complete they are
fetched (`FeatureService.generated_features`) and added to it:
- non-streaming: as `choices[0].features` (the JSON reply is held back until complete, since its
  length changes);
- streaming: as one extra server-sent event `{"object": "steer.features", "choices": [],
  "features": [...]}` just before the `data: [DONE]` event (like a usage chunk). The stream is read
  as events, not searched for bytes, so no reply text can break the framing.
Entry i belongs to generated token i; ask for logprobs to see the tokens.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from steer_plugin.api.admission import new_recording_key
from steer_plugin.api.reply import Send, header, holding
from steer_plugin.core.spec import MAX_TOP_K, FeatureRecording, Limits, RecordingError

FIELD = "return_features"
"""Request field: top-k SAE features per generated token, returned with the reply."""

class ReturnFeatures(BaseModel):
    """The object form of `return_features`; the integer form `k` means {"top_k": k}."""

    model_config = ConfigDict(extra="forbid")
    top_k: Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K)]
    """Features reported per generated token, strongest first."""
    sae: Annotated[str, Field(strict=True, min_length=1, max_length=64)] | None = None
    """Whose features (an SAE id, see /v1/saes); default: the first SAE."""


def requested_recording(data: dict, service, limits: Callable[[], Limits]) -> FeatureRecording | None:
    """The recording a request body's `return_features` asks for (the field is removed from `data`).
    service: the app's FeatureService (None when the feature routes are not loaded); limits: the
    server's SAEs (read on first need)."""
    raw = data.pop(FIELD, None)
    if raw is None:
        return None
    if type(raw) is int:
        raw = {"top_k": raw}
    if not isinstance(raw, dict):
        raise RecordingError(f"{FIELD}: must be an integer from 1 to {MAX_TOP_K} or an object "
                             f'{{"top_k": k, "sae": ID}}, got {type(raw).__name__}')
    try:
        asked = ReturnFeatures.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(part) for part in (FIELD, *first["loc"]))
        raise RecordingError(f"{where}: {first['msg']}") from None
    if data.get("n", 1) not in (1, None) or data.get("use_beam_search"):
        raise RecordingError(f"{FIELD}: needs a single choice (n=1, no beam search)")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
        raise RecordingError(f"{FIELD}: needs a single prompt (one choice); send the prompts one by one")
    if service is None:
        raise RecordingError(f"{FIELD}: the steer_features endpoint plugin is not loaded "
                             "(VLLM_PLUGINS must name it; server.py does)")
    served = limits()
    sae = served.ids[served.index(asked.sae, f"{FIELD}.sae", RecordingError)]
    return FeatureRecording(key=new_recording_key(), sae=sae, top_k=asked.top_k, scope="generation")


def _sse_data(event: bytes) -> bytes | None:
    """The data of one server-sent event (its `data:` lines joined), None if it has none."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class FeatureAppender:
    """Wraps the ASGI `send` of one request that asked for `return_features`."""

    def __init__(self, send: Send, fetch: Callable[[str], Awaitable[list[dict]]], key: str):
        self._send = send
        self._fetch = fetch  # key -> features of the generated tokens (fetching removes them)
        self._recording_key = key
        self._fetched = False
        self._key: str | None = key  # None once the features went out, or for an error reply
        self._streaming = False
        self._buffer = b""  # streaming: bytes of an event not yet complete
        # non-streaming: the JSON reply is held back until complete, its length changing
        self._held = holding(send, lambda start: self._key is not None and not self._streaming, self._joined)

    async def _features(self) -> list[dict]:
        self._fetched = True
        return await self._fetch(self._recording_key)

    async def discard(self) -> None:
        """Drop the worker's records of a reply that never took them (client gone, error reply)."""
        if not self._fetched:
            await self._features()

    async def _joined(self, start: dict, body: bytes) -> bytes:
        reply = json.loads(body)
        reply["choices"][0]["features"] = await self._features()
        return json.dumps(reply).encode()

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            if message["status"] != 200:
                self._key = None  # an error reply passes through untouched
            elif header(message, b"content-type").startswith(b"text/event-stream"):
                self._streaming = True
        elif message["type"] == "http.response.body" and self._streaming and self._key is not None:
            return await self._stream(message)
        await self._held(message)

    async def _stream(self, message: dict) -> None:
        """Pass complete events on as they come; put the features event before `[DONE]`."""
        self._buffer += message.get("body", b"").replace(b"\r\n", b"\n")
        more = message.get("more_body", False)
        out = b""
        while self._key is not None and b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            if _sse_data(event) == b"[DONE]":
                features = {"object": "steer.features", "choices": [], "features": await self._features()}
                out += b"data: " + json.dumps(features).encode() + b"\n\n"
                self._key = None
            out += event + b"\n\n"
        if self._key is None or not more:  # after [DONE] (or at the end) nothing is held back
            out, self._buffer = out + self._buffer, b""
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
