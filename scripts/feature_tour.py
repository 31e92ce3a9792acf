"""From an idea to a steered reply with two HTTP calls: search the catalogue, clamp what it found.
Then inspection ("which features fire on this text?") and `return_features`.

    python scripts/feature_tour.py --query "the sea"            # against a running server (port 8000)
    python scripts/feature_tour.py --query "the sea" --start    # starts server.py itself
Prints a markdown transcript of the exact requests and (trimmed) responses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server  # noqa: E402


def _compact(value: object) -> str:
    """One line per top-level key, one line per list item below it."""
    if isinstance(value, dict):
        return "{\n" + ",\n".join(f" {json.dumps(k)}: {_compact(v)}" for k, v in value.items()) + "\n}"
    if isinstance(value, list) and value:
        return "[\n" + ",\n".join(f"  {json.dumps(v, ensure_ascii=False)}" for v in value) + "\n ]"
    return json.dumps(value, ensure_ascii=False)


def show(title: str, request: str, response: object) -> None:
    print(f"**{title}**\n\n```\n{request}\n```\n```json\n{_compact(response)}\n```\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", default="God")
    p.add_argument("--text", default="Every evening she prayed to God, and she believed that God listened to her.")
    p.add_argument("--question", default="What is your physical form?")
    p.add_argument("--value", type=float, default=None,
                   help="multiples of the feature's max activation (default: the hit's recommended strength, else 3)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start server.py for the tour")
    args = p.parse_args()
    server = Server([], Path("/tmp/steer_tour_server.log")).wait_ready() if args.start else None
    http = httpx.Client(base_url=server.base_url if server else args.base_url, timeout=300)
    try:
        found = http.get("/v1/features", params={"q": args.query, "limit": 3}).json()
        for f in found["data"]:
            f["top_tokens"], f["examples"] = f["top_tokens"][:3], f["examples"][:1]
        show("1. Search the catalogue", f"GET /v1/features?q={args.query}&limit=3", found)
        hit = found["data"][0]
        # The recommended strength holds with its token scope and the decoding it was measured with.
        value = args.value or hit.get("recommended_strength") or 3.0
        sampling = hit.get("recommended_sampling") or {"temperature": 0}
        chat = {"model": "SmolLM2-135M-Instruct", **sampling, "max_tokens": 40,
                "messages": [{"role": "user", "content": args.question}]}
        steered = {**chat, "feature_clamps": [{"feature": hit["id"], "value": value, "unit": "max",
                                               "tokens": hit.get("recommended_tokens") or "all"}]}
        for title, body in (("2. Unsteered", chat), ("2. Steered with the feature found", steered)):
            reply = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            show(title, f"POST /v1/chat/completions {json.dumps(body)}", {"content": reply})

        inspected = http.post("/v1/features/inspect", json={"text": args.text, "top_k": 3, "top_features": 5}).json()
        inspected["tokens"] = [{"token": t["token"], "features": [(f["id"], round(f["activation"], 2), f["label"])
                                                                  for f in t["features"]]}
                               for t in inspected["tokens"] if args.query.lower() in t["token"].lower()]
        show("3. Inspect a text (tokens shown: those containing the query)",
             f"POST /v1/features/inspect {json.dumps({'text': args.text, 'top_k': 3, 'top_features': 5})}", inspected)

        body = {**steered, "max_tokens": 4, "return_features": 2}
        reply = http.post("/v1/chat/completions", json=body).json()["choices"][0]
        show("4. Features of each generated token (`return_features`)", f"POST /v1/chat/completions {json.dumps(body)}",
             {"content": reply["message"]["content"], "features": reply["features"]})
    finally:
        http.close()
        if server:
            server.stop()


if __name__ == "__main__":
    main()
