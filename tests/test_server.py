"""The real server (server.py -> vLLM's OpenAI server, compiled mode) on the default model,
driven with the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines import Server
from sae_factory import write_gguf

pytestmark = pytest.mark.slow

CLAMPS = [{"feature": 3, "value": 80.0}, {"feature": 10, "value": 60.0, "mode": "add"}]
WATCHED = 7
MESSAGES = [{"role": "user", "content": "What is your favourite animal and why?"}]


@pytest.fixture(scope="session")
def server(random_sae_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    (folder / "golden.json").write_text(json.dumps({"feature_clamps": CLAMPS, "sampling": {"temperature": 0}}))
    direction = np.random.default_rng(0).normal(size=576).astype(np.float32)
    write_gguf(folder / "push.gguf", {"direction.15": direction / np.linalg.norm(direction)})
    srv = Server(["--sae", str(random_sae_dir), "--metrics-sample-every", "1", "--metrics-watch", str(WATCHED),
                  "--variant", f"golden={folder / 'golden.json'}", "--vector", f"push={folder / 'push.gguf'}"],
                 folder / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none")


def chat(client, clamps=None, **kwargs):
    extra = {"feature_clamps": clamps} if clamps is not None else None
    r = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0,
                                       max_tokens=24, extra_body=extra, **kwargs)
    return r.choices[0].message.content


def scrape(server) -> dict[str, dict]:
    text = httpx.get(f"{server.base_url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_chat_steering_with_the_openai_client(client):
    plain = chat(client)
    steered = chat(client, CLAMPS)
    assert steered != plain
    assert chat(client) == plain
    assert chat(client, []) == plain  # empty list: no steering


def test_a_steered_reply_says_what_ran(server, client):
    """The receipt: the digest of the canonical steering (written out here by hand), in the headers of
    every steered reply and, with the clamps themselves, in a non-streamed one; none on a plain reply."""
    sae = httpx.get(f"{server.base_url}/v1/saes").json()["data"][0]["id"]
    canonical = {"clamps": [[sae, 3, 0.0, 80.0, 0], [sae, 10, 1.0, 60.0, 0]]}
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    ask = dict(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0, max_tokens=4)
    steered = client.chat.completions.with_raw_response.create(**ask, extra_body={"feature_clamps": CLAMPS})
    assert steered.headers["x-steer-digest"] == digest and steered.headers["x-steer-clamps"] == "2"
    assert steered.parse().model_extra["steering"] == {"digest": digest, "clamps": 2, "vectors": 0,
                                                       "canonical": canonical}
    with client.chat.completions.with_streaming_response.create(
            **ask, stream=True, extra_body={"vllm_xargs": {"feature_clamps": json.dumps(CLAMPS[::-1])}}) as streamed:
        assert streamed.headers["x-steer-digest"] == digest
    plain = client.chat.completions.with_raw_response.create(**ask)
    assert "x-steer-digest" not in plain.headers and "steering" not in (plain.parse().model_extra or {})


def test_a_steering_vector_with_the_openai_client(server, client):
    """`--vector push=FILE` (a GGUF control vector at layer 15): listed with its layer and norm; a request
    adding it is steered and says so in its receipt; at scale 0 it is the plain reply; an unknown name
    is a 400 naming the field."""
    listed = httpx.get(f"{server.base_url}/v1/vectors").json()["data"]
    assert listed == [{"name": "push", "layers": [15], "norms": [1.0]}]
    def ask(vectors):
        return client.chat.completions.with_raw_response.create(
            model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0, max_tokens=24,
            extra_body={"steering_vectors": vectors})

    pushed = ask([{"vector": "push", "scale": 60.0}])
    assert pushed.parse().choices[0].message.content != chat(client)
    assert pushed.headers["x-steer-vectors"] == "1" and pushed.headers["x-steer-clamps"] == "0"
    assert pushed.parse().model_extra["steering"]["canonical"] == {"vectors": [["push", 60.0, 0]]}
    assert ask([{"vector": "push", "scale": 0.0}]).parse().choices[0].message.content == chat(client)
    with pytest.raises(openai.BadRequestError) as err:
        ask([{"vector": "pull", "scale": 1.0}])
    error = err.value.response.json()["error"]
    assert error["param"] == "steering_vectors" and "unknown vector 'pull'" in error["message"]


def test_a_variant_id_steers_a_plain_openai_client(client):
    """`--variant golden=FILE`: a client that can only pick a model gets the file's clamps and sampling."""
    assert "SmolLM2-135M-Instruct:golden" in [m.id for m in client.models.list().data]
    explicit = client.chat.completions.with_raw_response.create(
        model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0, max_tokens=24,
        extra_body={"feature_clamps": CLAMPS})
    variant = client.chat.completions.with_raw_response.create(model="SmolLM2-135M-Instruct:golden",
                                                               messages=MESSAGES, max_tokens=24)
    assert variant.parse().choices[0].message.content == explicit.parse().choices[0].message.content != chat(client)
    assert variant.headers["x-steer-digest"] == explicit.headers["x-steer-digest"]


