"""The files an SAE's folder carries for discovery, as one typed schema: the feature catalogue
(`feature_catalogue.json.gz`, one `CatalogueEntry` per feature) and the concept clamps
(`concepts.json`, a `ConceptFile`). The workbench writes them through these models and the server
reads them through the same models, so the contract between building and serving is here and
nowhere else. The API's response models (`api/feature_models.py`) are built from these.

Entries stay plain dicts in memory once validated (the search index reads 16k of them at start);
`validate_entries` and `validate_concepts` are the gate on the way in and on the way out.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

from steer_plugin.core.spec import FeatureClamp

Scope = Literal["all", "generated", "prompt"]


class _Entry(BaseModel):
    # Files written by an older workbench may carry fields this version no longer reads: kept, not refused.
    model_config = ConfigDict(extra="allow")


class TokenCount(_Entry):
    token: str
    count: int


class TokenLogit(_Entry):
    token: str
    logit: float
    """Logit change per unit of the feature's activation, before the final norm's per-token scale."""


class TokenGain(_Entry):
    token: str
    gain: float
    """Next-token probability gained, on average over neutral reply prefixes, when the feature is clamped."""


class Context(_Entry):
    text: str
    """A corpus snippet, the activating token marked «like this»."""
    activation: float


class SweepCell(_Entry):
    concept_rate: float
    """Share of replies containing one of the feature's words or, where more, the share by which
    replies mentioning a concept (see `steers`) exceed unsteered ones."""
    median_ppl: float | None
    """Median perplexity of the replies under the unsteered model; None: not judged (fewer than half
    the replies showed the feature, so this strength could not be recommended anyway)."""
    distinct_trigrams: float
    """Mean share of distinct word trigrams per reply (1: no repetition)."""


Sweep = dict[str, dict[str, SweepCell]]
"""Per token scope and strength (a number as text), what the sweep's replies did."""


class SteeredConcept(_Entry):
    concept: str
    words: list[str]
    """A reply mentions the concept when it contains one of these words (a plural too)."""
    rate: float
    """Share of replies to the sweep's prompts mentioning it at the recommended strength (unsteered
    replies mention it at least 0.5 less often)."""


class Label(_Entry):
    text: str
    source: str
    """Where it came from: "tokens" (automatic, from the top-activating tokens), "neuronpedia:<explainer
    model>" (a Neuronpedia explanation export), "csv:<file name>" (an index,label file)."""


class CatalogueEntry(_Entry):
    """One feature of the catalogue; entries list features 0..d_sae-1 in order."""

    id: int
    label: str
    """The label shown: the latest imported one where there is one, else the automatic one."""
    labels: list[Label] = []
    """Every label, with its source (search reads the imported ones as explanations)."""
    max_activation: float
    """What a clamp's `unit: "max"` multiplies."""
    mean_activation: float
    """Mean activation over the tokens where the feature is active."""
    frequency: float
    """Fraction of corpus tokens on which the feature is active."""
    top_tokens: list[TokenCount]
    """Input side: the tokens it fires on most, with counts."""
    top_contexts: list[Context]
    output_tokens: list[TokenLogit] = []
    """Output side, direct path: the tokens its decoder row promotes most (final norm and unembedding)."""
    steered_tokens: list[TokenGain] = []
    """Output side, measured: the tokens whose probability rises most when the feature is clamped."""
    output_score: float | None = None
    """Arad et al.'s output score: how strongly clamping it raises the tokens its decoder row promotes."""
    steered_mass: float | None = None
    """Probability its clamp moves onto its steered tokens, consistently across prefixes."""
    recommended_strength: float | None = None
    """Clamp value (× max, mode set) the strength sweep found most effective while fluent; None: not
    measured, or no strength both fluent and effective."""
    recommended_tokens: Scope | None = None
    """The clamp's `tokens` scope at that strength."""
    recommended_sampling: dict[str, float] | None = None
    """The request's sampling fields the strength was measured with: send them with the clamp."""
    steers: list[SteeredConcept] | None = None
    """Concepts its clamp at the recommended strength was measured to make replies mention."""
    sweep: Sweep | None = None
    """The sweep behind the recommendation."""


class ConceptFeature(_Entry):
    feature: int
    label: str
    unit_value: float
    """Its clamp's value (mode add, unit absolute) when the concept clamp adds a vector as long as the
    layer's median stream norm; the values at a dose are these × the dose."""


class ConceptEntry(_Entry):
    """Several features clamped together (mode add) so that what they add points along a concept."""

    concept: str
    keywords: list[str]
    """Words that show the concept in a reply (how the strength was measured)."""
    cosine: float
    """Cosine between what the clamps add together and the concept's direction; 1: all of the push
    goes along the concept."""
    split_half: float | None = None
    """Cosine between the directions found from two halves of the replies about the concept."""
    features: list[ConceptFeature]
    recommended_dose: float | None
    """Length of what the clamps add, × the layer's median stream norm, that made the most tuning
    replies name the concept while fluent; None: no dose did both."""
    recommended_tokens: Scope | None
    recommended_sampling: dict[str, float] | None = None
    """The request's sampling fields the dose was measured with: send them with the clamps."""
    feature_clamps: list[FeatureClamp] | None
    """The clamps at that dose and scope, ready to send as a request's `feature_clamps`."""
    sweep: Sweep | None = None
    """Per token scope and dose, what the tuning replies did."""


class ConceptFile(_Entry):
    """`concepts.json`: the concept clamps, and how they were built."""

    concepts: list[ConceptEntry]


_ENTRIES = TypeAdapter(list[CatalogueEntry])


def validate_entries(entries: list[dict]) -> list[dict]:
    """Catalogue entries checked against the schema (raises pydantic's ValidationError naming the entry
    and field); returned as given."""
    _ENTRIES.validate_python(entries)
    return entries


def validate_concepts(data: dict) -> dict:
    """A concepts.json object checked against the schema; returned as given."""
    ConceptFile.model_validate(data)
    return data
