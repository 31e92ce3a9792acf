"""`steer-catalogue import-labels`: labels people already have, merged into a catalogue.

Read formats (gzip-compressed too, `.gz`):
- Neuronpedia explanation exports: a JSON array of explanation records, or one record per line
  (the bulk dataset files); a record names its feature by `index` and says it in `description`
  (with `explanationModelName`, kept as the label's source: "neuronpedia:<model>");
- a CSV of `index,label` rows (a header row is skipped), source "csv:<file name>".

Each label is added to its feature's `labels` with its source (the same text from the same source
only once, so importing a file again changes nothing) and becomes the label shown; search reads
imported labels as explanations (steer_plugin/search/catalogue.py).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from steer_plugin.search.catalogue import read_entries, write_entries


def _text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")


def _stem_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_labels(path: Path) -> list[tuple[int, str, str]]:
    """(feature, label, source) of every label in the file, in file order."""
    text = _text(path)
    if _stem_suffix(path) == ".csv":
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and not rows[0][0].strip().isdigit():
            rows = rows[1:]  # a header
        labels = []
        for number, row in enumerate(rows, start=1):
            if len(row) < 2 or not row[0].strip().isdigit():
                raise ValueError(f"{path.name}: row {number} is not `index,label`: {row}")
            labels.append((int(row[0]), row[1].strip(), f"csv:{path.name}"))
        return labels
    stripped = text.lstrip()
    records = json.loads(text) if stripped.startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                   if line.strip()]
    labels = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "index" not in record or "description" not in record:
            raise ValueError(f"{path.name}: record {number} is not a Neuronpedia explanation (it needs "
                             "\"index\" and \"description\")")
        explainer = record.get("explanationModelName") or "unknown"
        labels.append((int(record["index"]), str(record["description"]).strip(), f"neuronpedia:{explainer}"))
    return labels


def import_labels(catalogue: Path, path: Path) -> dict:
    """Merges the file's labels into the catalogue in `catalogue` (rewritten in place); returns counts."""
    entries = read_entries(catalogue)
    labels = read_labels(path)
    outside = sorted({f for f, _, _ in labels if not 0 <= f < len(entries)})
    if outside:
        raise ValueError(f"{path.name}: features {outside[:10]} are outside the catalogue's 0..{len(entries) - 1}: "
                         "labels of another SAE?")
    added = 0
    for feature, text, source in labels:
        if not text:
            continue
        entry = entries[feature]
        entry.setdefault("labels", [{"text": entry["label"], "source": "tokens"}])
        if not any(lab["text"] == text and lab["source"] == source for lab in entry["labels"]):
            entry["labels"].append({"text": text, "source": source})
            added += 1
        entry["label"] = text
    write_entries(catalogue, entries)
    return {"read": len(labels), "added": added, "features": len({f for f, _, _ in labels})}
