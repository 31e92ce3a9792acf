"""The "Golden Gate" demo: one concept feature clamped, asked about itself and unrelated things.

    python scripts/demo.py --query bridges                     # the top search hit at its recommended strength
    python scripts/demo.py --feature 123 --value 10            # against a running server (port 8000)
    python scripts/demo.py --feature 123 --value 10 --start    # starts server.py itself
Prints a markdown transcript, steered and unsteered, with the exact request.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import openai

from steer_plugin.server_process import Server

QUESTIONS = ["What is your physical form?", "What did you have for breakfast?", "What is your favourite place?",
             "Tell me about yourself."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--feature", type=int)
    which.add_argument("--query", help="clamp the top hit of /v1/features?q=QUERY (as a user of the playground would)")
    p.add_argument("--value", type=float, default=None,
                   help="multiples of the feature's max activation (default: its recommended strength, else 3)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start server.py (eager mode) for the demo")
    p.add_argument("--max-tokens", type=int, default=60)
    args = p.parse_args()
    server = Server(["--enforce-eager"], Path("/tmp/steer_demo_server.log")).wait_ready() if args.start else None
    base_url = server.base_url if server else args.base_url
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
    if args.query is not None:
        entry = httpx.get(f"{base_url}/v1/features", params={"q": args.query, "limit": 1}).json()["data"][0]
    else:
        entry = httpx.get(f"{base_url}/v1/features/{args.feature}").json()
    value = args.value if args.value is not None else entry.get("recommended_strength") or 3.0
    print(f"Feature {entry['id']} ({entry['label']}; clamping it says: "
          f"{', '.join(t['token'] for t in entry.get('steered_tokens', [])[:6])}) at {value:g}× max.\n")
    clamps = [{"feature": entry["id"], "value": value, "unit": "max", "tokens": entry.get("recommended_tokens") or "all"}]
    print("```python\nclient.chat.completions.create(model=\"SmolLM2-135M-Instruct\", temperature=0, "
          f"max_tokens={args.max_tokens},\n    messages=[{{\"role\": \"user\", \"content\": QUESTION}}],\n"
          f"    extra_body={{\"feature_clamps\": {json.dumps(clamps)}}})\n```\n")
    try:
        for q in QUESTIONS:
            answers = {}
            for name, extra in (("unsteered", None), ("steered", {"feature_clamps": clamps})):
                r = client.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0,
                                                   max_tokens=args.max_tokens, extra_body=extra,
                                                   messages=[{"role": "user", "content": q}])
                answers[name] = r.choices[0].message.content.strip().replace("\n", " ")
            print(f"**{q}**\n- unsteered: {answers['unsteered']}\n- steered: {answers['steered']}\n")
    finally:
        if server:
            server.stop()


if __name__ == "__main__":
    main()
