"""Feature discovery over HTTP, on vLLM's own server and port (a `vllm.endpoint_plugins` entry).

    GET  /v1/features?q=dogs&limit=10     catalogue search (without q: a paged listing)
    GET  /v1/features/{id}                one feature's full catalogue entry
    GET  /v1/concepts?q=dogs              concept clamps (several features at a measured strength,
                                          ready to send; a search's first page carries matches too)
    POST /v1/features/inspect             which features fire on a text, per token and in total
                                          (each takes `sae`, an SAE id; default: the first SAE)
    GET  /v1/saes                         the loaded SAEs
    GET  /v1/vectors                      the loaded steering vectors
    GET  /playground                      the steering playground (see playground.py)

Inspection runs the text through the server's engine as an ordinary one-token request carrying
`steer_record_features`, so it is scheduled like any request and uses the very SAE, layer and
normalisation that clamps act on; the worker keeps the per-token top-k and the API fetches them
from every engine's workers over vLLM's RPC when the request is done (see worker/recorder.py). No model runs here.

vLLM loads endpoint plugins only when named in VLLM_PLUGINS (server.py sets
`VLLM_PLUGINS=steer,steer_features`).
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request

from steer_plugin.api import playground
from steer_plugin.api.admission import new_recording_key
from steer_plugin.api.variants import served_variants
from steer_plugin.api.feature_models import (OFFERS_ORDER, ActiveFeature, ConceptClamp, ConceptList, FeatureDetail, FeatureList,
                                             FeatureSummary, GeneratedTokenFeatures, InspectRequest, InspectResponse, RankedFeature,
                                             SAEList, SAESummary, SteeringOffer, TokenFeatures, VectorList,
                                             VectorSummary)
from steer_plugin.search.catalogue import FeatureCatalogue, steering_rate
from steer_plugin.search.concepts import ConceptBook, measured_rate
from steer_plugin.core.config import SAESource, SteerConfig, plugin_disabled
from steer_plugin.core.sae import CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME, SAEConfig, SAEFileError, load_config
from steer_plugin.core.spec import RECORD_FIELD, FeatureRecording, limits_for, sae_position
from steer_plugin.core.vectors import SteeringVector, load_vector
from steer_plugin.vllm_surface import (collective_rpc_all, collective_rpc_engines, served_model_name, tokenizer_of,
                                       validation_error)

logger = logging.getLogger(__name__)
MAX_LIMIT = 200


@dataclass(frozen=True)
class _ServedSAE:
    """One loaded SAE as the feature routes see it: its configuration, catalogue and concept clamps."""

    source: SAESource
    cfg: SAEConfig
    layer: int
    catalogue: FeatureCatalogue | None
    concepts: ConceptBook

    @classmethod
    def load(cls, source: SAESource) -> "_ServedSAE":
        cfg = load_config(source.path)
        try:
            catalogue = FeatureCatalogue.load(source.catalogue_dir)
        except SAEFileError as e:
            logger.warning("action=no_catalogue sae=%s reason=%s", source.id, e)
            catalogue = None
        return cls(source, cfg, source.stream_layer(cfg), catalogue, ConceptBook.load(source.catalogue_dir))

    def concept(self, entry: dict) -> ConceptClamp:
        """A concepts.json entry, its clamps naming this SAE."""
        clamps = entry.get("feature_clamps")
        return ConceptClamp(**{k: entry.get(k) for k in ConceptClamp.model_fields if k != "feature_clamps"},
                            feature_clamps=None if clamps is None else [c | {"sae": self.source.id} for c in clamps])

    def label(self, feature: int) -> str:
        return self.catalogue.label(feature) if self.catalogue is not None else ""


def _vector_summary(vector: SteeringVector) -> VectorSummary:
    return VectorSummary(name=vector.name, layers=list(vector.layers),
                         norms=[round(float(np.linalg.norm(vector.directions[k])), 4) for k in vector.layers])


def _summary(source: SAESource) -> SAESummary:
    cfg = load_config(source.path)
    return SAESummary(id=source.id, layer=source.stream_layer(cfg), d_sae=cfg.d_sae, architecture=cfg.architecture,
                      hook_name=cfg.hook_name, catalogue=any((source.catalogue_dir / name).is_file()
                                                             for name in (CATALOGUE_FILENAME, PLAIN_CATALOGUE_FILENAME)))


class FeatureService:
    """Per-app state: the SAEs' catalogues and what inspection needs from the engine.

    The catalogues load in a thread once the server is up: checking and indexing one of 16k features
    takes seconds, and completions need none of it. Until it is done the feature routes (and
    `return_features` labels) wait for it; see `ready`."""

    def __init__(self, engine_client, cfg: SteerConfig):
        self.engine = engine_client
        self.cfg = cfg
        self._ids = tuple(source.id for source in cfg.saes)  # configuration order
        self._summaries = SAEList(data=[_summary(source) for source in cfg.saes])  # cheap: no catalogue read
        self._vectors = VectorList(data=[_vector_summary(load_vector(v.name, v.path)) for v in cfg.vectors])
        for source, summary in zip(cfg.saes, self._summaries.data):
            if source.catalogue is not None and not summary.catalogue:  # named at start: checked at start
                raise SAEFileError(f"steer_plugin: SAE {source.id}: no {CATALOGUE_FILENAME} (or "
                                   f"{PLAIN_CATALOGUE_FILENAME}) in its catalogue folder {source.catalogue}")
        # Variants are used by the middleware; their clamps are checked here, where a bad one stops the start.
        if cfg.variants:
            served_variants(cfg, served_model_name(engine_client.vllm_config), limits_for(cfg))
        self._saes: dict[str, _ServedSAE] = {}
        loader = ThreadPoolExecutor(1, thread_name_prefix="steer-catalogues")
        self._loading = loader.submit(self._load)  # a thread's future: no event loop is needed to start it
        loader.shutdown(wait=False)
        self._token_chars: int | None = None

    def _load(self) -> None:
        self._saes = {source.id: _ServedSAE.load(source) for source in self.cfg.saes}
        logger.info("action=catalogues_loaded %s", " ".join(
            f"{i}={len(s.catalogue) if s.catalogue is not None else 'none'}" for i, s in self._saes.items()))

    async def ready(self) -> "FeatureService":
        """This service once its catalogues are loaded (a load that failed raises here, for every
        request that needs it)."""
        await asyncio.wrap_future(self._loading)
        return self

    def _sae(self, sae: str | None) -> _ServedSAE:
        return self._saes[self._ids[sae_position(self._ids, sae, "sae",
                                                 lambda message: validation_error(message, "sae"))]]

    def saes(self) -> SAEList:
        """The loaded SAEs (answered at once, while the catalogues may still be loading)."""
        return self._summaries

    def vectors(self) -> VectorList:
        return self._vectors

    def _catalogue(self, served: _ServedSAE) -> FeatureCatalogue:
        if served.catalogue is None:
            raise HTTPException(404, f"SAE {served.source.id!r} has no feature catalogue: search, feature cards and "
                                     "labels need one. Build it with `steer-catalogue build` and restart the server "
                                     "with --catalogue ID=DIR (README: 'Your own model and SAEs').")
        return served.catalogue

    @staticmethod
    def summary(entry: dict, score: float | None = None) -> FeatureSummary:
        measured = {k: entry[k] for k in ("output_tokens", "steered_tokens", "output_score", "steered_mass",
                                          "recommended_strength", "recommended_tokens", "recommended_sampling",
                                          "steers", "labels")
                    if entry.get(k) is not None}
        return FeatureSummary(**{k: entry[k] for k in ("id", "label", "max_activation", "frequency")},
                              top_tokens=entry["top_tokens"], **measured, examples=entry["top_contexts"][:2],
                              score=score)

    def search(self, q: str | None, limit: int, offset: int, sae: str | None = None) -> FeatureList:
        served = self._sae(sae)
        catalogue = self._catalogue(served)
        if q is None or not q.strip():
            entries = catalogue.entries[offset: offset + limit]
            return FeatureList(sae=served.source.id, query=None, total=len(catalogue), offset=offset,
                               data=[self.summary(e) for e in entries])
        hits, total = catalogue.search(q, limit, offset)
        found = served.concepts.search(q) if offset == 0 else []
        return FeatureList(sae=served.source.id, query=q, total=total, offset=offset,
                           data=[self.summary(e, s) for e, s in hits], concepts=[served.concept(e) for e in found],
                           offers=self.offers(q, found, [e for e, _ in hits]) if offset == 0 else [],
                           offers_order=OFFERS_ORDER)

    @staticmethod
    def offers(q: str, concepts: list[dict], features: list[dict]) -> list[SteeringOffer]:
        """Concept clamps and features with a measured rate for the query, by that rate (see OFFERS_ORDER)."""
        candidates = [(measured_rate(c), {"kind": "concept", "concept": c["concept"], "label": c["concept"]})
                      for c in concepts]
        candidates += [(steering_rate(e, q), {"kind": "feature", "feature": e["id"], "label": e["label"]})
                       for e in features]
        # sorted() is stable: on a tie concept clamps stay first, and each kind keeps its search order
        ranked = sorted((c for c in candidates if c[0] is not None), key=lambda c: -c[0])
        return [SteeringOffer(rate=rate, **fields) for rate, fields in ranked]

    def concepts(self, q: str | None, sae: str | None = None) -> ConceptList:
        served = self._sae(sae)
        entries = served.concepts.search(q) if q and q.strip() else served.concepts.entries
        return ConceptList(sae=served.source.id, query=q, data=[served.concept(e) for e in entries])

    def detail(self, feature: int, sae: str | None = None) -> FeatureDetail:
        served = self._sae(sae)
        entry = self._catalogue(served).get(feature)
        if entry is None:
            raise HTTPException(404, f"feature {feature} does not exist: SAE {served.source.id} has features "
                                     f"0..{served.cfg.d_sae - 1}")
        return FeatureDetail(**self.summary(entry).model_dump(exclude={"score"}), sae=served.source.id,
                             mean_activation=entry["mean_activation"], top_contexts=entry["top_contexts"],
                             sweep=entry.get("sweep"))

    @staticmethod
    def _active(served: _ServedSAE, ids: list[int], values: list[float]) -> list[ActiveFeature]:
        return [ActiveFeature(id=f, activation=v, label=served.label(f)) for f, v in zip(ids, values) if v > 0]

    async def check_workers(self) -> None:
        """At start: every engine steers every configured SAE on some worker. A worker started without
        the plugin (a node whose environment lacks it, or has it disabled) would run steered requests
        unsteered, so the server does not start."""
        wanted = set(self._ids)
        try:
            engines = await collective_rpc_engines(self.engine, "steer_installed")
        except Exception as e:
            raise RuntimeError(f"steer_plugin: a worker does not run the steering plugin ({e}); install steer_plugin "
                               "in every node's environment (and leave STEER_PLUGIN_DISABLE unset there)") from None
        for index, replies in enumerate(engines):
            missing = wanted - {sae for reply in replies for sae in reply}
            if missing:
                raise RuntimeError(f"steer_plugin: engine {index} steers no layer for SAE(s) {sorted(missing)}; every "
                                   "node must run the plugin with the same configuration")
        logger.info("action=workers_checked engines=%d saes=%s", len(engines), ",".join(self._ids))

    async def _pop(self, key: str) -> dict | None:
        """A finished request's records, from the worker that recorded them: every worker of every
        engine is asked (under data parallel the request ran on one engine of several)."""
        replies = await collective_rpc_all(self.engine, "steer_pop_features", args=(key,))
        return next((r for r in replies if r is not None), None)

    async def generated_features(self, key: str) -> list[dict]:
        """`return_features` of a finished request: entry i for generated token i (see return_features.py)."""
        record = await self._pop(key)
        if record is None:
            return []
        await self.ready()
        served = self._saes[record["sae"]]
        first = record["prompt_len"] - 1  # the last prompt position produces generated token 0
        return [GeneratedTokenFeatures(index=p - first, features=self._active(served, fs, vs)).model_dump()
                for p, fs, vs in zip(record["positions"], record["ids"], record["values"])]

    def _max_token_chars(self, tokenizer) -> int:
        """Most characters one token can stand for (vocabulary strings are at least as long as what
        they decode to), so a text longer than this times the context cannot fit."""
        if self._token_chars is None:
            self._token_chars = max(len(t) for t in tokenizer.get_vocab())
        return self._token_chars

    def _prompt_ids(self, body: InspectRequest) -> list[int]:
        """Runs off the event loop: tokenising and chat templates take time on long texts."""
        tokenizer = tokenizer_of(self.engine)
        field = "messages" if body.messages is not None else "text"
        context = self.engine.vllm_config.model_config.max_model_len
        chars = len(body.text) if body.text is not None else sum(len(m.text()) for m in body.messages)
        if chars > self._max_token_chars(tokenizer) * context:  # surely too long: not worth tokenising
            raise validation_error(f"{field}: {chars} characters, more than the model's context of "
                                   f"{context - 1} tokens can hold", field)
        if body.messages is not None:
            text = tokenizer.apply_chat_template([m.template_dict() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(body.text)["input_ids"]
        if not ids:
            raise validation_error(f"{field}: tokenizes to no tokens", field)
        if len(ids) >= context:  # one position is left for the request's single generated token
            raise validation_error(f"{field}: {len(ids)} tokens, longer than the model's context of "
                                   f"{context - 1} tokens for inspection", field)
        return ids

    async def inspect(self, body: InspectRequest) -> InspectResponse:
        from vllm import SamplingParams

        served = self._sae(body.sae)
        ids = await asyncio.to_thread(self._prompt_ids, body)
        key = new_recording_key()
        recording = FeatureRecording(key=key, sae=served.source.id, top_k=body.top_k, scope="prompt")
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                extra_args={RECORD_FIELD: recording.model_dump_json()})
        record = None
        try:
            async for _ in self.engine.generate({"prompt_token_ids": ids}, params, f"steer-inspect-{key}"):
                pass
        finally:  # also when the client went away: never leave the records on the worker
            record = await self._pop(key)
        if record is None or record["positions"] != list(range(len(ids))):
            # Never answer with a partial or empty reading as if it were the text's features.
            raise RuntimeError(f"steer_plugin: inspection of {len(ids)} tokens came back incomplete "
                               f"({0 if record is None else len(record['positions'])} positions recorded)")
        tokenizer = tokenizer_of(self.engine)
        tokens = [TokenFeatures(position=p, token_id=ids[p], token=tokenizer.decode([ids[p]]),
                                features=self._active(served, fs, vs))
                  for p, fs, vs in zip(record["positions"], record["ids"], record["values"])]
        ranked = [RankedFeature(id=f, label=served.label(f), total_activation=v, total_max_units=r)
                  for f, v, r in zip(record["total_ids"][: body.top_features], record["total_values"],
                                     record["total_relative"])]
        return InspectResponse(sae=served.source.id, layer=served.layer, num_tokens=len(ids), tokens=tokens,
                               top_features=ranked)


router = APIRouter()


async def _ready_service(request: Request) -> FeatureService:
    return await request.app.state.steer_features.ready()


Service = Annotated[FeatureService, Depends(_ready_service)]


@router.get("/v1/saes", response_model=SAEList)
async def list_saes(request: Request) -> SAEList:
    return request.app.state.steer_features.saes()


@router.get("/v1/vectors", response_model=VectorList)
async def list_vectors(request: Request) -> VectorList:
    return request.app.state.steer_features.vectors()


@router.get("/v1/features", response_model=FeatureList)
async def search_features(service: Service,
                          q: Annotated[str | None, Query(max_length=500)] = None,
                          limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
                          offset: Annotated[int, Query(ge=0)] = 0,
                          sae: Annotated[str | None, Query(max_length=64)] = None) -> FeatureList:
    return await asyncio.to_thread(service.search, q, limit, offset, sae)


@router.get("/v1/concepts", response_model=ConceptList)
async def list_concepts(service: Service, q: Annotated[str | None, Query(max_length=500)] = None,
                        sae: Annotated[str | None, Query(max_length=64)] = None) -> ConceptList:
    return service.concepts(q, sae)


@router.get("/v1/features/{feature_id}", response_model=FeatureDetail)
async def get_feature(service: Service, feature_id: int,
                      sae: Annotated[str | None, Query(max_length=64)] = None) -> FeatureDetail:
    return service.detail(feature_id, sae)


@router.post("/v1/features/inspect", response_model=InspectResponse)
async def inspect_features(service: Service, body: InspectRequest) -> InspectResponse:
    return await service.inspect(body)


class FeatureEndpoints:
    """The `vllm.endpoint_plugins` entry (`steer_features`)."""

    name = "steer_features"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        if not plugin_disabled():
            app.include_router(router)
            playground.attach(app)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        if engine_client is None or plugin_disabled():
            return
        service = FeatureService(engine_client, SteerConfig.from_vllm(engine_client.vllm_config))
        await service.check_workers()
        state.steer_features = service
