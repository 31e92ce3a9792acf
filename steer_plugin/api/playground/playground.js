"use strict";
// The steering playground. Talks only to this server's public API, with URLs relative to the page
// (so it works under --root-path): /v1/models, /v1/saes, /v1/features..., /v1/chat/completions.

const $ = (id) => document.getElementById(id);
const api = (path) => new URL(`../${path}`, location.href).toString();
const state = {
  model: null,
  sae: null,          // id of the chosen SAE
  clamps: [],         // {sae, feature, label, strength, mode, tokens, when: {kind, feature, above}}
  vectors: [],        // {vector, scale, tokens}
  details: new Map(), // feature id -> catalogue entry
  reply: null,        // steered reply: {tokens: [str], features: [[{id, activation, label}]]}
  text: null,         // inspected text: the same shape
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

// A server started with --api-key wants `Authorization: Bearer KEY` on /v1 routes. The key lives in
// this tab's session storage (gone when the tab closes), never in a URL.
const KEY_STORAGE = "steer-playground-api-key";
const apiKey = () => sessionStorage.getItem(KEY_STORAGE) || "";

function headers() {
  const out = {"Content-Type": "application/json"};
  if (apiKey()) out.Authorization = `Bearer ${apiKey()}`;
  return out;
}

async function request(path, options = {}) {
  const response = await fetch(api(path), {headers: headers(), ...options});
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    showError({param: "api_key", message: apiKey() ? "The server refused this API key." :
      "This server was started with --api-key: enter the key above."});
  }
  return {ok: response.ok, status: response.status, body};
}

// ---------------------------------------------------------------------------------------- errors

