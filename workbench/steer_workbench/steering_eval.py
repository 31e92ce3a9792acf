"""Steered replies and how they are judged: shared by the strength sweep, the efficacy run and the
comparison with prompting and steering vectors.

Replies come from the real engine: an offline `vllm.LLM` with the plugin, greedy with a frequency
penalty (`DECODING`), each request with its own clamps. Each reply is judged by
- `mentions`: does it name the concept (a keyword, or its plural, as a whole word);
- `distinct_trigrams`: the share of its word trigrams that are distinct (1.0: no repetition;
  steered small models loop: "the perfect meal, the perfect meal, ...");
- `perplexity` under the unsteered model given the question: fluency as the model itself sees it;
- `answers`: whether the reply still answers the question, by pointwise mutual information: its mean
  per-token log-likelihood under the unsteered model given its own question minus that given another
  prompt of the set. An answer is more likely after its question than after an unrelated one; a reply
  that ignores the question (talks only of the concept) is not, so the share with PMI > 0 measures
  how often steering kept the answer on the question. No judge model is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from steer_plugin.core.files import replaced_on_success
from steer_plugin.core.sae import CFG_FILENAME, STATS_FILENAME, WEIGHTS_FILENAME
from steer_workbench.offline_engine import offline_llm

_WORDS = re.compile(r"[a-z']+")


def count_mentions(text: str, keywords: list[str]) -> int:
    """How often the text names a keyword (or its plural) as a whole word (never, for no keywords:
    an empty alternation would match everywhere)."""
    if not keywords:
        return 0
    return len(re.findall(r"\b(?:" + "|".join(map(re.escape, keywords)) + r")(?:s|es)?\b", text.lower()))


def mentions(text: str, keywords: list[str]) -> bool:
    return count_mentions(text, keywords) > 0


def mention_rate(judged: list, keywords: list[str]) -> float:
    """Share of the replies naming one of the keywords (a cell's concept rate)."""
    return sum(mentions(j.text, keywords) for j in judged) / len(judged)


def distinct_trigrams(text: str) -> float:
    words = _WORDS.findall(text.lower())
    grams = list(zip(words, words[1:], words[2:]))
    return len(set(grams)) / len(grams) if grams else 1.0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@dataclass(frozen=True)
class Job:
    """One request: a user turn, the clamps it carries (None: unsteered) and the positions they act
    on, and optionally an instruction appended to the user turn (prompting instead of steering; the
    reply is judged against the plain question)."""

    prompt: str
    clamps: tuple[tuple, ...] | None = None
    """(sae id, feature, value, unit) clamps in mode `set`, or (sae id, feature, value, unit, mode)."""
    instruction: str | None = None
    tokens: str = "all"
    """The clamps' `tokens` scope: all, prompt or generated."""
    max_tokens: int | None = None
    """Reply length; None: the bench's."""
    history: tuple[tuple[str, str], ...] = ()
    """Earlier turns, (role, content), before the user turn: a clamp on the `all` or `prompt` scope
    acts on their positions too, as it does on a chat request's."""

    def messages(self, question: str | None = None) -> list[dict]:
        """The conversation sent (question None) or the one a reply is judged in (the plain question)."""
        if question is None:
            question = f"{self.prompt} {self.instruction}" if self.instruction else self.prompt
        return [{"role": role, "content": content} for role, content in self.history] + [{"role": "user", "content": question}]


def feature_jobs(prompts, sae_id: str, feature: int, strength: float, tokens: str = "all",
                 max_tokens: int | None = None) -> list[Job]:
    """The prompts, each with one feature clamped (`set`) at `strength` × its max on a token scope."""
    return [Job(p, ((sae_id, feature, strength, "max"),), tokens=tokens, max_tokens=max_tokens) for p in prompts]


@dataclass
class Judged:
    """A reply and its measures (see the module docstring); None: not judged yet (`Bench.run`)."""

    text: str
    perplexity: float | None
    pmi: float | None
    trigrams: float


REPLY_TOKENS = 64
"""Tokens per reply: two or three sentences, long enough for a steered reply to turn to its concept
after answering (AxBench generates 128; 32 cut most replies mid-sentence)."""
SAVE_EVERY = 2048
"""Jobs per engine batch in Bench.run, the reply cache written after each: a sweep's grid is one run of
tens of thousands of replies (an hour and more here), and a stopped run resumes from its last batch."""


DECODING: dict = {"frequency_penalty": 0.5}
"""SamplingParams fields every reply is decoded with besides greedy: the OpenAI API's frequency
penalty (logit minus 0.5 × the token's count in the reply so far), which we recommend for steered
requests to small models. Greedy replies of the 135M model loop as soon as a clamp pushes it
("The answer is: The answer is: ..."); this penalty puts the loops off by a strength step, where a
presence penalty breaks fewer of them and a stronger frequency penalty or a repetition penalty
(which also penalises the question's words) makes replies less likely than the loops they break
(docs/reports/decoding-2026-12-05.md)."""


def request_sampling(decoding: dict = DECODING) -> dict:
    """The request's sampling fields for a decoding (what a recommendation measured with it assumes)."""
    return {"temperature": 0, **decoding}


def describe_decoding(decoding: dict) -> str:
    """How replies were decoded, for reports: "greedy, frequency penalty 0.5"."""
    return ", ".join(["greedy"] + [f"{k.replace('_', ' ')} {v:g}" for k, v in sorted(decoding.items())])


def fingerprint(sae_dir: Path) -> str:
    """A digest of the files that decide what a clamp on an SAE (SAELens layout) does: configuration,
    weights, the max activations unit "max" multiplies; not its catalogue or concept clamps."""
    digest = hashlib.sha256()
    for name in (CFG_FILENAME, WEIGHTS_FILENAME, STATS_FILENAME):
        if (sae_dir / name).is_file():
            digest.update(name.encode() + (sae_dir / name).read_bytes())
    return digest.hexdigest()[:16]


class Bench:
    """One engine (the model and the given SAEs, plugin on) that answers and judges jobs."""

    def __init__(self, model_dir: str, saes: list[dict], max_tokens: int = REPLY_TOKENS, cache: Path | None = None,
                 own_process: bool = False, decoding: dict | None = None, dtype: str = "float32"):
        """own_process: the calling process starts no other engine (see offline_engine); decoding:
        SamplingParams fields every reply is decoded with besides greedy (None: DECODING); dtype: the
        engine's (offline_engine)."""
        self.llm = offline_llm(model_dir, own_process=own_process, max_model_len=1024, dtype=dtype,
                               additional_config={"steer": {"saes": saes}})
        self.tokenizer = self.llm.get_tokenizer()
        self.model_dir = model_dir
        self._scorer = None
        self.max_tokens = max_tokens
        self.decoding = DECODING if decoding is None else decoding
        self.cache_path = cache
        self._fingerprints = {s["id"]: fingerprint(Path(s["path"])) for s in saes}
        self._cache: dict[str, Judged] = {}
        if cache is not None and cache.exists():
            self._cache = {k: Judged(**v) for k, v in json.loads(cache.read_text()).items()}

    @property
    def sampling(self) -> dict:
        """The request fields every reply is decoded with (request_sampling of its decoding)."""
        return request_sampling(self.decoding)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()

    def _key(self, job: Job) -> str:
        key = [job.prompt, job.clamps, job.instruction, job.tokens, job.max_tokens or self.max_tokens]
        if self.decoding:
            key.append(sorted(self.decoding.items()))
        if job.clamps:  # a clamp on feature i means what that SAE's files say, which a rebuild changes
            key.append(sorted({self._fingerprints[c[0]] for c in job.clamps}))
        if job.history:  # appended only when there is one, so single-turn keys stay as they were
            key.append(job.history)
        return json.dumps(key)

    def run(self, jobs: list[Job], control: dict[str, str] | None = None, fluency: bool = True) -> list[Judged]:
        """Answers the jobs not already answered and judges what is asked and not yet judged (all kept
        in the cache on disk: the long part of a run). fluency: also perplexity; control: also PMI,
        for each prompt against the other prompt given (the scorer's passes cost more than the replies,
        so a sweep judges only the replies it needs)."""
        unique = list({self._key(j): j for j in jobs}.values())
        for at in range(0, len(unique), SAVE_EVERY):
            self._answer(unique[at:at + SAVE_EVERY], control, fluency)
        return [self._cache[self._key(j)] for j in jobs]

    def _answer(self, unique: list[Job], control: dict[str, str] | None, fluency: bool) -> None:
        """run() on distinct jobs, then the cache written: one engine batch."""
        from vllm import SamplingParams

        todo = [j for j in unique if self._key(j) not in self._cache]
        if todo:
            params = [SamplingParams(**self.sampling, max_tokens=j.max_tokens or self.max_tokens, extra_args=None if not j.clamps else
                                     {"feature_clamps": json.dumps([{"sae": s, "feature": f, "value": v, "unit": u,
                                                                     "mode": mode[0] if mode else "set",
                                                                     "tokens": j.tokens} for s, f, v, u, *mode in j.clamps])})
                      for j in todo]
            replies = [o.outputs[0].text for o in self.llm.chat([j.messages() for j in todo], params, use_tqdm=True)]
            for job, reply in zip(todo, replies):
                self._cache[self._key(job)] = Judged(reply, None, None, distinct_trigrams(reply))
        cached = [self._cache[self._key(j)] for j in unique]
        unscored = [(j, c) for j, c in zip(unique, cached) if (fluency or control) and c.perplexity is None]
        for (_, c), (nll, n) in zip(unscored, self._loglik([j.messages(j.prompt) for j, _ in unscored],
                                                           [c.text for _, c in unscored])):
            c.perplexity = math.exp(nll / n)
        no_pmi = [(j, c) for j, c in zip(unique, cached) if c.pmi is None] if control is not None else []
        if no_pmi:
            for (_, c), (other_nll, n) in zip(no_pmi, self._loglik([j.messages(control[j.prompt]) for j, _ in no_pmi],
                                                                   [c.text for _, c in no_pmi])):
                c.pmi = other_nll / n - math.log(c.perplexity)
        if self.cache_path is not None and (todo or unscored or no_pmi):
            with replaced_on_success(self.cache_path) as written:
                written.write_text(json.dumps({k: vars(v) for k, v in self._cache.items()}))

    @torch.inference_mode()
    def _loglik(self, conversations: list[list[dict]], replies: list[str], batch: int = 16) -> list[tuple[float, int]]:
        """(negative log-likelihood, tokens) of each reply after its conversation, under the unsteered
        model: transformers in this process (vLLM's prompt logprobs take a full-vocabulary log-softmax
        at every position on its one serving thread, several times slower here)."""
        if not replies:
            return []
        if self._scorer is None:
            from transformers import AutoModelForCausalLM

            self._scorer = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        rows = []
        for conv, reply in zip(conversations, replies):
            prefix = self.tokenizer(self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"]
            ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
            rows.append((prefix, ids))
        result: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        for start in tqdm(range(0, len(order), batch), desc="judge replies", unit="batch"):
            part = order[start:start + batch]
            width = max(len(rows[i][0]) + len(rows[i][1]) for i in part)
            ids = torch.zeros((len(part), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(part):
                seq = rows[i][0] + rows[i][1]
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            logp = self._scorer(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # [B, width-1]: log p(token t | < t)
            for r, i in enumerate(part):
                start_pos, n = len(rows[i][0]), len(rows[i][1])
                result[i] = (-float(token_logp[r, start_pos - 1:start_pos - 1 + n].sum()), n)
        return result


def summarise(judged: list[Judged], keywords: list[str]) -> dict:
    """Concept rate, fluency and on-question figures of a cell of replies (None where not judged)."""
    ppl = [j.perplexity for j in judged]
    pmi = [j.pmi for j in judged]
    return {"concept_rate": mention_rate(judged, keywords),
            "median_ppl": None if None in ppl else median(ppl),
            "distinct_trigrams": sum(j.trigrams for j in judged) / len(judged),
            "answers": None if None in pmi else sum(p > 0 for p in pmi) / len(judged),
            "example": judged[0].text}
