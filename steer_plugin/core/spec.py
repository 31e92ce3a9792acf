"""The request contract for `feature_clamps`: untrusted input, validated by pydantic.

Every clamp becomes one affine edit of one feature's activation, f' = f * mul + add:
    set   v  ->  mul 0, add v        (v = 0 ablates the feature)
    add   v  ->  mul 1, add v
    scale v  ->  mul v, add 0
`unit="max"` multiplies v by the feature's maximum activation recorded with the SAE.
A clamp with `when` acts only at the positions where its condition holds: a feature of the same SAE
above a threshold, read from the position's stream before any clamp of that SAE ("active": the
clamped feature itself above 0).

The same parser runs at admission (turning bad input into HTTP 400) and in the worker (turning
the admitted JSON into table rows), so the two can never disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from steer_plugin.core import bounded_json

FIELD = "feature_clamps"
"""Name of the request field, top level or inside `vllm_xargs`."""

TOKENS_CODE = {"all": 0, "prompt": 1, "generated": 2}
MODE_CODE = {"set": 0, "add": 1, "scale": 2}


class ClampCondition(BaseModel):
    """The condition of a conditional clamp: a feature of the clamp's SAE above a threshold."""

    model_config = ConfigDict(extra="forbid")

    feature: Annotated[int, Field(strict=True, ge=0)]
    """The feature whose activation decides, at each position."""
    sae: Annotated[str, Field(strict=True, min_length=1, max_length=64)] | None = None
    """Its SAE: the clamp's own (the default); the op reads the condition from that SAE's encoding."""
    above: Annotated[float, Field(strict=True, allow_inf_nan=False)] = 0.0
    """The clamp acts where the feature's activation is strictly above this, in the clamp's `unit`
    (`max`: multiples of the condition feature's max activation)."""


class FeatureClamp(BaseModel):
    """One clamp, as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    sae: Annotated[str, Field(strict=True, min_length=1, max_length=64)] | None = None
    """Which loaded SAE the feature belongs to (its id, see /v1/saes); default: the first."""
    feature: Annotated[int, Field(strict=True, ge=0)]
    """SAE feature (latent) index."""
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    """Target (set), increment (add) or factor (scale)."""
    mode: Literal["set", "add", "scale"] = "set"
    unit: Literal["absolute", "max"] = "absolute"
    """`max`: value is in multiples of the feature's max activation (Anthropic's unit)."""
    tokens: Literal["all", "prompt", "generated"] = "all"
    """Which positions: `prompt` (every prompt position), `generated` (every position that produces a
    generated token: the last prompt position and each generated token), or `all`."""
    when: ClampCondition | None = None
    """Only where this condition holds at the position; the string `"active"` stands for the clamped
    feature itself above 0. None: at every position of `tokens`."""

    @field_validator("when", mode="before")
    @classmethod
    def _only_active(cls, when: Any) -> Any:
        if isinstance(when, str) and when != "active":
            raise ValueError('a condition is "active" or an object {"feature", "sae", "above"}')
        return when

    @model_validator(mode="before")
    @classmethod
    def _active(cls, data: Any) -> Any:
        # "active" is the condition on the clamped feature itself, so both spellings plan alike
        if isinstance(data, dict) and data.get("when") == "active":
            return {**data, "when": {"feature": data.get("feature"), "sae": data.get("sae")}}
        return data


_CLAMP_LIST = TypeAdapter(list[FeatureClamp])


class ClampError(ValueError):
    """Invalid `feature_clamps`; the message names the clamp and the field."""


@dataclass(frozen=True)
class SAELimits:
    """What one loaded SAE allows; trusted, from its files."""

    d_sae: int
    """Feature indices must be below this."""
    max_activation: np.ndarray | None
    """Per-feature max activation [d_sae] for unit="max"; None if the SAE ships no stats."""


@dataclass(frozen=True)
class Limits:
    """What requests may ask of the server's SAEs; trusted, from the server configuration."""

    saes: dict[str, SAELimits]
    """By SAE id, in configuration order: the first is the SAE of clamps that name none."""
    max_clamps: int
    """Most clamps one request may carry, over all SAEs (the per-request clamp table width)."""
    vectors: tuple[str, ...] = ()
    """Names of the steering vectors the server loaded, in configuration order."""

    @classmethod
    def one(cls, d_sae: int, max_clamps: int, max_activation: np.ndarray | None = None,
            sae_id: str = "sae", vectors: tuple[str, ...] = ()) -> "Limits":
        """The limits of a server with a single SAE."""
        return cls({sae_id: SAELimits(d_sae, max_activation)}, max_clamps, vectors)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.saes)

    def index(self, sae_id: str | None, where: str, error: type[ValueError]) -> int:
        """Position of an SAE id in configuration order (None: the first); unknown ids raise `error`."""
        return sae_position(self.ids, sae_id, where, error)