function clearErrors() {
  for (const node of document.querySelectorAll(".error")) { node.hidden = true; node.textContent = ""; }
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function showError(error) {
  // Put an API error next to the control it names; the form keeps every value.
  const message = error.message || JSON.stringify(error);
  const param = error.param || "";
  const clamp = /^feature_clamps\[(\d+)\]\.?([\w.]+)?/.exec(message);
  const vector = /^steering_vectors\[(\d+)\]\.?(\w+)?/.exec(message);
  let target = null;
  let control = null;
  if (param === "feature_clamps" && clamp) {
    target = $(`clamp-${clamp[1]}-error`);
    const field = clamp[2] === "value" ? "strength" : (clamp[2] || "feature").replace(".", "-");  // when.above
    control = $(`clamp-${clamp[1]}-${field}`);
  } else if (param === "steering_vectors" && vector) {
    target = $(`vector-${vector[1]}-error`);
    control = $(`vector-${vector[1]}-${vector[2] || "scale"}`);
  } else {
    target = $(`${param}-error`);
    control = document.querySelector(`[data-param="${param}"]`);
  }
  target = target || $("general-error");
  target.textContent = message;
  target.hidden = false;
  if (control) control.setAttribute("aria-invalid", "true");
}

// ---------------------------------------------------------------------------------------- features

async function loadSaes() {
  const models = await request("v1/models");
  state.model = models.ok ? models.body.data[0].id : null;
  $("model-name").textContent = state.model || "(unavailable)";
  // The served model first, then any steered variants (their entries have it as `parent`).
  $("steered-model").replaceChildren(...(models.ok ? models.body.data : []).map((m) => el("option", {value: m.id}, m.id)));
  const saes = await request("v1/saes");
  const select = $("sae-select");
  select.replaceChildren();
  for (const sae of saes.ok ? saes.body.data : []) {
    select.append(el("option", {value: sae.id}, `${sae.id} (layer ${sae.layer}, ${sae.d_sae} features)`));
  }
  state.sae = select.value || null;
  const vectors = await request("v1/vectors");
  $("vector-select").replaceChildren(...(vectors.ok ? vectors.body.data : []).map((v) =>
    el("option", {value: v.name}, `${v.name} (layer ${v.layers.join(", ")}, norm ${v.norms.map((n) => n.toFixed(1)).join(", ")})`)));
}

function conceptItem(concept, rate) {
  const usable = concept.feature_clamps !== null;
  return el("li", {class: "concept", "data-concept": concept.concept},
    el("span", {}, `Concept "${concept.concept}": ${concept.features.length} features` +
                   (usable ? ` at ${concept.recommended_dose} × the stream's norm` : " (no fluent strength found)") +
                   measured(rate)),
    " ", el("button", {type: "button", class: "add-concept", disabled: usable ? null : "",
                       "aria-label": `Add the concept clamp for ${concept.concept}`,
                       onclick: () => addConcept(concept)}, "+ concept clamp"));
}

function featureItem(hit, rate) {
  return el("li", {"data-feature": hit.id},
    el("button", {type: "button", class: "open", onclick: () => openCard(hit.id)}, `#${hit.id} ${hit.label}`),
    measured(rate), " ",
    el("button", {type: "button", class: "add", "aria-label": `Add feature ${hit.id} as a clamp`,
                  onclick: () => addClamp(hit.id)}, "+ clamp"));
}

function measured(rate) {
  return rate === undefined ? "" : ` (steered ${Math.round(rate * 100)} % of calibration replies)`;
}

async function search(query) {
  const result = await request(`v1/features?q=${encodeURIComponent(query)}&limit=10&${saeQuery()}`);
  const list = $("search-results");
  list.replaceChildren();
  if (!result.ok) return showError(result.body.error || result.body);
  const {concepts = [], data, offers = []} = result.body;
  // What was measured to steer towards the query comes first, by that measurement (the reply's
  // offers_order); then the other concept clamps and features in search order.
  for (const offer of offers) {
    list.append(offer.kind === "concept" ? conceptItem(concepts.find((c) => c.concept === offer.concept), offer.rate)
                                         : featureItem(data.find((h) => h.id === offer.feature), offer.rate));
  }
  const offered = (kind, key) => offers.some((o) => o.kind === kind && o[kind] === key);
  for (const concept of concepts) if (!offered("concept", concept.concept)) list.append(conceptItem(concept));
  for (const hit of data) if (!offered("feature", hit.id)) list.append(featureItem(hit));
  if (!data.length) list.append(el("li", {}, "No feature matches."));
}

function saeQuery() {
  return state.sae ? `sae=${encodeURIComponent(state.sae)}` : "";
}

async function detail(id) {
  const key = `${state.sae}:${id}`;  // feature ids are per SAE
  if (!state.details.has(key)) {
    const result = await request(`v1/features/${id}?${saeQuery()}`);
    if (!result.ok) { showError(result.body.error || {message: result.body.detail || "unknown feature"}); return null; }
    state.details.set(key, result.body);
  }
  return state.details.get(key);
}

function context(text) {
  // Catalogue contexts mark the activating token «like this».
  const node = el("blockquote");
  text.split(/(«[^»]*»)/).forEach((part) => {
    node.append(part.startsWith("«") ? el("mark", {}, part.slice(1, -1)) : part);
  });
  return node;
}

async function openCard(id) {
  const entry = await detail(id);
  if (!entry) return;
  const card = $("feature-card");
  const tops = entry.top_tokens.map((t) => `${t.token} (${t.count})`).join(", ");
  const facts = el("dl", {},
    el("dt", {}, "Max activation"), el("dd", {}, entry.max_activation.toFixed(3)),
    el("dt", {}, "Frequency"), el("dd", {}, `${(100 * entry.frequency).toFixed(3)} %`),
    el("dt", {}, "Fires on"), el("dd", {}, tops));
  if (entry.steered_tokens && entry.steered_tokens.length) {
    facts.append(el("dt", {}, "Clamping it says"), el("dd", {}, entry.steered_tokens.map((t) => t.token).join(", ")));
  }
  if (entry.output_tokens && entry.output_tokens.length) {
    facts.append(el("dt", {}, "Promotes"), el("dd", {}, entry.output_tokens.map((t) => t.token).join(", ")));
  }
  if (entry.recommended_strength !== undefined && entry.recommended_strength !== null) {
    const scope = entry.recommended_tokens && entry.recommended_tokens !== "all" ? `, ${entry.recommended_tokens} tokens` : "";
    facts.append(el("dt", {}, "Recommended strength"), el("dd", {}, `${entry.recommended_strength} × max${scope}`));
  }
  if (entry.steers && entry.steers.length) {
    const steers = entry.steers.map((c) => `${c.concept} (${Math.round(100 * c.rate)} % of replies)`).join(", ");
    facts.append(el("dt", {}, "Steers towards"), el("dd", {}, steers));
  }
  card.replaceChildren(el("h3", {id: "card-title"}, `Feature ${entry.id}: ${entry.label}`), facts,
    el("h4", {}, "Where it fires"), ...entry.top_contexts.map((c) => context(c.text)),
    el("button", {type: "button", onclick: () => addClamp(entry.id)}, "Add as clamp"));
  card.hidden = false;
}

// ---------------------------------------------------------------------------------------- clamps

async function addClamp(id) {
  id = Number(id);
  if (!Number.isInteger(id) || id < 0) return;
  if (!state.clamps.some((c) => c.feature === id && c.sae === state.sae)) {
    const entry = state.details.get(`${state.sae}:${id}`) || (await request(`v1/features/${id}?${saeQuery()}`)).body;
    const strength = entry && entry.recommended_strength ? entry.recommended_strength : 3;
    const tokens = entry && entry.recommended_tokens ? entry.recommended_tokens : "all";
    state.clamps.push({sae: state.sae, feature: id, label: entry && entry.label ? entry.label : "", strength,
                       mode: "set", tokens});
    if (entry) useSampling(entry.recommended_sampling);
  }
  if (!$("heat-feature").value) $("heat-feature").value = id;
  renderClamps();
}

function addConcept(concept) {
  // A concept clamp is several features added together (mode add, absolute values): see /v1/concepts.
  const labels = new Map(concept.features.map((f) => [f.feature, f.label]));
  for (const c of concept.feature_clamps) {
    state.clamps = state.clamps.filter((k) => !(k.feature === c.feature && k.sae === c.sae));
    state.clamps.push({sae: c.sae, feature: c.feature, label: labels.get(c.feature) || "", strength: c.value,
                       mode: c.mode, unit: c.unit, tokens: c.tokens});
  }
  useSampling(concept.recommended_sampling);
  renderClamps();
}

function useSampling(sampling) {
  // A recommended strength holds for the decoding it was measured with: fill that in.
  if (!sampling) return;
  if (sampling.temperature !== undefined) $("temperature").value = sampling.temperature;
  $("frequency-penalty").value = sampling.frequency_penalty || 0;
}

function renderClamps() {
  const box = $("clamps");
  box.replaceChildren();
  state.clamps.forEach((clamp, i) => {
    const sync = (value) => { clamp.strength = Number(value); slider.value = value; number.value = value; };
    const slider = el("input", {id: `clamp-${i}-slider`, type: "range", min: "-10", max: "10", step: "0.1",
                                value: clamp.strength, oninput: (e) => sync(e.target.value)});
    const number = el("input", {id: `clamp-${i}-strength`, type: "number", step: "0.1", value: clamp.strength,
                                oninput: (e) => sync(e.target.value)});
    const feature = el("input", {id: `clamp-${i}-feature`, type: "number", step: "1", value: clamp.feature,
                                 onchange: (e) => { clamp.feature = Number(e.target.value); }});
    const mode = el("select", {id: `clamp-${i}-mode`, onchange: (e) => { clamp.mode = e.target.value; }},
      ...["set", "add", "scale"].map((m) => el("option", {value: m}, m)));
    mode.value = clamp.mode;
    const tokens = el("select", {id: `clamp-${i}-tokens`, onchange: (e) => { clamp.tokens = e.target.value; }},
      ...["all", "prompt", "generated"].map((t) => el("option", {value: t}, t)));
    tokens.value = clamp.tokens;
    // A conditional clamp acts only where a feature of its SAE is above a threshold (see spec.ClampCondition).
    clamp.when = clamp.when || {kind: "always", feature: clamp.feature, above: 0};
    const whenFeature = el("input", {id: `clamp-${i}-when-feature`, type: "number", step: "1", min: "0",
                                     value: clamp.when.feature, disabled: clamp.when.kind !== "feature",
                                     onchange: (e) => { clamp.when.feature = Number(e.target.value); }});
    const whenAbove = el("input", {id: `clamp-${i}-when-above`, type: "number", step: "0.1",
                                   value: clamp.when.above, disabled: clamp.when.kind !== "feature",
                                   onchange: (e) => { clamp.when.above = Number(e.target.value); }});
    const when = el("select", {id: `clamp-${i}-when`, onchange: (e) => {
      clamp.when.kind = e.target.value;
      whenFeature.disabled = whenAbove.disabled = e.target.value !== "feature";
    }}, el("option", {value: "always"}, "always"), el("option", {value: "active"}, "where this feature is active"),
        el("option", {value: "feature"}, "where a feature is above a threshold"));
    when.value = clamp.when.kind;
    box.append(el("div", {class: "clamp", "data-feature": clamp.feature},
      el("div", {class: "title"}, `${clamp.sae ? clamp.sae + " " : ""}#${clamp.feature} ${clamp.label}`),
      el("div", {}, el("label", {for: `clamp-${i}-feature`}, "Feature"), feature),
      el("div", {}, el("label", {for: `clamp-${i}-slider`}, clamp.unit === "absolute" ? "Value (absolute)" : "Strength (× max)"), slider),
      el("div", {}, el("label", {for: `clamp-${i}-strength`}, "Strength value"), number),
      el("div", {}, el("label", {for: `clamp-${i}-mode`}, "Mode"), mode),
      el("div", {}, el("label", {for: `clamp-${i}-tokens`}, "Tokens"), tokens),
      el("div", {}, el("label", {for: `clamp-${i}-when`}, "Only"), when),
      el("div", {}, el("label", {for: `clamp-${i}-when-feature`}, "Condition feature"), whenFeature),
      el("div", {}, el("label", {for: `clamp-${i}-when-above`}, "Above (the clamp's unit)"), whenAbove),
      el("button", {type: "button", "aria-label": `Remove clamp on feature ${clamp.feature}`,
                    onclick: () => { state.clamps.splice(i, 1); renderClamps(); }}, "Remove"),
      el("span", {id: `clamp-${i}-error`, class: "error", role: "alert", hidden: ""})));
  });
}

function renderVectors() {
  const box = $("vectors");
  box.replaceChildren();
  state.vectors.forEach((vector, i) => {
    const scale = el("input", {id: `vector-${i}-scale`, type: "number", step: "0.1", value: vector.scale,
                               oninput: (e) => { vector.scale = Number(e.target.value); }});
    const tokens = el("select", {id: `vector-${i}-tokens`, onchange: (e) => { vector.tokens = e.target.value; }},
      ...["all", "prompt", "generated"].map((t) => el("option", {value: t}, t)));
    tokens.value = vector.tokens;
    box.append(el("div", {class: "clamp", "data-vector": vector.vector},
      el("div", {class: "title"}, `Vector ${vector.vector}`),
      el("div", {}, el("label", {for: `vector-${i}-scale`}, "Scale"), scale),
      el("div", {}, el("label", {for: `vector-${i}-tokens`}, "Vector tokens"), tokens),
      el("button", {type: "button", "aria-label": `Remove vector ${vector.vector}`,
                    onclick: () => { state.vectors.splice(i, 1); renderVectors(); }}, "Remove"),
      el("span", {id: `vector-${i}-error`, class: "error", role: "alert", hidden: ""})));
  });
}

function addVector(name) {
  if (name && !state.vectors.some((v) => v.vector === name)) state.vectors.push({vector: name, scale: 1, tokens: "all"});
  renderVectors();
}

function clampSpec() {
  return state.clamps.map((c) => ({...(c.sae ? {sae: c.sae} : {}), feature: c.feature, value: c.strength,
                                   mode: c.mode, ...(c.mode === "scale" ? {} : {unit: c.unit || "max"}), tokens: c.tokens,
                                   ...condition(c.when)}));
}

function condition(when) {
  if (!when || when.kind === "always") return {};
  return {when: when.kind === "active" ? "active" : {feature: when.feature, above: when.above}};
}

// ---------------------------------------------------------------------------------------- compare

function chatBody(steered) {
  const model = steered ? $("steered-model").value || state.model : state.model;
  const body = {model, messages: [{role: "user", content: $("prompt").value}],
                temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
                frequency_penalty: Number($("frequency-penalty").value), stream: true};
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if (steered) body.feature_clamps = clampSpec();
  if (steered && state.vectors.length) body.steering_vectors = state.vectors.map((v) => ({...v}));
  return body;
}

async function stream(body, out, collect) {
  // Streams one chat request into `out`; returns false (after showing the error) on an API error.
  out.textContent = "";
  const response = await fetch(api("v1/chat/completions"), {method: "POST", body: JSON.stringify(body),
                                                           headers: headers()});
  if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    showError(response.status === 401 ? {param: "api_key", message: "The server refused the request: check the API key."}
                                       : error.error || {message: `HTTP ${response.status}`});
    out.textContent = "(error: see the highlighted field)";
    return false;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { showError(chunk.error); return false; }
      if (chunk.object === "steer.features") { if (collect) collect.features = chunk.features; continue; }
      for (const choice of chunk.choices || []) {
        out.textContent += (choice.delta && choice.delta.content) || "";
        if (collect && choice.logprobs && choice.logprobs.content) {
          for (const t of choice.logprobs.content) collect.tokens.push(t.token);
        }
      }
    }
  }
  return true;
}

