"""Conditional clamps, a steering vector and a steered variant on the default model, with the receipt.

    python scripts/steering_tour.py --start     # builds the vector if missing, starts server.py with it
Prints a markdown transcript of the exact requests and replies (greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test harness that starts server.py
from server_process import Server  # noqa: E402
from steer_plugin.core.config import default_model_dir  # noqa: E402

SAMPLING = {"temperature": 0, "frequency_penalty": 0.5, "max_tokens": 40}
RELIGION = 1924
"""The shipped catalogue's "church / religious / priest" feature (README's example)."""
MEDIAN_NORM = 167.0
"""Median norm of the stream at layer 15 (docs/reports/layer-scan-2026-12-04.md): a vector steers
fluently at about 0.25 times it."""


def ask(client, question: str, model: str = "SmolLM2-135M-Instruct", **extra) -> tuple[str, dict | None]:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           extra_body=extra or None, **SAMPLING)
    return reply.choices[0].message.content.replace("\n", " "), (reply.model_extra or {}).get("steering")


def show(client, title: str, question: str, model: str = "SmolLM2-135M-Instruct", **extra) -> None:
    text, receipt = ask(client, question, model, **extra)
    print(f"**{title}** (`model={model!r}`{', ' + json.dumps(extra) if extra else ''})\n")
    print(f"> {question}\n\n{text}\n")
    if receipt is not None:
        print(f"receipt: {receipt['clamps']} clamps, {receipt['vectors']} vectors, canonical "
              f"`{json.dumps(receipt['canonical'])}`\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vector", type=Path, default=Path(tempfile.gettempdir()) / "steer_tour_sea.gguf")
    p.add_argument("--doses", default="0.15,0.25", help="added norm, in multiples of the stream's median norm")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--start", action="store_true", help="start server.py (with the vector and a variant)")
    args = p.parse_args()
    build = [sys.executable, "-m", "steer_workbench.vectors", "--model", str(default_model_dir()),
             "--concept", "sea:sea,ocean,beach,wave,coast", "--out", str(args.vector)]
    if not args.vector.exists():
        import subprocess

        subprocess.run(build, check=True, stdout=sys.stderr)
    from steer_plugin.core.vectors import load_vector

    norm = float(np.linalg.norm(load_vector("sea", args.vector).directions[15]))
    scales = [round(float(d) * MEDIAN_NORM / norm, 2) for d in args.doses.split(",")]
    variant = Path(tempfile.gettempdir()) / "steer_tour_seaside.json"
    variant.write_text(json.dumps({"steering_vectors": [{"vector": "sea", "scale": scales[-1]}],
                                   "sampling": {"frequency_penalty": 0.5}}))
    server = Server(["--vector", f"sea={args.vector}", "--variant", f"seaside={variant}"],
                    Path("/tmp/steer_tour_server.log")).wait_ready() if args.start else None
    try:
        client = openai.OpenAI(base_url=f"{(server.base_url if server else args.base_url)}/v1", api_key="none")
        print(f"Vector built with `python {' '.join(build[1:])}` (middle layer, 15 of 30; norm {norm:.1f}, "
              f"so scales {scales} add {args.doses} times the stream's median norm there).\n")
        print("### A conditional clamp\n")
        clamp = {"feature": RELIGION, "value": 3, "unit": "max", "tokens": "prompt"}
        for question in ("What is your physical form?", "Tell me about the old church in our village."):
            show(client, "Unsteered", question)
            show(client, "Clamped everywhere", question, feature_clamps=[clamp])
            show(client, "Clamped only where the feature is active", question,
                 feature_clamps=[{**clamp, "when": "active"}])
        print("### A steering vector\n")
        question = "What should I do this weekend?"
        show(client, "Unsteered", question)
        for scale in scales:
            show(client, f"Vector at scale {scale}", question, steering_vectors=[{"vector": "sea", "scale": scale}])
        show(client, "Scale 0 (identity)", question, steering_vectors=[{"vector": "sea", "scale": 0}])
        print("### A steered variant (no extra fields: a plain client picks the model)\n")
        show(client, "Variant", question, model="SmolLM2-135M-Instruct:seaside")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
