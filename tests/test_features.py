"""Feature discovery over HTTP (/v1/features...) on the real server, default model and shipped SAE,
in vLLM's default compiled mode."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from engines import MODEL
from steer_plugin.core.config import DEFAULT_SAE_DIR
from steer_plugin.core.sae import SAE

pytestmark = pytest.mark.slow

GOD = 4137  # shipped catalogue: label "God", the README demo feature
GOD_TEXT = "Every evening she prayed to God, and she believed that God listened to her."


def inspect(http, **body) -> dict:
    r = http.post("/v1/features/inspect", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_search_ranks_what_steers_there_first_then_the_labelled_feature(http):
    r = http.get("/v1/features", params={"q": "God", "limit": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    first = body["data"][0]  # measured to make replies mention god (religion's keywords)
    assert any("god" in c["words"] and c["rate"] >= 0.5 for c in first["steers"]) and first["recommended_strength"]
    hit = next(h for h in body["data"] if h["id"] == GOD)
    assert "God" in hit["label"] and hit["max_activation"] > 0 and 0 < hit["frequency"] < 1
    assert hit["top_tokens"] and 1 <= len(hit["examples"]) <= 2 and "«" in hit["examples"][0]["text"]
    assert body["total"] >= len(body["data"])
    # plural and function words do not get in the way
    assert GOD in [f["id"] for f in http.get("/v1/features", params={"q": "the gods"}).json()["data"]]


def test_listing_without_query_pages_through_all_features(http):
    body = http.get("/v1/features", params={"offset": 10, "limit": 3}).json()
    assert [f["id"] for f in body["data"]] == [10, 11, 12]
    assert body["total"] == SAE.load(DEFAULT_SAE_DIR).cfg.d_sae and body["query"] is None


def test_feature_detail_and_unknown_feature(http):
    detail = http.get(f"/v1/features/{GOD}").json()
    assert detail["id"] == GOD and len(detail["top_contexts"]) >= len(detail["examples"])
    assert detail["mean_activation"] > 0
    for bad in (99999, -1):
        r = http.get(f"/v1/features/{bad}")
        assert r.status_code == 404 and f"feature {bad} does not exist" in r.text


def test_inspect_finds_the_concept_feature_on_its_tokens(http):
    body = inspect(http, text=GOD_TEXT, top_k=5, top_features=10)
    assert GOD in [f["id"] for f in body["top_features"]], body["top_features"]  # top 10 of all the SAE's features
    god_tokens = [t for t in body["tokens"] if t["token"].strip() == "God"]
    assert len(god_tokens) == 2
    for t in god_tokens:
        assert GOD in [f["id"] for f in t["features"]]
    assert body["num_tokens"] == len(body["tokens"]) and [t["position"] for t in body["tokens"]] == list(
        range(body["num_tokens"]))
    assert all(f["activation"] > 0 for t in body["tokens"] for f in t["features"])


def test_inspect_reports_what_the_sae_computes_on_the_layer(http):
    """Same SAE, layer and normalisation as steering: recomputed here with transformers on layer 15."""
    from steer_workbench.capture import capture, load_hf_model

    body = inspect(http, text=GOD_TEXT, top_k=8)
    sae = SAE.load(DEFAULT_SAE_DIR)
    model, tokenizer = load_hf_model(MODEL)
    ids = [t["token_id"] for t in body["tokens"]]
    assert ids == tokenizer(GOD_TEXT)["input_ids"] == tokenizer(GOD_TEXT, add_special_tokens=False)["input_ids"]
    cap = capture(model, tokenizer, [GOD_TEXT], layer=sae.cfg.layer, ctx=len(ids), batch_size=1)
    f, _ = sae.encode(cap.acts)  # [n - 1, d_sae]: positions 1..n-1 (capture leaves out the sink)
    for t in body["tokens"][1:]:
        expected = f[t["position"] - 1]
        got_ids = torch.tensor([x["id"] for x in t["features"]])
        got = torch.tensor([x["activation"] for x in t["features"]])
        assert len(got) == 8
        torch.testing.assert_close(got, expected[got_ids], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(got, expected.topk(8).values, rtol=2e-3, atol=2e-3)  # and they are the top 8


def test_inspect_messages_applies_the_chat_template(http):
    messages = [{"role": "user", "content": "Do you believe in God?"}]
    body = inspect(http, messages=messages)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert [t["token_id"] for t in body["tokens"]] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert body["tokens"][0]["token"] == "<|im_start|>"


def test_inspect_takes_messages_as_chat_takes_them(http):
    """Content parts (joined with newlines, as vLLM joins text parts) and `name`, as on a chat request."""
    plain = inspect(http, messages=[{"role": "user", "content": "Do you believe\nin God?"}])
    parts = inspect(http, messages=[{"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "Do you believe"}, {"type": "text", "text": "in God?"}]}])
    assert [t["token_id"] for t in parts["tokens"]] == [t["token_id"] for t in plain["tokens"]]


@pytest.mark.parametrize("method,path,kwargs,param", [
    ("get", "/v1/features", {"params": {"limit": 0}}, "limit"),
    ("get", "/v1/features", {"params": {"limit": 100000}}, "limit"),
    ("get", "/v1/features", {"params": {"offset": -1}}, "offset"),
    ("get", "/v1/features/abc", {}, "feature_id"),
    ("post", "/v1/features/inspect", {"json": {"text": ""}}, "text"),
    ("post", "/v1/features/inspect", {"json": {}}, "messages"),
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "top_k": 0}}, "top_k"),
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "top_k": 1000}}, "top_k"),
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "top_features": 0}}, "top_features"),
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "top_k": True}}, "top_k"),  # strict, as clamps
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "top_features": 2.0}}, "top_features"),
    ("post", "/v1/features/inspect", {"json": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}}, "content[1]"),
    ("post", "/v1/features/inspect", {"json": {"text": "word " * 5000}}, "text"),
    # far beyond the context: refused on its length alone, before any tokenising
    ("post", "/v1/features/inspect", {"json": {"text": "x" * 3_000_000}}, "text"),
    ("post", "/v1/features/inspect", {"json": {"messages": [{"role": "robot", "content": "x"}]}}, "role"),
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "bogus": 1}}, "bogus"),
    # inspection reads the unsteered stream: clamps there are refused, never ignored
    ("post", "/v1/features/inspect", {"json": {"text": "hi", "feature_clamps": [{"feature": 1, "value": 1}]}},
     "feature_clamps"),
])
def test_bad_parameters_are_400_naming_the_parameter(http, method, path, kwargs, param):
    r = getattr(http, method)(path, **kwargs)
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["message"], r.text


def test_bad_recording_request_through_vllm_xargs_is_400(http):
    r = http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 2,
                                           "vllm_xargs": {"steer_record_features": "{\"key\": 1}"}})
    assert r.status_code == 400 and "steer_record_features" in r.text


def test_concurrent_inspection_and_generation_both_succeed(feature_server, http):
    messages = [{"role": "user", "content": "Tell me about your weekend."}]

    async def chat(clamps):
        client = openai.AsyncOpenAI(base_url=f"{feature_server.base_url}/v1", api_key="none")
        r = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=24,
            extra_body={"feature_clamps": clamps} if clamps else None)
        return r.choices[0].message.content

    async def inspect_async(text):
        async with httpx.AsyncClient(base_url=feature_server.base_url, timeout=300) as c:
            r = await c.post("/v1/features/inspect", json={"text": text})
            assert r.status_code == 200, r.text
            return r.json()

    clamps = [{"feature": GOD, "value": 3, "unit": "max"}]
    alone = [asyncio.run(chat(None)), asyncio.run(chat(clamps))]

    async def together():
        return await asyncio.gather(chat(None), chat(clamps), inspect_async(GOD_TEXT),
                                    inspect_async("The sea was calm."), chat(None))

    plain, steered, insp_god, insp_sea, plain_again = asyncio.run(together())
    assert [plain, steered] == alone and plain_again == plain
    assert insp_god == inspect(http, text=GOD_TEXT)  # a request beside it changes nothing
    assert insp_sea["num_tokens"] > 0


def test_from_search_to_steered_reply(http, feature_server):
    """The README's worked example: find the feature by word, then clamp it as recommended (strength,
    token scope and the decoding it was measured with): through the server, replies to the strength
    sweep's prompts turn to the concept its `steers` promises, as the sweep measured."""
    from concurrent.futures import ThreadPoolExecutor

    from steer_workbench.steering_eval import REPLY_TOKENS, mentions
    from steer_workbench.protocols import SWEEP_PROMPTS
    from steer_workbench.strengths import MIN_RATE

    hit = http.get("/v1/features", params={"q": "god", "limit": 1}).json()["data"][0]
    concept = hit["steers"][0]
    clamp = {"feature": hit["id"], "value": hit["recommended_strength"], "unit": "max", "tokens": hit["recommended_tokens"]}
    client = openai.OpenAI(base_url=f"{feature_server.base_url}/v1", api_key="none")

    def reply(args):
        prompt, clamps = args
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}], max_tokens=REPLY_TOKENS,
            **hit["recommended_sampling"], extra_body={"feature_clamps": clamps} if clamps else None).choices[0].message.content

    with ThreadPoolExecutor(len(SWEEP_PROMPTS)) as pool:  # concurrent, as the engine batches them
        rates = [sum(mentions(r, concept["words"]) for r in pool.map(reply, [(p, clamps) for p in SWEEP_PROMPTS]))
                 / len(SWEEP_PROMPTS) for clamps in (None, [clamp])]
    assert rates[1] - rates[0] >= MIN_RATE, (concept, rates)