async function send() {
  clearErrors();
  const features = state.sae ? {top_k: 5, sae: state.sae} : 5;
  const steered = {...chatBody(true), return_features: features, logprobs: true};
  const collect = {tokens: [], features: []};
  $("send").disabled = true;
  try {
    const [, ok] = await Promise.all([stream(chatBody(false), $("reply-plain"), null),
                                      stream(steered, $("reply-steered"), collect)]);
    if (ok) {
      state.reply = {tokens: collect.tokens,
                     features: collect.tokens.map((_, i) => (collect.features.find((f) => f.index === i) || {}).features || [])};
      await renderHeatmap("heatmap-reply", state.reply);
    }
  } finally {
    $("send").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------- heatmap

async function renderHeatmap(id, data) {
  const box = $(id);
  box.replaceChildren();
  if (!data) return;
  const chosen = Number($("heat-feature").value);
  const entry = Number.isInteger(chosen) && $("heat-feature").value !== "" ? await detail(chosen) : null;
  const top = entry ? entry.max_activation : 1;
  data.tokens.forEach((token, i) => {
    const features = data.features[i] || [];
    const hit = features.find((f) => f.id === chosen);
    const alpha = hit ? Math.min(1, hit.activation / Math.max(top, 1e-6)) : 0;
    const span = el("span", {class: "tok", tabindex: "0", "data-activation": hit ? hit.activation.toFixed(3) : "0",
                             style: `background: rgba(255, 140, 0, ${alpha.toFixed(3)})`,
                             "aria-label": `${token}: ${hit ? hit.activation.toFixed(2) : 0}`}, token);
    const show = () => showToken(token, features);
    span.addEventListener("mouseenter", show);
    span.addEventListener("focus", show);
    box.append(span);
  });
}

function showToken(token, features) {
  const list = el("ul");
  for (const f of features) {
    list.append(el("li", {}, el("button", {type: "button", class: "open", onclick: () => openCard(f.id)},
      `#${f.id} ${f.label || ""}`), ` ${f.activation.toFixed(2)} `,
      el("button", {type: "button", class: "add", "aria-label": `Add feature ${f.id} as a clamp`,
                    onclick: () => addClamp(f.id)}, "+ clamp")));
  }
  $("token-details").replaceChildren(el("h3", {}, `Token “${token}”`),
    features.length ? list : el("p", {class: "hint"}, "No active feature."));
}

async function inspect() {
  clearErrors();
  const result = await request("v1/features/inspect", {method: "POST",
    body: JSON.stringify({text: $("inspect-text").value, top_k: 5, ...(state.sae ? {sae: state.sae} : {})})});
  if (!result.ok) return showError(result.body.error || {message: JSON.stringify(result.body)});
  state.text = {tokens: result.body.tokens.map((t) => t.token), features: result.body.tokens.map((t) => t.features)};
  if (!$("heat-feature").value && result.body.top_features.length) $("heat-feature").value = result.body.top_features[0].id;
  await renderHeatmap("heatmap-text", state.text);
}

// ---------------------------------------------------------------------------------------- copy

function steeredRequest() {
  const body = chatBody(true);
  delete body.stream;
  return body;
}

function curl() {
  const json = JSON.stringify(steeredRequest()).replaceAll("'", "'\\''");
  const key = apiKey() ? ` -H 'Authorization: Bearer ${apiKey().replaceAll("'", "'\\''")}'` : "";
  return `curl ${api("v1/chat/completions")} -H 'Content-Type: application/json'${key} -d '${json}'`;
}

function python() {
  const body = steeredRequest();
  const extra = {feature_clamps: body.feature_clamps, ...(body.steering_vectors ? {steering_vectors: body.steering_vectors} : {})};
  delete body.feature_clamps;
  delete body.steering_vectors;
  const args = Object.entries(body).map(([k, v]) => `    ${k}=${JSON.stringify(v)},`).join("\n");
  return ["from openai import OpenAI", "",
          `client = OpenAI(base_url=${JSON.stringify(api("v1"))}, api_key=${JSON.stringify(apiKey() || "none")})`,
          "reply = client.chat.completions.create(", args,
          `    extra_body=${JSON.stringify(extra)},`, ")", "print(reply.choices[0].message.content)"].join("\n");
}

async function copy(text) {
  const out = $("copy-output");
  out.value = text;
  out.hidden = false;
  try { await navigator.clipboard.writeText(text); } catch (e) { /* the text box still shows it */ }
}

// ---------------------------------------------------------------------------------------- wiring

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); search($("search-input").value); });
$("add-clamp-form").addEventListener("submit", (e) => { e.preventDefault(); addClamp($("add-clamp-id").value); });
$("add-vector-form").addEventListener("submit", (e) => { e.preventDefault(); addVector($("vector-select").value); });
$("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
$("inspect-form").addEventListener("submit", (e) => { e.preventDefault(); inspect(); });
$("copy-curl").addEventListener("click", () => copy(curl()));
$("copy-python").addEventListener("click", () => copy(python()));
$("heat-feature").addEventListener("change", () => {
  renderHeatmap("heatmap-reply", state.reply);
  renderHeatmap("heatmap-text", state.text);
});
$("sae-select").addEventListener("change", (e) => { state.sae = e.target.value; });
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  clearErrors();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
  loadSaes();
});
$("api-key").value = apiKey();
loadSaes();
