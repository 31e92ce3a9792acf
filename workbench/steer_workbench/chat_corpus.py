"""The model's own chat replies as SAE training text: varied user prompts answered offline by vLLM.

Steering acts on chat traffic, so the SAE must see what the model writes when it answers people.
Prompts are built from templates (questions, how-tos, advice, stories, poems, emails, code,
comparisons, opinions) filled with topics from the packaged sources: Wikipedia article titles and
an everyday list. A quarter of the conversations get a second user turn (a follow-up about the
first reply). Replies come from vLLM with the plugin off, sampled (temperature 0.8), in large
batches; each batch is appended to `chats.jsonl` as it finishes, so an interrupted run resumes
where it stopped (`--conversations` can also be raised later). Generated text cannot be rebuilt
from packages, so the file of record is the repository's `corpus/chats.jsonl`: raising
`--conversations` extends it.

    python -m steer_workbench.chat_corpus --conversations 6000
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from steer_plugin.core.config import REPO_ROOT, default_model_dir
from steer_workbench.corpus import wiki_leads
from steer_workbench.offline_engine import offline_llm

CHATS_FILE = "chats.jsonl"
CHATS_DIR = REPO_ROOT / "corpus"

EVERYDAY = (
    "cooking pasta", "baking bread", "a vegetarian dinner", "coffee", "tea", "chocolate", "pizza", "breakfast",
    "dogs", "cats", "gardening", "houseplants", "birds", "the ocean", "mountains", "rain", "winter", "summer",
    "running", "yoga", "swimming", "football", "chess", "cycling", "sleep", "stress", "friendship", "moving house",
    "a job interview", "saving money", "a budget", "learning a language", "studying for exams", "public speaking",
    "travelling to Japan", "a weekend in Paris", "camping", "a road trip", "flying with children", "the weather",
    "music", "the guitar", "painting", "photography", "movies", "books", "poetry", "video games", "space",
    "the moon", "volcanoes", "dinosaurs", "robots", "computers", "the internet", "smartphones", "electric cars",
    "trains", "bicycles", "climate change", "recycling", "solar power", "history", "ancient Rome", "pirates",
    "castles", "birthdays", "weddings", "a dinner party", "a thank-you note", "apologising to a friend",
    "time management", "a morning routine", "cleaning the kitchen", "fixing a leaky tap", "painting a room",
    "first aid", "a cold", "healthy eating", "drinking water", "walking", "meditation", "happiness", "kindness",
    "the colour blue", "trees", "forests", "rivers", "bridges", "cities", "New York", "London", "the desert",
)
"""Topics a person might bring up any day (beside the Wikipedia titles)."""

TEMPLATES = (
    "What is {t}?", "Tell me about {t}.", "Explain {t} to a ten-year-old.", "Give me three tips about {t}.",
    "What are the pros and cons of {t}?", "Write a short poem about {t}.", "Write a short story about {t}.",
    "Write a friendly email to a colleague about {t}.", "What should a beginner know about {t}?",
    "Why do people care about {t}?", "Can you summarise the history of {t}?", "What is your opinion of {t}?",
    "List five interesting facts about {t}.", "How do I get started with {t}?", "Describe {t} in one paragraph.",
    "What are common mistakes people make with {t}?", "Write a tweet about {t}.", "Compare {t} and {u}.",
    "Which is better, {t} or {u}? Explain briefly.", "I'm bored. Suggest something to do involving {t}.",
    "Write a Python function related to {t}, with a docstring.", "Make a short quiz with three questions about {t}.",
    "Give me a step-by-step plan for {t}.", "Write a haiku about {t}.", "What would a world without {t} look like?",
    "My friend loves {t}. What gift should I buy?", "Write a product description for something about {t}.",
    "Answer in two sentences: what is {t}?", "Hi! Can you help me understand {t}?",
    "Write a dialogue between two people discussing {t}.",
)
"""User turns; {t} and {u} are topics."""

FOLLOW_UPS = (
    "Can you tell me more?", "Summarise that in one sentence.", "Why is that?", "Can you give an example?",
    "Thanks! What should I read next?", "Make it shorter, please.", "Now explain it like I'm an expert.",
    "That's interesting. What else should I know?", "Can you put that in a list?", "Is that really true?",
)
"""Second user turns of multi-turn conversations."""


@dataclass(frozen=True)
class ChatPlan:
    """One conversation to generate: its id, first user turn and optional follow-up."""

    id: int
    prompt: str
    follow_up: str | None


def plan_conversations(n: int, seed: int = 0, multi_turn: float = 0.25) -> list[ChatPlan]:
    """n conversations, deterministic for a seed; topics drawn half everyday, half Wikipedia titles."""
    rng = random.Random(seed)
    titles = sorted(lead["title"] for lead in wiki_leads())

    def topic() -> str:
        return rng.choice(EVERYDAY) if rng.random() < 0.5 else rng.choice(titles)

    plans = []
    for i in range(n):
        prompt = rng.choice(TEMPLATES).format(t=topic(), u=topic())
        follow = rng.choice(FOLLOW_UPS) if rng.random() < multi_turn else None
        plans.append(ChatPlan(i, prompt, follow))
    return plans


def done_ids(path: Path) -> set[int]:
    """Conversations already in the file (complete lines only: a line cut by an interruption is ignored)."""
    if not path.exists():
        return set()
    ids = set()
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            continue
    return ids


def _drop_cut_line(path: Path) -> None:
    """Remove a last line left without its newline by an interruption, so appending starts clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def generate(out: Path, plans: list[ChatPlan], model_dir: str, batch: int = 256, max_tokens: int = 384,
             seed: int = 0, own_process: bool = False) -> Path:
    """Answer the plans not yet in out/chats.jsonl with the model (plugin off), batch by batch
    (`own_process`: see offline_engine)."""
    from vllm import SamplingParams

    out.mkdir(parents=True, exist_ok=True)
    path = out / CHATS_FILE
    _drop_cut_line(path)
    todo = [p for p in plans if p.id not in done_ids(path)]
    if not todo:
        return path
    # The unsteered model (a process the plugin is already loaded into leaves unclamped tokens as they are).
    llm = offline_llm(model_dir, plugin=False, kv_cache_gib=4, own_process=own_process, max_model_len=2048, seed=seed)
    # One sampler seeded by the engine: vLLM's CPU build fails per-request seeds when a prompt's
    # prefill is split over steps ("CPU Generator does not use offset"). The file is the corpus of record.
    sampling = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens)
    try:
        with path.open("a") as sink, tqdm(total=len(todo), desc="chat replies", unit="conv") as bar:
            for start in range(0, len(todo), batch):
                part = todo[start:start + batch]
                convs = [[{"role": "user", "content": p.prompt}] for p in part]
                _answer(llm, convs, sampling)
                second = [(p, c) for p, c in zip(part, convs) if p.follow_up]
                for p, c in second:
                    c.append({"role": "user", "content": p.follow_up})
                if second:
                    _answer(llm, [c for _, c in second], sampling)
                for p, c in zip(part, convs):
                    sink.write(json.dumps({"id": p.id, "messages": c}, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(len(part))
    finally:
        llm.llm_engine.engine_core.shutdown()
    return path


def _answer(llm, conversations: list[list[dict]], params: list) -> None:
    """Append the model's reply to each conversation."""
    outputs = llm.chat(conversations, params, use_tqdm=False)
    for conv, output in zip(conversations, outputs):
        conv.append({"role": "assistant", "content": output.outputs[0].text.strip()})


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CHATS_DIR)
    p.add_argument("--conversations", type=int, default=6000)
    p.add_argument("--model-dir", default=str(default_model_dir()))
    p.add_argument("--batch", type=int, default=256, help="conversations per vLLM batch (one checkpoint each)")
    p.add_argument("--max-tokens", type=int, default=384, help="most tokens per reply")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return generate(args.out, plan_conversations(args.conversations, args.seed), args.model_dir, args.batch,
                    args.max_tokens, args.seed, own_process=True)


if __name__ == "__main__":
    main()
