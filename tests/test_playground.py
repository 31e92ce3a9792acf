"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright) against
the real server with the default model and SAE. Screenshots go to the test's temporary folder, or
to STEER_SCREENSHOT_DIR when set (README's picture comes from there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a closed network: no background connections, no component or sync updates.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-default-apps"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (setup.sh --dev installs Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("STEER_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, feature_server):
    """The playground at 1280x800, with every console error and every request it makes recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.console_errors, page.requests = [], []
    page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
    page.on("pageerror", lambda e: page.console_errors.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(f"{feature_server.base_url}/playground")
    page.wait_for_function("document.getElementById('model-name').textContent !== '…'")
    yield page
    context.close()


def _refused(page, error: str, words: str, control: str) -> None:
    """Send; the 400 naming `words` shows in the element `error` and marks the control `control` invalid."""
    page.get_by_role("button", name="Send").click()
    page.wait_for_function(f"document.getElementById('{error}').textContent.includes('{words}')", timeout=60_000)
    assert page.locator(f"#{control}").get_attribute("aria-invalid") == "true"


def _search(page, query: str):
    page.get_by_label("Concept").fill(query)
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#search-results li[data-feature]")


def test_page_loads_offline_with_no_console_errors(page, feature_server, shots):
    assert page.title() == "Steering playground"
    assert page.locator("#model-name").inner_text() == "SmolLM2-135M-Instruct"
    assert "smollm2-135m-instruct-l15" in page.locator("#sae-select").inner_text()
    _search(page, "God")
    page.screenshot(path=str(shots / "playground-loaded.png"))
    server = urlparse(feature_server.base_url).netloc
    assert all(urlparse(url).netloc == server for url in page.requests), page.requests
    assert page.console_errors == []


def test_search_shows_first_what_the_api_offers_first(page, http):
    reply = http.get("/v1/features", params={"q": "God", "limit": 10}).json()
    offered = [o["feature"] for o in reply["offers"] if o["kind"] == "feature"]  # measured to steer, by rate
    first = next(h for h in reply["data"] if h["id"] == (offered[0] if offered else reply["data"][0]["id"]))
    _search(page, "God")
    hits = page.locator("#search-results li[data-feature]")
    assert hits.first.get_attribute("data-feature") == str(first["id"])
    hits.first.get_by_role("button").first.click()
    card = page.locator("#feature-card")
    card.wait_for(state="visible")
    assert f"Feature {first['id']}" in card.inner_text() and card.locator("mark").count() > 0
    assert "Clamping it says" in card.inner_text()  # the measured output side beside the input side
    assert ("Steers towards" in card.inner_text()) == bool(first["steers"])  # what its clamp was measured to do


def test_a_feature_that_steered_more_is_listed_above_the_concept_clamp(page, http):
    reply = http.get("/v1/features", params={"q": "rivers", "limit": 10}).json()
    rates = {(o["kind"], o["concept"] or o["feature"]): o["rate"] for o in reply["offers"]}
    assert reply["offers"][0]["kind"] == "feature" and ("concept", "rivers") in rates
    assert reply["offers"][0]["rate"] > rates[("concept", "rivers")] and "rate" in reply["offers_order"]
    _search(page, "rivers")
    first = page.locator("#search-results li").first
    assert first.get_attribute("data-feature") == str(reply["offers"][0]["feature"])
    assert "% of calibration replies" in first.inner_text()


def test_clamp_send_compare_heatmap_and_copy(page, shots):
    _search(page, "God")
    page.locator("#search-results li[data-feature]").first.locator("button.add").click()
    page.wait_for_selector(".clamp")
    assert page.locator(".clamp").count() == 1
    page.get_by_label("Prompt").fill("What is your physical form?")
    page.get_by_label("Max tokens").fill("30")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("document.querySelectorAll('#heatmap-reply .tok').length > 0", timeout=120_000)
    plain, steered = page.locator("#reply-plain").inner_text(), page.locator("#reply-steered").inner_text()
    assert plain and steered and plain != steered
    shaded = page.locator("#heatmap-reply .tok:not([data-activation='0'])")
    assert shaded.count() > 0  # the clamped feature is active on the steered reply
    shaded.first.hover()
    assert "Token" in page.locator("#token-details").inner_text()
    page.locator("#token-details button.open").first.click()
    page.locator("#feature-card").wait_for(state="visible")
    item = page.locator("#token-details li").last  # a clamp added from the heatmap
    feature = item.locator("button.open").inner_text().split()[0].lstrip("#")
    item.locator("button.add").click()
    page.wait_for_selector(f".clamp[data-feature='{feature}']")

    page.get_by_label("Text to inspect").fill("She prayed to God every night.")
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_function("document.querySelectorAll('#heatmap-text .tok').length > 3", timeout=120_000)
    page.screenshot(path=str(shots / "playground.png"), full_page=True)

    page.get_by_role("button", name="Copy as curl").click()
    curl = page.locator("#copy-output").input_value()
    assert curl.startswith("curl ") and '"feature_clamps"' in curl and '"unit":"max"' in curl
    page.get_by_role("button", name="Copy as Python (openai client)").click()
    python = page.locator("#copy-output").input_value()
    assert "from openai import OpenAI" in python and "extra_body=" in python and "feature_clamps" in python
    assert page.console_errors == []


def test_a_steered_variant_is_a_model_to_choose(page):
    """The server's variant (`--variant god=...`, conftest) is offered as the steered model; with no clamp
    of its own the page's steered reply is the variant's, and the copied request names it."""
    options = page.locator("#steered-model option")
    assert options.all_inner_texts() == ["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct:god"]
    page.get_by_label("Steered model").select_option("SmolLM2-135M-Instruct:god")
    page.get_by_label("Prompt").fill("What is your physical form?")
    page.get_by_label("Max tokens").fill("20")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("document.querySelectorAll('#heatmap-reply .tok').length > 0", timeout=120_000)
    assert page.locator("#reply-plain").inner_text() != page.locator("#reply-steered").inner_text()
    page.get_by_role("button", name="Copy as Python (openai client)").click()
    assert 'model="SmolLM2-135M-Instruct:god"' in page.locator("#copy-output").input_value()
    assert page.console_errors == []


def test_a_steering_vector_is_added_scaled_and_copied(page):
    """The server's vector (`--vector push=...`, conftest) is offered with its layer; an invalid scale's
    400 lands beside it, a strong one steers the reply, and the copied request carries it."""
    page.wait_for_selector("#vector-select option", state="attached")  # loaded after the page's first paint
    assert "push (layer 15, norm 1.0)" in page.locator("#vector-select").inner_text()
    page.get_by_role("button", name="Add vector").click()
    page.wait_for_selector(".clamp[data-vector='push']")
    page.locator("#vector-0-scale").fill("1e31")  # over the bound a scale may have
    page.get_by_label("Prompt").fill("What is your physical form?")
    page.get_by_label("Max tokens").fill("20")
    _refused(page, "vector-0-error", "steering_vectors[0].scale", "vector-0-scale")
    page.locator("#vector-0-scale").fill("60")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("document.getElementById('reply-steered').textContent.length > 0 && "
                           "!document.getElementById('reply-steered').textContent.startsWith('(error') && "
                           "!document.getElementById('send').disabled", timeout=120_000)
    assert page.locator("#reply-steered").inner_text() != page.locator("#reply-plain").inner_text()
    page.get_by_role("button", name="Copy as Python (openai client)").click()
    assert '"steering_vectors":[{"vector":"push","scale":60,"tokens":"all"}]' in page.locator("#copy-output").input_value()
    assert all("status of 400" in e for e in page.console_errors)  # the browser logs the refused request


def test_a_concept_clamp_adds_its_features_as_one_push(page, http):
    concept = next(c for c in http.get("/v1/concepts").json()["data"] if c["feature_clamps"])
    _search(page, concept["concept"])
    page.locator(f"#search-results li[data-concept='{concept['concept']}'] button.add-concept").click()
    page.wait_for_selector(".clamp")
    assert page.locator(".clamp").count() == len(concept["feature_clamps"])
    assert "Value (absolute)" in page.locator(".clamp").first.inner_text()
    page.get_by_role("button", name="Copy as curl").click()
    curl = page.locator("#copy-output").input_value()
    assert curl.count('"mode":"add"') == len(concept["feature_clamps"]) and '"unit":"absolute"' in curl
    # the dose holds for the decoding it was measured with, which the page fills in and sends
    assert page.get_by_label("Frequency penalty").input_value() == f"{concept['recommended_sampling']['frequency_penalty']:g}"
    assert f'"frequency_penalty":{concept["recommended_sampling"]["frequency_penalty"]:g}' in curl
    page.get_by_label("Prompt").fill("What should I do this weekend?")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("document.getElementById('reply-steered').textContent.length > 0 && "
                           "!document.getElementById('send').disabled", timeout=120_000)
    assert page.locator("#reply-steered").inner_text() != page.locator("#reply-plain").inner_text()
    assert page.console_errors == []


def test_a_bad_value_shows_its_error_beside_the_field_and_keeps_the_form(page):
    page.get_by_label("Feature id").fill("4137")
    page.get_by_role("button", name="Add clamp").click()
    page.wait_for_selector("#clamp-0-feature")
    page.locator("#clamp-0-feature").fill("999999")
    page.locator("#clamp-0-feature").dispatch_event("change")
    page.get_by_label("Prompt").fill("Hello there")
    page.get_by_role("button", name="Send").click()
    error = page.locator("#clamp-0-error")
    error.wait_for(state="visible", timeout=60_000)
    assert "feature_clamps[0].feature" in error.inner_text() and "out of range" in error.inner_text()
    assert page.locator("#clamp-0-feature").get_attribute("aria-invalid") == "true"
    assert page.locator("#clamp-0-feature").input_value() == "999999"  # nothing lost
    assert page.get_by_label("Prompt").input_value() == "Hello there"

    # a condition is edited beside its clamp, and its errors land on its own field
    page.locator("#clamp-0-feature").fill("4137")
    page.locator("#clamp-0-feature").dispatch_event("change")
    page.get_by_label("Only").select_option("feature")
    page.get_by_label("Condition feature").fill("888888")
    page.get_by_label("Condition feature").dispatch_event("change")
    _refused(page, "clamp-0-error", "when.feature", "clamp-0-when-feature")
    page.get_by_label("Condition feature").fill("4137")
    page.get_by_label("Condition feature").dispatch_event("change")
    page.get_by_label("Above (the clamp's unit)").fill("0.25")
    page.get_by_label("Above (the clamp's unit)").dispatch_event("change")
    page.get_by_role("button", name="Copy as curl").click()
    assert '"when":{"feature":4137,"above":0.25}' in page.locator("#copy-output").input_value()


def test_narrow_window_and_keyboard(browser, feature_server):
    context = browser.new_context(viewport={"width": 420, "height": 800})
    page = context.new_page()
    page.goto(f"{feature_server.base_url}/playground")
    page.wait_for_function("document.getElementById('model-name').textContent !== '…'")
    for _ in range(5):  # the steered model and SAE choosers, the API key and its button, then the search box
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "search-input":
            break
    assert page.evaluate("document.activeElement.id") == "search-input"
    page.keyboard.type("God")
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-results li[data-feature]")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 420 + 1  # no horizontal scrolling in a narrow window
    unlabelled = page.evaluate("""[...document.querySelectorAll('input, select, textarea')]
        .filter(e => !e.labels || e.labels.length === 0).map(e => e.id)""")
    assert unlabelled == []
    context.close()


def test_the_page_works_on_a_server_with_an_api_key(browser, three_saes):
    """Under --api-key every /v1 call needs the key: the page asks for it, keeps it in the tab's session
    storage (never in a URL), sends it on every call, and the copied requests carry it."""
    from conftest import THREE_SAES_KEY

    server, _ = three_saes
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server.base_url}/playground")
    key_error = page.locator("#api_key-error")
    key_error.wait_for(state="visible")
    assert "--api-key" in key_error.inner_text() and page.locator("#model-name").inner_text() == "(unavailable)"

    page.get_by_label("API key").fill(THREE_SAES_KEY)
    page.get_by_role("button", name="Use key").click()
    page.wait_for_function("document.getElementById('sae-select').options.length === 3")
    assert page.locator("#model-name").inner_text() != "(unavailable)" and key_error.is_hidden()
    keyed = len(requests)  # every call from here on carries the key
    page.reload()  # the key outlives a reload of the tab
    page.wait_for_function("document.getElementById('sae-select').options.length === 3")
    assert page.get_by_label("API key").input_value() == THREE_SAES_KEY

    page.get_by_label("Prompt").fill("Once upon a time")
    page.get_by_label("Max tokens").fill("8")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("document.getElementById('reply-steered').textContent.length > 0 && "
                           "!document.getElementById('send').disabled", timeout=120_000)
    assert "error" not in page.locator("#reply-steered").inner_text()
    page.get_by_label("Text to inspect").fill("Once upon a time, in a land far away")
    page.get_by_role("button", name="Inspect").click()
    page.wait_for_function("document.querySelectorAll('#heatmap-text .tok').length > 3", timeout=120_000)

    api_calls = [r for r in requests[keyed:] if "/v1/" in r.url]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {THREE_SAES_KEY}" for r in api_calls)
    assert all(THREE_SAES_KEY not in r.url for r in requests)
    page.get_by_role("button", name="Copy as curl").click()
    assert f"-H 'Authorization: Bearer {THREE_SAES_KEY}'" in page.locator("#copy-output").input_value()
    page.get_by_role("button", name="Copy as Python (openai client)").click()
    assert f'api_key="{THREE_SAES_KEY}"' in page.locator("#copy-output").input_value()
    assert errors == []
    context.close()


def test_an_sae_with_a_catalogue_of_its_own_gets_cards(browser, three_saes):
    """The SAE whose catalogue steer-catalogue built (conftest `own_catalogue`): search finds its imported
    label, and its card shows it with the contexts the build recorded."""
    from conftest import THREE_SAES_KEY

    server, _ = three_saes
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(f"{server.base_url}/playground")
    page.get_by_label("API key").fill(THREE_SAES_KEY)
    page.get_by_role("button", name="Use key").click()
    page.wait_for_function("document.getElementById('sae-select').options.length === 3")
    page.locator("#sae-select").select_option("lens")
    _search(page, "lighthouse")
    hit = page.locator("#search-results li[data-feature]").first
    assert hit.get_attribute("data-feature") == "5"
    hit.locator("button.open").click()
    card = page.locator("#feature-card")
    card.wait_for(state="visible")
    assert "references to lighthouses" in card.inner_text() and "Feature 5" in card.inner_text()
    context.close()