def test_from_search_to_a_concept_clamp(http, feature_server):
    """A search carries the concept clamp; its `feature_clamps`, sent as they are with its
    `recommended_sampling` (both replies), make replies name the concept (the best-measured concept,
    on prompts of its tuning set)."""
    from steer_workbench.steering_eval import mentions
    from steer_workbench.protocols import TUNING_PROMPTS

    listed = [c for c in http.get("/v1/concepts").json()["data"] if c["feature_clamps"]]
    best = max(listed, key=lambda c: c["sweep"][c["recommended_tokens"]][f"{c['recommended_dose']:g}"]["concept_rate"])
    concept = http.get("/v1/features", params={"q": best["concept"], "limit": 1}).json()["concepts"][0]
    client = openai.OpenAI(base_url=f"{feature_server.base_url}/v1", api_key="none")
    named = {True: 0, False: 0}
    for prompt in TUNING_PROMPTS[:4]:
        for steered in (True, False):
            r = client.chat.completions.create(
                model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": prompt}], max_tokens=48,
                **concept["recommended_sampling"],
                extra_body={"feature_clamps": concept["feature_clamps"]} if steered else None)
            named[steered] += mentions(r.choices[0].message.content, concept["keywords"])
    assert named[True] >= 2 and named[True] > named[False], (concept["concept"], named)


