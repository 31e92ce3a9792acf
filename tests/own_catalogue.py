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

NEURONPEDIA = [  # what GET /api/explanation/export returns: one record per explanation
    {"modelId": "tiny-test", "layer": "2-res-tiny", "index": "5", "description": " references to lighthouses",
     "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
    {"modelId": "tiny-test", "layer": "2-res-tiny", "index": "17", "description": "words about the weather",
     "explanationModelName": "claude-3-5-haiku", "typeName": "oai_token-act-pair"},
]
CALIBRATED = (5, 17)
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


def make(model: Path, sae: Path, out: Path) -> dict:
    """Runs the three commands; returns their reports by command."""
    log = out.parent / "steer-catalogue.log"
    labels = out.parent / "explanations.json"
    labels.write_text(json.dumps(NEURONPEDIA))
    engine = ["--model", str(model), "--sae", str(sae)]
    return {
        "build": _run(log, "build", *engine, "--out", str(out), "--max-documents", "48", "--ctx", "128"),
        "import-labels": _run(log, "import-labels", "--catalogue", str(out), str(labels)),
        "calibrate": _run(log, "calibrate", *engine, "--catalogue", str(out),
                          "--features", ",".join(map(str, CALIBRATED)), "--strengths", "2", "--scopes", "all",
                          "--reply-tokens", "8"),
    }