def sae_position(ids: tuple[str, ...], sae_id: str | None, where: str, error) -> int:
    """Position of an SAE id among the served ones (None: the first); an unknown one raises
    `error(message)` with a message naming `where` and the ids that exist."""
    if sae_id is None:
        return 0
    if sae_id not in ids:
        raise error(f"{where}: unknown SAE {sae_id[:64]!r}; this server has {', '.join(map(repr, ids))}")
    return ids.index(sae_id)


def limits_for(cfg) -> Limits:
    """What requests may ask of the SAEs `cfg` (a `config.SteerConfig`) serves; read from their files."""
    from steer_plugin.core.sae import load_config, load_max_activations

    saes = {}
    for source in cfg.saes:
        max_act = load_max_activations(source.catalogue_dir)  # the statistics travel with the catalogue
        saes[source.id] = SAELimits(d_sae=load_config(source.path).d_sae,
                                    max_activation=None if max_act is None else max_act.numpy())
    return Limits(saes, cfg.max_clamps, tuple(v.name for v in cfg.vectors))


_Row = tuple[int, int, float, float, int, int, int, float]
"""One validated clamp: SAE position, feature, mul, add, tokens code, mode code, condition feature
(NO_CONDITION: none) and its threshold (in activation units)."""

NO_CONDITION = -1


@dataclass(frozen=True)
class ClampPlan:
    """A validated clamp set in table form (K = number of clamps), sorted by SAE and feature."""

    sae: np.ndarray  # [K] int8, position of the clamp's SAE in `Limits.saes`
    feature: np.ndarray  # [K] int64
    mul: np.ndarray  # [K] float32
    add: np.ndarray  # [K] float32
    tokens: np.ndarray  # [K] int8, TOKENS_CODE
    mode: np.ndarray  # [K] int8, MODE_CODE
    cond: np.ndarray  # [K] int64, condition feature of the same SAE; NO_CONDITION: none
    above: np.ndarray  # [K] float32, the clamp acts where the condition feature is above this
    canonical: str
    """Stable JSON of the whole clamp set (every SAE), part of the canonical steering (`Steering`):
    `[[sae id, feature, mul, add, tokens code], ...]` sorted; the feature becomes mul·f + add; a
    conditional clamp carries two more entries, its condition feature and threshold."""
    rows: tuple[_Row, ...]
    """The whole clamp set (every SAE) as validated, values as exact as they were sent, sorted."""

    def __len__(self) -> int:
        return len(self.feature)

    @property
    def scoped(self) -> bool:
        """Whether some clamp acts on prompt or generated positions only (not all)."""
        return bool((self.tokens != TOKENS_CODE["all"]).any())

    def only(self, sae: int) -> "ClampPlan | None":
        """The clamps of one SAE (by position), or None if the plan has none for it."""
        keep = self.sae == sae
        if not keep.any():
            return None
        if keep.all():
            return self
        return ClampPlan(sae=self.sae[keep], feature=self.feature[keep], mul=self.mul[keep], add=self.add[keep],
                         tokens=self.tokens[keep], mode=self.mode[keep], cond=self.cond[keep],
                         above=self.above[keep], canonical=self.canonical, rows=self.rows)