def test_streaming_matches_non_streaming(client):
    steered = chat(client, CLAMPS)
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0,
                                            max_tokens=24, stream=True, extra_body={"feature_clamps": CLAMPS})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == steered


def test_completions_endpoint_streaming_and_not(client):
    def complete(clamps=None, stream=False):
        r = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The ocean is", temperature=0,
                                      max_tokens=20, stream=stream,
                                      extra_body={"feature_clamps": clamps} if clamps else None)
        return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text

    plain, steered = complete(), complete(CLAMPS)
    assert steered != plain
    assert complete(CLAMPS, stream=True) == steered


def test_vllm_xargs_json_string_path(client):
    via_xargs = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0, max_tokens=24,
        extra_body={"vllm_xargs": {"feature_clamps": json.dumps(CLAMPS)}}).choices[0].message.content
    assert via_xargs == chat(client, CLAMPS)


def test_concurrent_steered_and_unsteered(server, client):
    plain = chat(client)
    steered = chat(client, CLAMPS)
    aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none")

    async def one(clamps):
        r = await aclient.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, temperature=0,
                                                  max_tokens=24,
                                                  extra_body={"feature_clamps": clamps} if clamps else None)
        return r.choices[0].message.content

    async def both():
        return await asyncio.gather(one(None), one(CLAMPS), one(None), one(CLAMPS))

    results = asyncio.run(both())
    assert results[0] == results[2] == plain
    assert results[1] == results[3] == steered


def test_prefix_cache_does_not_leak_steering(client):
    long = [{"role": "user", "content": "Describe a quiet morning in a small village by the sea. " * 6}]

    def ask(clamps=None):
        return client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=long, temperature=0, max_tokens=20,
            extra_body={"feature_clamps": clamps} if clamps else None).choices[0].message.content

    cold = ask()
    steered = ask(CLAMPS)
    assert ask() == cold
    assert ask(CLAMPS) == steered != cold


def test_a_forged_cache_salt_plants_no_unsteered_kv(client):
    """An unsteered request carrying the very salt the plugin derives for a clamp set (anyone can
    compute it) must not leave KV that a steered request with that prompt then reuses."""
    from steer_plugin.core.spec import Limits, Steering, cache_salt, parse_clamps

    prompt = "Write about the rain falling on a tin roof at night, slowly and with care. " * 5
    limits = Limits.one(d_sae=1024, max_clamps=32, max_activation=None)
    steering = Steering.of(parse_clamps(CLAMPS, limits), None, limits)

    def complete(clamps=None, salt=None):
        extra = {"feature_clamps": clamps} if clamps else {}
        if salt is not None:
            extra["cache_salt"] = salt
        return client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, temperature=0,
                                         max_tokens=16, extra_body=extra).choices[0].text

    for forged in (cache_salt(None, steering, 0), "steer:" + steering.canonical):
        complete(salt=forged)  # plants unsteered KV under the forged salt, if it could
    steered = complete(CLAMPS)
    assert steered == complete(CLAMPS, salt="a fresh salt: nothing cached")


