"""The "Golden Gate" demo: one concept feature (or a concept clamp) clamped, asked about itself and
unrelated things.

    python scripts/demo.py --query bridges                     # the top search hit at its recommended strength
    python scripts/demo.py --concept music --start             # the concept clamp of /v1/concepts?q=music
    python scripts/demo.py --feature 123 --value 10            # against a running server (port 8000)
    python scripts/demo.py --feature 123 --value 10 --start    # starts server.py itself
Prints a markdown transcript, steered and unsteered, with the exact request.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server  # noqa: E402
from steer_plugin.search.concepts import clamps_at

QUESTIONS = ["What is your physical form?", "What did you have for breakfast?", "What is your favourite place?",
             "Tell me about yourself."]
MEASURED_SAMPLING = {"temperature": 0, "frequency_penalty": 0.5}
"""The decoding the shipped SAE's recommendations were measured with (what each one carries as
`recommended_sampling`): sent where the clamped entry has no recommendation of its own."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--feature", type=int)
    which.add_argument("--query", help="clamp the top hit of /v1/features?q=QUERY (as a user of the playground would)")
    which.add_argument("--concept", help="send the clamps of the top hit of /v1/concepts?q=CONCEPT (several features)")
    p.add_argument("--value", type=float, default=None,
                   help="multiples of the feature's max activation (default: its recommended strength, else 3); "
                        "with --concept, the dose (× the stream's median norm; default: the recommended one)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start server.py (eager mode) for the demo")
    p.add_argument("--max-tokens", type=int, default=60)
    args = p.parse_args()
    server = Server(["--enforce-eager"], Path("/tmp/steer_demo_server.log")).wait_ready() if args.start else None
    base_url = server.base_url if server else args.base_url
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
    if args.concept is not None:
        entry, clamps, header = _concept(base_url, args.concept, args.value)
    else:
        entry, clamps, header = _feature(base_url, args.query, args.feature, args.value)
    # The decoding the recommendation was measured with (both replies get it, so only the clamp differs).
    sampling = entry.get("recommended_sampling") or MEASURED_SAMPLING
    print(header + "\n")
    print("```python\nclient.chat.completions.create(model=\"SmolLM2-135M-Instruct\", "
          + "".join(f"{k}={v:g}, " for k, v in sampling.items()) + f"max_tokens={args.max_tokens},\n"
          f"    messages=[{{\"role\": \"user\", \"content\": QUESTION}}],\n"
          f"    extra_body={{\"feature_clamps\": {json.dumps(clamps)}}})\n```\n")
    try:
        for q in QUESTIONS:
            answers = {}
            for name, extra in (("unsteered", None), ("steered", {"feature_clamps": clamps})):
                r = client.chat.completions.create(model="SmolLM2-135M-Instruct", **sampling,
                                                   max_tokens=args.max_tokens, extra_body=extra,
                                                   messages=[{"role": "user", "content": q}])
                answers[name] = r.choices[0].message.content.strip().replace("\n", " ")
            print(f"**{q}**\n- unsteered: {answers['unsteered']}\n- steered: {answers['steered']}\n")
    finally:
        if server:
            server.stop()


def _feature(base_url: str, query: str | None, feature: int | None, value: float | None) -> tuple[dict, list[dict], str]:
    if query is not None:
        entry = httpx.get(f"{base_url}/v1/features", params={"q": query, "limit": 1}).json()["data"][0]
    else:
        entry = httpx.get(f"{base_url}/v1/features/{feature}").json()
    value = value if value is not None else entry.get("recommended_strength") or 3.0
    header = (f"Feature {entry['id']} ({entry['label']}; clamping it says: "
              f"{', '.join(t['token'] for t in entry.get('steered_tokens', [])[:6])}) at {value:g}× max.")
    return entry, [{"feature": entry["id"], "value": value, "unit": "max",
                    "tokens": entry.get("recommended_tokens") or "all"}], header


def _concept(base_url: str, query: str, dose: float | None) -> tuple[dict, list[dict], str]:
    hits = httpx.get(f"{base_url}/v1/concepts", params={"q": query}).json()["data"]
    if not hits:
        raise SystemExit(f"no concept clamp matches {query!r} (GET /v1/concepts lists them)")
    entry = hits[0]
    dose = dose if dose is not None else entry["recommended_dose"]
    if dose is None:
        raise SystemExit(f"concept {entry['concept']!r} has no recommended dose: give one with --value")
    tokens = entry["recommended_tokens"] or "all"
    clamps = clamps_at(entry, dose, tokens)
    header = (f"Concept clamp \"{entry['concept']}\": {len(clamps)} features added together (cosine {entry['cosine']:.2f} "
              f"with the concept's direction) at {dose:g}× the stream's median norm, {tokens} tokens: "
              + ", ".join(f"{f['feature']} {f['label']}" for f in entry["features"][:6]) + ", ...")
    return entry, clamps, header


if __name__ == "__main__":
    main()
