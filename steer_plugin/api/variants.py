"""Steered variants: model ids that steer, for clients that can only pick a model.

`server.py --variant golden=FILE` (`SteerConfig.variants`) adds the id `<served name>:golden` to
/v1/models. A request to a steering route naming that id is, at the edge, a request to the served
model with the variant's clamps and vectors (the request's own `feature_clamps` and
`steering_vectors` added after them; a request clamp on a feature the variant clamps, or a vector
the variant uses, replaces the variant's) and the variant's sampling defaults for the fields the
request leaves out. From there it follows the one data path: clamps and vectors go to `vllm_xargs`
and are admitted and applied like any other, and the reply carries their receipt.
On every other route a body naming the id gets a 400 (param "model"): never served unsteered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from steer_plugin.core.config import SteerConfig, Variant
from steer_plugin.core.spec import (ClampError, ClampPlan, Limits, VectorError, VectorPlan, merge_plans,
                                    merge_vector_plans, parse_clamps, parse_vectors)


@dataclass(frozen=True)
class ServedVariant:
    variant: Variant
    served: str
    """The served model name the variant's requests go to."""
    plan: ClampPlan | None
    """The variant's clamps, validated at start."""
    vectors: VectorPlan | None
    """The variant's vectors, validated at start."""

    @property
    def model_id(self) -> str:
        return self.variant.model_id(self.served)

    def apply(self, data: dict, clamps: ClampPlan | None, vectors: VectorPlan | None,
              limits: Limits) -> tuple[ClampPlan | None, VectorPlan | None]:
        """Make `data` (a request body for this variant's id) a request to the served model with the
        variant's sampling defaults; its clamps and vectors are the variant's with the request's after."""
        data["model"] = self.served
        for key, value in self.variant.sampling.items():
            if data.get(key) is None:
                data[key] = value
        return (merge_plans(self.plan, clamps, limits, f"variant {self.model_id}"),
                merge_vector_plans(self.vectors, vectors))


def served_variants(cfg: SteerConfig, served: str, limits: Limits) -> dict[str, ServedVariant]:
    """The configured variants by model id, their clamps validated (a bad one stops the start)."""
    out = {}
    for variant in cfg.variants:
        try:
            plan = parse_clamps(list(variant.feature_clamps), limits)
            vectors = parse_vectors(list(variant.steering_vectors), limits)
        except (ClampError, VectorError) as e:
            raise ValueError(f"steer_plugin: variant {variant.name}: {e}") from None
        entry = ServedVariant(variant, served, plan, vectors)
        if entry.model_id == served or entry.model_id in out:
            raise ValueError(f"steer_plugin: variant {variant.name}: model id {entry.model_id} is already served")
        out[entry.model_id] = entry
    return out


def with_variants(models: bytes, variants: dict[str, ServedVariant]) -> bytes:
    """vLLM's /v1/models reply with an entry per variant, each like its served model's, its id changed."""
    reply = json.loads(models)
    listed = {m.get("id"): m for m in reply.get("data", [])}
    for model_id, entry in variants.items():
        base = listed.get(entry.served, {"object": "model"})
        reply["data"].append({**base, "id": model_id, "root": entry.served, "parent": entry.served})
    return json.dumps(reply).encode()