def _load(raw: Any, field: str, error: type[ValueError]) -> Any:
    # vllm_xargs only carries flat values, so there structured values arrive as JSON strings. They are
    # read with the limits of a request body: a string is as untrusted as the body it came in.
    if isinstance(raw, str):
        try:
            return bounded_json.loads(raw)
        except bounded_json.LimitError as e:
            raise error(f"{bounded_json.where(field, e.path)}: {e}") from None
        except json.JSONDecodeError as e:
            raise error(f"{field}: not valid JSON ({e.msg} at position {e.pos})") from None
    return raw


def _entries(raw: Any, field: str, error: type[ValueError], adapter: TypeAdapter, noun: str, most: int,
             limit: str) -> list | None:
    """A list field of a request (list, or its JSON string) of `noun` objects, validated entry by entry
    with `adapter`; None for no entries. More than `most` entries is an error saying `limit`."""
    if raw is None:
        return None
    data = _load(raw, field, error)
    if not isinstance(data, list):
        raise error(f"{field}: must be a list of {noun} objects, got {type(data).__name__}")
    if not data:
        return None
    if len(data) > most:
        raise error(f"{field}: {len(data)} {noun}s given, {limit}")
    try:
        return adapter.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise error(f"{bounded_json.where(field, first['loc'])}: {first['msg']}") from None


def parse_clamps(raw: Any, limits: Limits) -> ClampPlan | None:
    """Validate a `feature_clamps` value (list, or its JSON string). None means "no steering"."""
    clamps = _entries(raw, FIELD, ClampError, _CLAMP_LIST, "clamp", limits.max_clamps,
                      f"at most {limits.max_clamps} allowed")
    if clamps is None:
        return None
    seen: dict[tuple[int, int], int] = {}
    rows = []
    for i, c in enumerate(clamps):
        where = f"{FIELD}[{i}]"
        sae = limits.index(c.sae, f"{where}.sae", ClampError)
        sae_id = limits.ids[sae]
        sae_limits = limits.saes[sae_id]
        if c.feature >= sae_limits.d_sae:
            raise ClampError(f"{where}.feature: {c.feature} is out of range (SAE {sae_id} has "
                             f"{sae_limits.d_sae} features)")
        if (sae, c.feature) in seen:
            raise ClampError(f"{where}.feature: feature {c.feature} of SAE {sae_id} already clamped by "
                             f"{FIELD}[{seen[sae, c.feature]}]")
        seen[sae, c.feature] = i
        value = c.value
        if c.unit == "max":
            if c.mode == "scale":
                raise ClampError(f"{where}.unit: 'max' has no meaning for mode 'scale' (a pure factor)")
            if sae_limits.max_activation is None:
                raise ClampError(f"{where}.unit: 'max' needs per-feature max activations, SAE {sae_id} has none")
            value *= float(sae_limits.max_activation[c.feature])
        if not math.isfinite(value) or abs(value) > 1e30:
            raise ClampError(f"{where}.value: {c.value} is too large")
        mul, add = {"set": (0.0, value), "add": (1.0, value), "scale": (value, 0.0)}[c.mode]
        cond, above = _condition(c, where, sae, limits)
        rows.append((sae, c.feature, mul, add, TOKENS_CODE[c.tokens], MODE_CODE[c.mode], cond, above))

    return _plan(rows, limits)