def test_return_features_per_generated_token_steered_or_not(feature_server):
    client = openai.OpenAI(base_url=f"{feature_server.base_url}/v1", api_key="none")

    def ask(clamps, **kwargs):
        extra = {"return_features": 3, **({"feature_clamps": clamps} if clamps else {})}
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is your physical form?"}],
            temperature=0, max_tokens=12, extra_body=extra, **kwargs)

    plain = ask(None)
    features = plain.model_dump()["choices"][0]["features"]
    assert [f["index"] for f in features] == list(range(plain.usage.completion_tokens))
    assert all(1 <= len(f["features"]) <= 3 for f in features)
    steered = ask([{"feature": GOD, "value": 3, "unit": "max"}]).model_dump()["choices"][0]["features"]
    with_god = [f for f in steered if GOD in [x["id"] for x in f["features"]]]
    assert len(with_god) == len(steered)  # clamped on every position, so it shows on every one
    assert not any(GOD in [x["id"] for x in f["features"]] for f in features)

    streamed = []
    for chunk in ask(None, stream=True):
        streamed += (chunk.model_extra or {}).get("features", [])
    assert streamed == features


@pytest.mark.parametrize("extra", [{"return_features": 0}, {"return_features": "3"},
                                   {"return_features": 2, "n": 2}])
def test_bad_return_features_is_400(http, extra):
    r = http.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "Hi"}], **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_features", r.text


def test_a_burst_of_long_searches_leaves_the_server_answering(feature_server, http):
    """16 concurrent searches of 500 characters (the longest `q` taken) while /v1/models is asked every
    20 ms. Searches run in threads, so what can hold the other route is the interpreter they share:
    the inverted index keeps a search to its words' postings (a pass over every feature per query
    held /v1/models for over a second)."""
    import time

    labels = [e["label"] for e in http.get("/v1/features", params={"limit": 200}).json()["data"]]
    query = " ".join(labels)[:500]  # many words, each matching some features

    async def burst():
        latencies = []
        async with httpx.AsyncClient(base_url=feature_server.base_url, timeout=300) as client:
            async def ping():
                while not searches.done():
                    start = time.perf_counter()
                    assert (await client.get("/v1/models")).status_code == 200
                    latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)

            searches = asyncio.gather(*(client.get("/v1/features", params={"q": query}) for _ in range(16)))
            pinger = asyncio.create_task(ping())
            replies = await searches
            await pinger
        return replies, latencies

    replies, latencies = asyncio.run(burst())
    assert all(r.status_code == 200 for r in replies) and replies[0].json()["total"] > 0
    assert latencies and max(latencies) < 0.2, latencies