def test_turn_two_with_prompt_scoped_clamps_matches_a_cold_cache(client):
    """Over HTTP: a conversation's second turn with "tokens": "prompt" answers as if computed cold."""
    scoped = [{**c, "tokens": "prompt"} for c in CLAMPS]
    question = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]
    first = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=question, temperature=0,
                                           max_tokens=150, extra_body={"feature_clamps": scoped,
                                                                      "ignore_eos": True})
    turn2 = question + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And then?"}]

    def ask(salt=None):
        extra = {"feature_clamps": scoped} | ({"cache_salt": salt} if salt else {})
        return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=turn2, temperature=0,
                                              max_tokens=16, extra_body=extra).choices[0].message.content

    assert ask() == ask(salt="cold")


BAD = [
    ({"feature": 3, "value": 1}, "must be a list"),
    ([{"feature": 3, "value": 1, "extra": 1}], "feature_clamps[0].extra"),
    ([{"value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 3}], "feature_clamps[0].value"),
    ([{"feature": 10**6, "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 2.5, "value": 1}], "feature_clamps[0].feature"),
    ([{"feature": 3, "value": "lots"}], "feature_clamps[0].value"),
    ([{"feature": 3, "value": 1, "mode": "boost"}], "feature_clamps[0].mode"),
    ([{"feature": 3, "value": 1, "unit": "sigma"}], "feature_clamps[0].unit"),
    ([{"feature": 3, "value": 1, "tokens": "odd"}], "feature_clamps[0].tokens"),
    ([{"feature": 3, "value": 1}, {"feature": 3, "value": 2}], "feature_clamps[1].feature"),
    ([{"feature": i, "value": 1} for i in range(33)], "at most 32"),
]


@pytest.mark.parametrize("clamps, field", BAD)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_clamps_get_400_naming_the_field(server, clamps, field, path, stream):
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 4, "stream": stream, "feature_clamps": clamps}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"})
    r = httpx.post(server.base_url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_get_400(server, raw):
    body = ('{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4, '
            f'"feature_clamps": [{{"feature": 3, "value": {raw}}}]}}')
    r = httpx.post(server.base_url + "/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "feature_clamps[0].value" in r.json()["error"]["message"]


def test_bad_clamps_in_vllm_xargs_get_400_and_server_keeps_serving(server, client):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "messages": MESSAGES, "max_tokens": 4,
        "vllm_xargs": {"feature_clamps": json.dumps([{"feature": -1, "value": 1}])}})
    assert r.status_code == 400 and "feature_clamps[0].feature" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "SmolLM2-135M-Instruct", "messages": MESSAGES, "max_tokens": 4, "use_beam_search": True,
        "feature_clamps": CLAMPS})
    assert r.status_code == 400 and "beam" in r.json()["error"]["message"]
    assert chat(client)


def test_metrics_on_the_servers_own_endpoint(server, client):
    before = scrape(server)
    n_plain, n_steered = 2, 3
    for _ in range(n_plain):
        chat(client)
    for _ in range(n_steered):
        chat(client, CLAMPS)
    after = scrape(server)

    def delta(name, labels=()):
        key = tuple(sorted(labels))
        return after.get(name, {}).get(key, 0.0) - before.get(name, {}).get(key, 0.0)

    assert delta("steer_requests_total", {"steered": "false"}.items()) == n_plain
    assert delta("steer_requests_total", {"steered": "true"}.items()) == n_steered
    sae = {"sae": "topk"}  # the SAE's folder name, its default id
    assert delta("steer_clamps_applied_total", {**sae, "mode": "set"}.items()) == n_steered
    assert delta("steer_clamps_applied_total", {**sae, "mode": "add"}.items()) == n_steered
    steered_tokens = delta("steer_steered_tokens_total", sae.items())
    assert steered_tokens >= n_steered * 24  # prompt + generated positions
    # A clamped feature is exported; it was active on the steered tokens (set to 80 > 0), counted
    # on every sampled step (sample_every=1): the same order of magnitude as the steered tokens.
    clamped = delta("steer_feature_active_tokens_total", {**sae, "feature": "3"}.items())
    assert 0.3 * steered_tokens <= clamped <= 3 * steered_tokens + 200
    assert (("feature", str(WATCHED)), ("sae", "topk")) in after["steer_feature_active_tokens_total"]
    for name in ("steer_feature_sampled_tokens_total", "steer_active_features_count",
                 "steer_reconstruction_relative_error_count", "steer_op_seconds_count"):
        assert delta(name, sae.items()) > 0, name
    assert any(dict(k).get("layer") == "15" for k in after["steer_sae_info"])
    # The SAE's device memory: its weights exactly (W_enc, W_dec 576 x 1024, b_enc 1024, b_dec 576; float32)
    weights = after["steer_sae_device_bytes"][(("device", "cpu"), ("dtype", "float32"), ("part", "weights"), *sae.items())]
    assert weights == 4 * (2 * 576 * 1024 + 1024 + 576)
    assert after["steer_sae_device_bytes"][(("device", "cpu"), ("dtype", "float32"), ("part", "buffers"), *sae.items())] > 0
    assert "vllm:num_requests_running" in after  # vLLM's own metrics are still there
    assert len(after["steer_feature_active_tokens_total"]) <= 1 + 2 + 4 * 20  # watch + clamped + top-N slots



def _raw_post(server, path: str, content: bytes, headers: list[tuple[str, str]]) -> httpx.Response:
    return httpx.post(server.base_url + path, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_two_content_types_are_refused_not_run_unsteered(server, client, path):
    """vLLM reads the first of two Content-Type headers; a reader of the last saw a multipart body
    with nothing to check, and vLLM ran the JSON it read unsteered with a 200."""
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 4, "feature_clamps": [{"feature": 10**6, "value": 1}]}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "Hi"})
    r = _raw_post(server, path, json.dumps(body).encode(),
                  [("content-type", "application/json"), ("content-type", "multipart/form-data; boundary=x")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"
    assert chat(client)  # and the server keeps serving


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"model": "SmolLM2-135M-Instruct", "input": "Hi", "max_output_tokens": 4}),
    ("/invocations", {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4}),
    ("/v1/chat/completions/batch", {"model": "SmolLM2-135M-Instruct", "messages": [MESSAGES], "max_tokens": 4}),
])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
def test_routes_that_do_not_steer_see_the_field_however_it_is_written(server, path, body, encoding):
    """Written with JSON escapes, or in UTF-16, the field is still the field to vLLM's JSON decoder."""
    text = json.dumps(body)[:-1] + ', "\\u0066eature_\\u0063lamps": [{"\\u0066eature": 3, "value": 1}]}'
    r = _raw_post(server, path, text.encode(encoding), [("content-type", "application/json")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "feature_clamps", r.text


@pytest.mark.parametrize("place", ["top", "vllm_xargs"])
@pytest.mark.parametrize("value, words", [
    ("[" * 20_000 + "]" * 20_000, "nested deeper"),
    ('[{"feature": 3' + "0" * 5000 + ', "value": 1}]', "digits"),
])
def test_hostile_clamp_strings_get_a_400_naming_the_field(server, place, value, words):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 4}
    body.update({"feature_clamps": value} if place == "top" else {"vllm_xargs": {"feature_clamps": value}})
    r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "feature_clamps" and words in error["message"], r.text


def test_a_huge_clamp_leaves_the_error_metric_finite(server, client):
    """A clamp value of 1e30 (inside the bounds) overflows the stream: the relative reconstruction
    error of those tokens is NaN, counted apart, and the histogram's sum stays a number."""
    chat(client, [{"feature": 3, "value": 1e30}])
    chat(client)
    after = scrape(server)
    key = (("sae", "topk"),)
    assert after["steer_reconstruction_nonfinite_tokens_total"][key] > 0
    total = after["steer_reconstruction_relative_error_sum"][key]
    assert total == total and abs(total) != float("inf")  # not NaN, not infinite