def _condition(c: FeatureClamp, where: str, sae: int, limits: Limits) -> tuple[int, float]:
    """A clamp's condition as (feature, threshold in activation units); (NO_CONDITION, 0) for none."""
    if c.when is None:
        return NO_CONDITION, 0.0
    where = f"{where}.when"
    sae_id = limits.ids[sae]
    if limits.index(c.when.sae if c.when.sae is not None else sae_id, f"{where}.sae", ClampError) != sae:
        raise ClampError(f"{where}.sae: a condition reads a feature of the clamp's own SAE ({sae_id}), "
                         f"not {c.when.sae}")
    sae_limits = limits.saes[sae_id]
    if c.when.feature >= sae_limits.d_sae:
        raise ClampError(f"{where}.feature: {c.when.feature} is out of range (SAE {sae_id} has "
                         f"{sae_limits.d_sae} features)")
    above = c.when.above
    if c.unit == "max":  # the clamp's unit; its value already needed the statistics
        above *= float(sae_limits.max_activation[c.when.feature])
    if abs(above) > 1e30:
        raise ClampError(f"{where}.above: {c.when.above} is too large")
    return c.when.feature, above


def _plan(rows: list[_Row], limits: Limits) -> ClampPlan:
    rows = sorted(rows)
    canonical = json.dumps([[limits.ids[s], f, m, a, t, *(() if c == NO_CONDITION else (c, b))]
                            for s, f, m, a, t, _, c, b in rows], separators=(",", ":"))
    sae, feature, mul, add, tokens, mode, cond, above = zip(*rows)
    return ClampPlan(
        sae=np.asarray(sae, dtype=np.int8),
        feature=np.asarray(feature, dtype=np.int64), mul=np.asarray(mul, dtype=np.float32),
        add=np.asarray(add, dtype=np.float32), tokens=np.asarray(tokens, dtype=np.int8),
        mode=np.asarray(mode, dtype=np.int8), cond=np.asarray(cond, dtype=np.int64),
        above=np.asarray(above, dtype=np.float32),
        canonical=canonical, rows=tuple(rows),
    )


def merge_plans(base: ClampPlan | None, extra: ClampPlan | None, limits: Limits, base_name: str) -> ClampPlan | None:
    """`extra`'s clamps added after `base`'s (a steered variant's, named `base_name` in errors): where
    both clamp the same feature of the same SAE, `extra`'s clamp replaces `base`'s. The whole set is
    held to `limits.max_clamps`."""
    mine = list(extra.rows) if extra is not None else []
    taken = {(s, f) for s, f, *_ in mine}
    rows = [r for r in (base.rows if base is not None else ()) if (r[0], r[1]) not in taken] + mine
    if len(rows) > limits.max_clamps:
        raise ClampError(f"{FIELD}: {base_name} brings {len(rows) - len(mine)} clamps and the request "
                         f"{len(mine)}: {len(rows)} in all, at most {limits.max_clamps} allowed")
    return _plan(rows, limits) if rows else None


def clamp_list(plan: ClampPlan, limits: Limits) -> list[dict]:
    """A plan in the request contract's form (values in activation units), which `parse_clamps` reads
    back to the same plan."""
    modes = {code: name for name, code in MODE_CODE.items()}
    scopes = {code: name for name, code in TOKENS_CODE.items()}
    return [{"sae": limits.ids[s], "feature": f, "mode": modes[o], "value": m if modes[o] == "scale" else a,
             "tokens": scopes[t], **({} if c == NO_CONDITION else {"when": {"feature": c, "above": b}})}
            for s, f, m, a, t, o, c, b in plan.rows]


VECTOR_FIELD = "steering_vectors"
"""Name of the request field naming steering vectors (top level or inside `vllm_xargs`)."""


class VectorUse(BaseModel):
    """One steering vector a request adds, as a client sends it."""

    model_config = ConfigDict(extra="forbid")

    vector: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    """Name of a vector the server loaded (`--vector NAME=FILE`)."""
    scale: Annotated[float, Field(strict=True, allow_inf_nan=False)]
    """Multiplies the vector's direction at each of its layers; 0 leaves the stream as it is."""
    tokens: Literal["all", "prompt", "generated"] = "all"
    """Which positions, as for a clamp."""


