"""The bodies of the feature routes (`feature_routes.py`): what clients send and get back, as pydantic models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from steer_plugin.core.catalogue_schema import (ConceptEntry, Context, Label, SteeredConcept, Sweep, TokenCount, TokenGain,
                                               TokenLogit)
from steer_plugin.core.spec import MAX_TOP_K

MAX_TOP_FEATURES = 256  # worker.recorder.TOTAL_TOP


class FeatureSummary(BaseModel):
    id: int
    label: str
    """An imported explanation where there is one, else the automatic label (top-activating tokens)."""
    labels: list[Label] = []
    """Every label, with its source."""
    max_activation: float
    """What `unit: "max"` multiplies."""
    frequency: float
    """Fraction of corpus tokens on which the feature is active."""
    top_tokens: list[TokenCount]
    """Input side: the tokens it fires on most, with counts."""
    output_tokens: list[TokenLogit] = []
    """Output side, direct path: the tokens its decoder row promotes most (final norm and unembedding)."""
    steered_tokens: list[TokenGain] = []
    """Output side, measured: the tokens whose probability rises most when the feature is clamped."""
    output_score: float | None = None
    """Arad et al.'s output score: how strongly clamping it raises the tokens its decoder row promotes."""
    steered_mass: float | None = None
    """Probability its clamp moves onto its steered tokens, consistently across prefixes (consistency of
    the push; a wrecking clamp scores high too: recommended_strength is the measured steerability)."""
    recommended_strength: float | None = None
    """Clamp value (× max, mode set) the strength sweep found most effective while fluent; None: not
    measured, or no strength both fluent and effective."""
    recommended_tokens: Literal["all", "generated", "prompt"] | None = None
    """The clamp's `tokens` scope at that strength (every position, the generated ones, or the prompt's)."""
    recommended_sampling: dict[str, float] | None = None
    """The request's sampling fields the strength was measured with (temperature, frequency_penalty):
    send them with the clamp; other decoding, other strength."""
    steers: list[SteeredConcept] = []
    """Concepts its clamp at the recommended strength was measured to make replies mention; a search
    naming one of them ranks the feature first."""
    examples: list[Context]
    score: float | None = None
    """Search relevance (search results only)."""


class FeatureDetail(FeatureSummary):
    sae: str
    """The SAE the feature belongs to."""
    mean_activation: float
    """Mean activation over the tokens where the feature is active."""
    top_contexts: list[Context]
    sweep: Sweep | None = None
    """The sweep behind the recommendation: per token scope and strength (× max), what the replies did."""


class ConceptClamp(ConceptEntry):
    """A concept clamp as the API returns it: the concepts.json entry (see `catalogue_schema`), its
    `feature_clamps` naming the SAE, file fields the schema does not know left out."""

    model_config = ConfigDict(extra="ignore")


OFFERS_ORDER = ("rate: share of the calibration replies that named the searched concept at the recommended "
                "setting (a concept clamp: its sweep at the recommended dose; a feature: its `steers` entry at "
                "the recommended strength), highest first; ties: concept clamps first")
"""What `FeatureList.offers` is ordered by, as the reply states it."""


class SteeringOffer(BaseModel):
    """A way to steer towards what was searched for, with the rate it was measured to steer at."""

    kind: Literal["concept", "feature"]
    concept: str | None = None
    """kind concept: the concept clamp's name (the clamp is in the reply's `concepts`)."""
    feature: int | None = None
    """kind feature: the feature's id (its summary is in the reply's `data`)."""
    label: str
    rate: float
    """See `FeatureList.offers_order`."""


class FeatureList(BaseModel):
    object: Literal["list"] = "list"
    sae: str
    """The SAE searched."""
    query: str | None
    total: int
    """Features matching the query (all features without one)."""
    offset: int
    data: list[FeatureSummary]
    concepts: list[ConceptClamp] = []
    """Concept clamps matching the query (first page of a search only), steerable first (see /v1/concepts)."""
    offers: list[SteeringOffer] = []
    """First page of a search: the concept clamps and this page's features that were measured to steer
    towards the query, in one list ordered by that measurement (`offers_order`): what to try first. A
    concept clamp does not outrank a feature that steered more."""
    offers_order: str | None = None
    """The number `offers` is ordered by (None: no search)."""


class ConceptList(BaseModel):
    object: Literal["list"] = "list"
    sae: str
    query: str | None
    data: list[ConceptClamp]


class TextPart(BaseModel):
    """A content part of a chat message; inspection reads text, so `text` is the one type taken."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[str, Field(strict=True)]


class Message(BaseModel):
    """A chat message as /v1/chat/completions takes it: content as a string or as text parts (joined
    with newlines, as vLLM joins them for a template that takes string content), an optional name."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(strict=True)] | list[TextPart]
    name: Annotated[str, Field(strict=True, max_length=256)] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """Name the part that is not text (chat takes images and audio; inspection reads text)."""
        if isinstance(content, list):
            for i, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"content[{i}] is a {str(part.get('type'))[:40]!r} part; only 'text' parts "
                                     "can be inspected")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as a chat template reads it: string content, name only where given."""
        return {"role": self.role, "content": self.text(), **({"name": self.name} if self.name else {})}


class InspectRequest(BaseModel):
    """Exactly one of `text` (used as is) or `messages` (the chat template applied, as for a chat request)."""

    model_config = ConfigDict(extra="forbid")
    text: Annotated[str, Field(strict=True, min_length=1)] | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    sae: Annotated[str, Field(strict=True, min_length=1, max_length=64)] | None = None
    """Whose features (an SAE id, see /v1/saes); default: the first SAE."""
    top_k: Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K)] = 5
    """Active features reported per token."""
    top_features: Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_FEATURES)] = 20
    """Features reported for the whole text, ranked by total activation (in units of max)."""

    @model_validator(mode="after")
    def _one_input(self) -> "InspectRequest":
        if (self.text is None) == (self.messages is None):
            raise ValueError("give exactly one of 'text' or 'messages'")
        return self


class ActiveFeature(BaseModel):
    id: int
    activation: float
    label: str


class TokenFeatures(BaseModel):
    position: int
    token_id: int
    token: str
    features: list[ActiveFeature]
    """Strongest first; only active (> 0) features."""


class GeneratedTokenFeatures(BaseModel):
    index: int
    """Generated token index; its features are those of the position that produced it (like logprobs)."""
    features: list[ActiveFeature]


class RankedFeature(BaseModel):
    id: int
    label: str
    total_activation: float
    """Sum over the text's positions except position 0 (an attention sink the SAE was not trained on)."""
    total_max_units: float
    """The same sum in units of the feature's max activation; the ranking key (dense features with
    large activations would otherwise top every text)."""


class InspectResponse(BaseModel):
    object: Literal["feature_inspection"] = "feature_inspection"
    sae: str
    """The SAE's id."""
    layer: int
    num_tokens: int
    tokens: list[TokenFeatures]
    top_features: list[RankedFeature]


class SAESummary(BaseModel):
    id: str
    """What clamps (`"sae"`), the feature routes and metrics call it; default: its folder name."""
    layer: int
    d_sae: int
    architecture: str
    hook_name: str
    catalogue: bool
    """Whether it has a feature catalogue file (search, labels), beside it or in its --catalogue folder."""


class SAEList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SAESummary]


class VectorSummary(BaseModel):
    name: str
    """What `steering_vectors` entries call it (`--vector NAME=FILE`)."""
    layers: list[int]
    """Decoder layers whose output it is added to."""
    norms: list[float]
    """Its direction's norm at each of those layers (scale 1 adds that much)."""


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorSummary]
