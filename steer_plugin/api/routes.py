"""Which of the server's routes steer, by vLLM's route table.

The middleware steers the routes in STEERED (top-level `feature_clamps` and `return_features`, and
`vllm_xargs`). On every other route a body that carries either field, or a near miss of one, is
answered with a 400 naming the field: those routes would drop a top-level field without a word and
run unsteered. The other two sets only document vLLM 0.32's routes, so that a new route that runs
the model is noticed (`unclassified`, logged at start and checked by the tests).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

STEERED = frozenset({"/v1/chat/completions", "/v1/completions"})
ENGINE_REFUSED = frozenset({
    "/v1/chat/completions/batch", "/v1/responses", "/v1/messages", "/invocations", "/generative_scoring",
    "/inference/v1/generate", "/v1/systemone", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank",
    "/v2/embed",
})
"""Routes that run the model without the steering contract: the fields are refused there."""
NO_ENGINE = frozenset({
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/load", "/version", "/kv_event_sources",
    "/health", "/metrics", "/tokenize", "/detokenize", "/tokenizer_info", "/v1/models", "/ping",
    "/v1/responses/{response_id}", "/v1/responses/{response_id}/cancel", "/v1/messages/count_tokens",
    "/scale_elastic_ep", "/is_scaling_elastic_ep", "/v1/chat/completions/render", "/v1/messages/render",
    "/v1/completions/render", "/v1/responses/render", "/v1/chat/completions/derender",
    "/v1/completions/derender", "/inference/v1/abort_requests", "/abort_requests",
    "/v1/features", "/v1/features/{feature_id}", "/v1/concepts", "/v1/saes", "/v1/vectors", "/playground",
})
"""Routes that never run the model (documents, tokenizer, health, control)."""
OWN = frozenset({"/v1/features/inspect"})
"""The plugin's own route that runs the model, with its own request model."""


def unclassified(paths) -> list[str]:
    """Route paths of an app that none of the sets above names."""
    known = STEERED | ENGINE_REFUSED | NO_ENGINE | OWN
    return sorted({p for p in paths if p and p not in known})


def route_path(scope) -> str:
    """The request's route path: with `--root-path`, Starlette puts the prefix into `path` too."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


def log_routes(paths) -> None:
    unknown = unclassified(paths)
    logger.info("action=routes steered=%s", ",".join(sorted(STEERED)))
    if unknown:
        logger.warning("action=routes_unclassified paths=%s: feature_clamps and return_features are refused "
                       "there, as on every route that does not steer", ",".join(unknown))
