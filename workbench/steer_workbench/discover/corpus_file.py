"""The text a catalogue is built from: a file the user gives, read as documents.

- `.jsonl`: one JSON object per line, its `"text"`, or its `"messages"` (a chat, rendered with the
  model's own chat template, as the model sees conversations);
- anything else: plain text, one document per paragraph (blank lines between documents).

DEFAULT_CORPUS is the chat corpus kept in the repository (replies of SmolLM2-135M-Instruct, an
Apache-2.0 model, to prompts written here): everyday English conversations on a few thousand
topics, small enough to build a catalogue in minutes; a model's own traffic or a larger general
corpus gives better catalogues.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from steer_plugin.core.config import REPO_ROOT

DEFAULT_CORPUS = REPO_ROOT / "corpus" / "chats.jsonl"
_PARAGRAPHS = re.compile(r"\n\s*\n")


def read_documents(path: Path, tokenizer) -> list[str]:
    """The corpus's documents as text, in file order (empty ones left out)."""
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" in record:
                docs.append(record["text"])
            elif "messages" in record:
                docs.append(tokenizer.apply_chat_template(record["messages"], tokenize=False))
            else:
                raise ValueError(f"{path}:{number}: a line needs \"text\" or \"messages\"")
    else:
        docs = _PARAGRAPHS.split(path.read_text())
    return [d for d in (d.strip() for d in docs) if d]


def file_digest(path: Path) -> str:
    """What identifies a corpus file's content (a resumed build must read the same documents)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