_VECTOR_LIST = TypeAdapter(list[VectorUse])


class VectorError(ValueError):
    """Invalid `steering_vectors`; the message names the entry and the field."""


@dataclass(frozen=True)
class VectorPlan:
    """A validated set of vectors (V = how many), sorted by vector."""

    vector: np.ndarray  # [V] int64, position of the vector in `Limits.vectors`
    scale: np.ndarray  # [V] float32
    tokens: np.ndarray  # [V] int8, TOKENS_CODE
    rows: tuple[tuple[int, float, int], ...]
    """(position, scale exactly as sent, tokens code), sorted."""

    def __len__(self) -> int:
        return len(self.vector)

    @property
    def scoped(self) -> bool:
        return bool((self.tokens != TOKENS_CODE["all"]).any())

    def canonical(self, limits: Limits) -> list:
        """`[[name, scale, tokens code], ...]`: part of the canonical steering."""
        return [[limits.vectors[v], s, t] for v, s, t in self.rows]


def parse_vectors(raw: Any, limits: Limits) -> VectorPlan | None:
    """Validate a `steering_vectors` value (list, or its JSON string). None means "no vector"."""
    uses = _entries(raw, VECTOR_FIELD, VectorError, _VECTOR_LIST, "vector", max(len(limits.vectors), 1),
                    f"this server has {len(limits.vectors)}")
    if uses is None:
        return None
    seen: dict[int, int] = {}
    rows = []
    for i, use in enumerate(uses):
        where = f"{VECTOR_FIELD}[{i}]"
        if use.vector not in limits.vectors:
            known = ", ".join(map(repr, limits.vectors)) or "none (start it with --vector NAME=FILE)"
            raise VectorError(f"{where}.vector: unknown vector {use.vector[:64]!r}; this server has {known}")
        position = limits.vectors.index(use.vector)
        if position in seen:
            raise VectorError(f"{where}.vector: {use.vector} already given by {VECTOR_FIELD}[{seen[position]}]")
        seen[position] = i
        if abs(use.scale) > 1e30:
            raise VectorError(f"{where}.scale: {use.scale} is too large")
        rows.append((position, use.scale, TOKENS_CODE[use.tokens]))
    return _vector_plan(rows)


def _vector_plan(rows: list[tuple[int, float, int]]) -> VectorPlan:
    rows = sorted(rows)
    vector, scale, tokens = zip(*rows)
    return VectorPlan(vector=np.asarray(vector, dtype=np.int64), scale=np.asarray(scale, dtype=np.float32),
                      tokens=np.asarray(tokens, dtype=np.int8), rows=tuple(rows))


def merge_vector_plans(base: VectorPlan | None, extra: VectorPlan | None) -> VectorPlan | None:
    """`extra`'s vectors after `base`'s (a steered variant's); one both name is `extra`'s."""
    mine = list(extra.rows) if extra is not None else []
    taken = {v for v, *_ in mine}
    rows = [r for r in (base.rows if base is not None else ()) if r[0] not in taken] + mine
    return _vector_plan(rows) if rows else None


def vector_list(plan: VectorPlan, limits: Limits) -> list[dict]:
    """A plan in the request contract's form, which `parse_vectors` reads back to the same plan."""
    scopes = {code: name for name, code in TOKENS_CODE.items()}
    return [{"vector": limits.vectors[v], "scale": s, "tokens": scopes[t]} for v, s, t in plan.rows]


