"""The /v1/features routes as an ASGI app over the shipped SAE's catalogue (search and detail need
no engine): catalogue search runs off the event loop, so other requests are served meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi import FastAPI

from steer_plugin.api import feature_routes
from steer_plugin.api.feature_routes import FeatureService, router
from steer_plugin.core.config import DEFAULT_SAE_DIR, SAESource, SteerConfig
from steer_plugin.core.sae import SAEFileError, load_config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def service():
    return FeatureService(None, SteerConfig())


def _client(service) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(router)
    app.state.steer_features = service
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_search_does_not_block_other_requests(service, monkeypatch):
    started, release = threading.Event(), threading.Event()
    catalogue = (await service.ready())._saes["smollm2-135m-instruct-l15"].catalogue
    search = catalogue.search
    first = search("God", 1)[0][0][0]["id"]

    def slow_search(*args):
        started.set()
        if not release.wait(10):  # on the event loop, nothing could ever release it
            raise TimeoutError("search ran on the event loop: no other request was served")
        return search(*args)

    monkeypatch.setattr(catalogue, "search", slow_search)
    async with _client(service) as client:
        pending = asyncio.create_task(client.get("/v1/features", params={"q": "God"}))
        while not started.is_set():
            await asyncio.sleep(0.01)
        other = await client.get("/v1/features/4137")  # served while the search is still running
        release.set()
        searched = await pending
    assert other.status_code == 200 and other.json()["id"] == 4137
    assert searched.status_code == 200 and searched.json()["data"][0]["id"] == first


async def test_search_and_detail_answer_as_before(service):
    async with _client(service) as client:
        hits = (await client.get("/v1/features", params={"q": "God", "limit": 10})).json()
        missing = await client.get("/v1/features/999999")
    assert 4137 in [h["id"] for h in hits["data"]] and len(hits["data"]) == 10  # the feature labelled "God"
    assert missing.status_code == 404 and f"0..{load_config(DEFAULT_SAE_DIR).d_sae - 1}" in missing.text
    top = hits["data"][0]  # the output side and the score from the catalogue travel with every hit
    assert top["steered_tokens"] and top["output_tokens"] and top["output_score"] is not None


async def test_a_swept_feature_carries_its_measured_strength(service):
    catalogue = (await service.ready())._saes["smollm2-135m-instruct-l15"].catalogue
    swept = next(e for e in catalogue.entries if e.get("recommended_strength"))
    async with _client(service) as client:
        detail = (await client.get(f"/v1/features/{swept['id']}")).json()
        listed = (await client.get("/v1/features", params={"offset": swept["id"], "limit": 1})).json()["data"][0]
    assert detail["recommended_strength"] == listed["recommended_strength"] == swept["recommended_strength"]
    assert detail["recommended_tokens"] == swept["recommended_tokens"] in ("all", "generated", "prompt")
    # the decoding it was measured with travels with it (the shipped sweep's: greedy, frequency penalty
    # 0.5): another decoding, another strength
    assert detail["recommended_sampling"] == listed["recommended_sampling"] == {"temperature": 0, "frequency_penalty": 0.5}
    assert detail["sweep"].keys() == swept["sweep"].keys() and swept["recommended_tokens"] in detail["sweep"]
    cells = detail["sweep"][swept["recommended_tokens"]]
    assert f"{swept['recommended_strength']:g}" in cells and all(0 <= c["concept_rate"] <= 1 for c in cells.values())


async def test_a_search_offers_first_the_features_measured_to_steer_towards_it(service):
    catalogue = (await service.ready())._saes["smollm2-135m-instruct-l15"].catalogue
    steering = next(e for e in catalogue.entries if e.get("steers"))
    concept = steering["steers"][0]
    async with _client(service) as client:
        top = (await client.get("/v1/features", params={"q": concept["words"][0], "limit": 1})).json()["data"][0]
        detail = (await client.get(f"/v1/features/{steering['id']}")).json()
    assert detail["steers"] == steering["steers"] and detail["recommended_strength"] is not None
    assert any(c["rate"] >= 0.5 and concept["words"][0] in c["words"] for c in top["steers"])


async def test_concept_clamps_come_with_a_search_and_on_their_own_route(service):
    book = (await service.ready())._saes["smollm2-135m-instruct-l15"].concepts
    name = next(e["concept"] for e in book.entries if e["recommended_dose"] is not None)
    async with _client(service) as client:
        found = (await client.get("/v1/features", params={"q": name, "limit": 2})).json()
        later = (await client.get("/v1/features", params={"q": name, "offset": 2})).json()
        one = (await client.get("/v1/concepts", params={"q": name})).json()
        listed = (await client.get("/v1/concepts")).json()
        plural = (await client.get("/v1/concepts", params={"q": "puppies"})).json()
    assert found["concepts"][0]["concept"] == name and later["concepts"] == []  # first page only
    assert one["data"][0] == found["concepts"][0] and one["sae"] == "smollm2-135m-instruct-l15"
    assert len(listed["data"]) == len(book.entries) >= 30 and plural["data"][0]["concept"] == "dogs"
    concept = one["data"][0]
    assert len(concept["feature_clamps"]) == len(concept["features"])
    assert {(c["sae"], c["mode"], c["unit"], c["tokens"]) for c in concept["feature_clamps"]} == {
        ("smollm2-135m-instruct-l15", "add", "absolute", concept["recommended_tokens"])}


async def test_an_sae_without_a_catalogue_gets_a_404_naming_it_not_its_path(random_sae_dir):
    service = FeatureService(None, SteerConfig(saes=(SAESource(path=str(random_sae_dir), id="mine"),)))
    async with _client(service) as client:
        r = await client.get("/v1/features", params={"q": "dogs", "sae": "mine"})
    assert r.status_code == 404 and "'mine' has no feature catalogue" in r.text and "steer-catalogue build" in r.text
    assert str(random_sae_dir) not in r.text and str(random_sae_dir.parent) not in r.text


async def test_what_steered_best_is_offered_first_whatever_its_kind(service):
    """A concept clamp is not put above a feature that was measured to steer more (the shipped
    calibration: the feature for rivers and the one for religion beat their concept clamps)."""
    async with _client(service) as client:
        replies = {q: (await client.get("/v1/features", params={"q": q})).json() for q in ("rivers", "religion")}
        later = (await client.get("/v1/features", params={"q": "rivers", "offset": 20})).json()
    for concept, reply in replies.items():
        rates = [o["rate"] for o in reply["offers"]]
        assert rates == sorted(rates, reverse=True) and reply["offers_order"].startswith("rate")
        clamp = next(o for o in reply["offers"] if o["kind"] == "concept" and o["concept"] == concept)
        top = reply["offers"][0]
        assert top["kind"] == "feature" and top["rate"] > clamp["rate"]
        assert top["feature"] in [h["id"] for h in reply["data"]]
    assert later["offers"] == [] and later["concepts"] == []


async def test_catalogues_load_after_start_and_the_routes_wait_for_them(monkeypatch):
    release = threading.Event()
    load = feature_routes._ServedSAE.load

    def held(cls, source):
        release.wait(30)
        return load(source)

    monkeypatch.setattr(feature_routes._ServedSAE, "load", classmethod(held))
    started = time.perf_counter()
    service = FeatureService(None, SteerConfig())
    assert time.perf_counter() - started < 1  # the server's start does not wait for the index
    async with _client(service) as client:
        pending = asyncio.create_task(client.get("/v1/features", params={"q": "God"}))
        await asyncio.sleep(0.3)
        assert not pending.done()
        release.set()
        searched = await pending
    assert searched.status_code == 200 and searched.json()["data"]


def test_a_catalogue_folder_without_a_catalogue_stops_the_start(tmp_path):
    with pytest.raises(SAEFileError, match="no feature_catalogue.json.gz"):
        FeatureService(None, SteerConfig(saes=(SAESource(path=str(DEFAULT_SAE_DIR), catalogue=str(tmp_path)),)))
