"""A catalogue made by the user's three commands for an SAE that ships none, in a read-only folder:
`steer-catalogue build` on a slice of the default corpus, `import-labels` from a file in
Neuronpedia's explanation-export format, `calibrate` for two features (the `three_saes` server of
conftest.py serves it with --catalogue)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from steer_plugin.search.catalogue import STOPWORDS, read_entries

NEURONPEDIA = [  # what GET /api/explanation/export returns: one record per explanation
    {"modelId": "tiny-test", "layer": "2-res-tiny", "index": "5", "description": " references to lighthouses",
     "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
    {"modelId": "tiny-test", "layer": "2-res-tiny", "index": "17", "description": "words about the weather",
     "explanationModelName": "claude-3-5-haiku", "typeName": "oai_token-act-pair"},
]
COMMAND = Path(sys.executable).parent / "steer-catalogue"


def read_only_copy(folder: Path, to: Path) -> Path:
    """`folder`'s files copied to `to`, then every write permission taken away (as a shared cache)."""
    to.mkdir(parents=True)
    for f in folder.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
        (to / f.name).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    to.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return to


def _run(log: Path, *args: str) -> dict:
    with log.open("a") as out:
        done = subprocess.run([str(COMMAND), *args], stdout=subprocess.PIPE, stderr=out, text=True, timeout=900,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, f"steer-catalogue {args[0]} failed; see {log}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def worded(entries: list[dict], n: int = 2) -> list[int]:
    """The first n features that fire on words (a reply can be checked for them: what the sweep
    measures a feature by where no concept is named)."""
    def word(token: str) -> bool:
        return len(token) >= 3 and token.isalpha() and token.lower() not in STOPWORDS

    return [e["id"] for e in entries if any(word(t["token"]) for t in e["top_tokens"][:3])][:n]


def make(model: Path, sae: Path, out: Path) -> dict:
    """Runs the three commands; returns their reports by command, and the calibrated features."""
    log = out.parent / "steer-catalogue.log"
    labels = out.parent / "explanations.json"
    labels.write_text(json.dumps(NEURONPEDIA))
    engine = ["--model", str(model), "--sae", str(sae)]
    reports = {"build": _run(log, "build", *engine, "--out", str(out), "--max-documents", "48", "--ctx", "128")}
    reports["import-labels"] = _run(log, "import-labels", "--catalogue", str(out), str(labels))
    features = worded(read_entries(out))
    reports["calibrate"] = _run(log, "calibrate", *engine, "--catalogue", str(out), "--features",
                                ",".join(map(str, features)), "--strengths", "2", "--scopes", "all",
                                "--reply-tokens", "8")
    return reports