@dataclass(frozen=True)
class Steering:
    """Everything a request steers with: its clamps and its vectors (at least one of them)."""

    clamps: ClampPlan | None
    vectors: VectorPlan | None
    canonical: str
    """Stable JSON of the whole steering, `{"clamps": ClampPlan.canonical, "vectors":
    VectorPlan.canonical}` (a part without entries left out): what the prefix-cache salt and the
    receipt's digest are computed from."""

    @classmethod
    def of(cls, clamps: ClampPlan | None, vectors: VectorPlan | None, limits: Limits) -> "Steering | None":
        """The steering of a request (None: unsteered)."""
        if clamps is None and vectors is None:
            return None
        parts = {}
        if clamps is not None:
            parts["clamps"] = json.loads(clamps.canonical)
        if vectors is not None:
            parts["vectors"] = vectors.canonical(limits)
        return cls(clamps, vectors, json.dumps(parts, separators=(",", ":")))

    @property
    def digest(self) -> str:
        """SHA-256 of `canonical`, hex: the steering's identity in the prefix-cache salt and the receipt."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()

    @property
    def scoped(self) -> bool:
        """Whether some clamp or vector acts on prompt or generated positions only (not all)."""
        return any(part is not None and part.scoped for part in (self.clamps, self.vectors))

    @property
    def counts(self) -> tuple[int, int]:
        """How many clamps and vectors."""
        return (len(self.clamps) if self.clamps is not None else 0,
                len(self.vectors) if self.vectors is not None else 0)


SALT_PREFIX = "steer_plugin|"
"""Every prefix-cache salt the plugin hands vLLM starts with this, and a client's own salt only ever
appears inside it, JSON-encoded: no client can send a salt equal to one the plugin derives."""


def cache_salt(client_salt: str | None, steering: "Steering | None", prompt_len: int,
               record_key: str | None = None) -> str | None:
    """The prefix-cache salt of a request. KV is reused only between requests whose salts are equal,
    and vLLM chains it into every block hash, so KV computed under one steering (or none) is never
    served to a request with another.

    Scoped steering (`tokens` "prompt" or "generated") acts on positions by where the prompt ends, so
    the same position's KV differs between a request and its next turn (turn 1's generated positions
    are turn 2's prompt positions): its salt also holds the prompt length, and KV is reused only by
    requests with the same boundary. Steering of all positions is reused across turns. None: a
    request with no salt, no steering and no recording shares the cache with plain vLLM requests."""
    key: dict[str, Any] = {}
    if client_salt is not None:
        key["client"] = client_salt
    if steering is not None:
        key["steering"] = steering.digest[:32]
        if steering.scoped:
            key["prompt_len"] = prompt_len
    if record_key is not None:
        key["record"] = record_key
    return SALT_PREFIX + json.dumps(key, sort_keys=True, separators=(",", ":")) if key else None


RECORD_FIELD = "steer_record_features"
"""`extra_args` key asking the worker to record per-token top-k features of a request (set by the
feature endpoints and by `return_features`; a JSON string like `feature_clamps`)."""
MAX_TOP_K = 64


class RecordingError(ValueError):
    """Invalid `steer_record_features`; the message names the field."""


class FeatureRecording(BaseModel):
    """What the worker records for one request: read by the op, fetched by key over collective_rpc."""

    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    """Server-generated handle the records are fetched with."""
    sae: Annotated[str, Field(min_length=1, max_length=64)]
    """Id of the SAE whose features are recorded."""
    top_k: Annotated[int, Field(strict=True, ge=1, le=MAX_TOP_K)]
    """Features kept per token, strongest first."""
    scope: Literal["prompt", "generation"]
    """`prompt`: every prompt position. `generation`: the positions that produce generated tokens
    (the last prompt position, then each generated token but the last), aligned like logprobs."""


def parse_recording(raw: Any) -> FeatureRecording | None:
    """Validate a `steer_record_features` value (object or its JSON string)."""
    if raw is None:
        return None
    try:
        return FeatureRecording.model_validate(_load(raw, RECORD_FIELD, RecordingError))
    except ValidationError as e:
        first = e.errors()[0]
        raise RecordingError(f"{bounded_json.where(RECORD_FIELD, first['loc'])}: {first['msg']}") from None
