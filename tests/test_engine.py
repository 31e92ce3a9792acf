"""Steering in a real offline vLLM engine on the default model, eager and compiled.

vLLM is not batch-invariant in general, so "unclamped requests are untouched" is checked under
the same batch composition: one generate call with per-request SamplingParams, against the same
call with no clamps at all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engines import MODEL, REPO, offline_llm
from sae_factory import write_sae

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "My favourite animal is", "Once upon a time",
           "The best way to cook pasta is"]
STRONG = [{"feature": 3, "value": 80.0}, {"feature": 10, "value": 60.0, "mode": "add"}]
OTHER = [{"feature": 42, "value": 80.0}]
IDENTITY = [{"feature": 3, "value": 1.0, "mode": "scale"}, {"feature": 10, "value": 0.0, "mode": "add"}]


def params(clamps=None, as_json=True, max_tokens=24):
    from vllm import SamplingParams

    extra = None
    if clamps is not None:
        extra = {"feature_clamps": json.dumps(clamps) if as_json else clamps}
    return SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra)


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module", params=["eager", "compiled"])
def llm(request, random_sae_dir):
    with offline_llm(random_sae_dir, enforce_eager=request.param == "eager") as engine:
        yield engine


@pytest.fixture(scope="module")
def baseline(llm):
    return token_ids(llm.generate(PROMPTS, [params()] * len(PROMPTS)))


def test_mixed_batch_steers_only_clamped_requests(llm, baseline):
    mixed = token_ids(llm.generate(PROMPTS, [params(STRONG), params(), params(OTHER), params()]))
    assert mixed[1] == baseline[1] and mixed[3] == baseline[3]
    assert mixed[0] != baseline[0] and mixed[2] != baseline[2]


def test_error_term_is_kept(llm, baseline):
    """scale-by-1 / add-0 leave activations unchanged: output must equal unsteered. This fails if
    the op substituted the SAE reconstruction for the activations."""
    same = token_ids(llm.generate(PROMPTS, [params(IDENTITY)] * len(PROMPTS)))
    assert same == baseline


def test_list_and_json_string_clamps_agree(llm):
    a = token_ids(llm.generate(PROMPTS[:1], [params(STRONG, as_json=True)]))
    b = token_ids(llm.generate(PROMPTS[:1], [params(STRONG, as_json=False)]))
    assert a == b


def test_prefix_cache_is_keyed_by_clamps(llm, baseline):
    """Steered after unsteered on the same prompt, and unsteered after steered: each answer equals
    the one computed cold, so no KV block crossed between clamp sets."""
    long_prompts = [p + " " + "and so on, " * 12 for p in PROMPTS[:2]]
    cold_plain = token_ids(llm.generate(long_prompts, [params()] * 2))
    steered = token_ids(llm.generate(long_prompts, [params(STRONG)] * 2))
    plain_again = token_ids(llm.generate(long_prompts, [params()] * 2))
    steered_again = token_ids(llm.generate(long_prompts, [params(STRONG)] * 2))
    assert plain_again == cold_plain
    assert steered_again == steered != cold_plain


def test_tokens_prompt_and_generated_are_distinct(llm, baseline):
    prompt_only = token_ids(llm.generate(PROMPTS[:2], [params([{**c, "tokens": "prompt"} for c in STRONG])] * 2))
    gen_only = token_ids(llm.generate(PROMPTS[:2], [params([{**c, "tokens": "generated"} for c in STRONG])] * 2))
    everywhere = token_ids(llm.generate(PROMPTS[:2], [params(STRONG)] * 2))
    assert prompt_only != gen_only
    assert everywhere not in (prompt_only, gen_only)


def test_generated_scope_steers_the_first_generated_token(llm, baseline):
    """With max_tokens 1 the one generated token comes from the last prompt position: steered too."""
    generated = [{**c, "tokens": "generated"} for c in STRONG]
    first = token_ids(llm.generate(PROMPTS, [params(generated, max_tokens=1)] * len(PROMPTS)))
    assert [t[0] for t in first] != [b[0] for b in baseline]


def test_scoped_clamps_across_turns_match_a_cold_cache(llm):
    """Turn 2 repeats turn 1 and its reply as prompt. Turn 1's reply positions were generated
    positions, so a "prompt" clamp did not act there; in turn 2 it must. Served from the cache or
    computed cold, turn 2's answer is the same."""
    from vllm import SamplingParams, TokensPrompt

    scoped = json.dumps([{**c, "tokens": "prompt"} for c in STRONG])
    sampling = SamplingParams(temperature=0, max_tokens=160, ignore_eos=True, extra_args={"feature_clamps": scoped})
    tokenizer = llm.get_tokenizer()
    turn1 = tokenizer("Tell me a long story about a dragon who lived by the sea.")["input_ids"]
    reply = list(llm.generate([TokensPrompt(prompt_token_ids=turn1)], [sampling])[0].outputs[0].token_ids)
    turn2 = TokensPrompt(prompt_token_ids=turn1 + reply + tokenizer(" What happened next?")["input_ids"])
    sampling.max_tokens = 24
    warm = token_ids(llm.generate([turn2], [sampling]))
    assert llm.reset_prefix_cache()
    cold = token_ids(llm.generate([turn2], [sampling]))
    assert warm == cold


def test_bad_clamps_are_rejected_at_admission(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=r"feature_clamps\[0\]\.feature"):
        llm.generate(PROMPTS[:1], [params([{"feature": 10**6, "value": 1.0}])])
    assert token_ids(llm.generate(PROMPTS[:1], [params()]))  # still serving


def test_plugin_disabled_engine_matches_unsteered(random_sae_dir):
    """Unsteered output with the plugin loaded equals vanilla vLLM (same flags, same batch)."""
    with offline_llm(random_sae_dir) as engine:
        with_plugin = token_ids(engine.generate(PROMPTS, [params()] * len(PROMPTS)))
    with offline_llm(None, plugin=False) as engine:
        vanilla = token_ids(engine.generate(PROMPTS, [params()] * len(PROMPTS)))
    assert with_plugin == vanilla


def test_sae_width_mismatch_fails_at_start_up(tmp_path):
    bad = write_sae(tmp_path / "narrow", d_in=64, d_sae=128)
    script = (f"from vllm import LLM\nif __name__ == '__main__':\n"
              f"    LLM(model={MODEL!r}, dtype='float32', enforce_eager=True, max_model_len=512,"
              f" additional_config={{'steer': {{'saes': [{{'path': {str(bad)!r}}}]}}}})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            timeout=600, env={"VLLM_CPU_KVCACHE_SPACE": "1", **__import__("os").environ})
    assert result.returncode != 0
    assert "has d_in=64, the model's hidden size is 576" in result.stdout + result.stderr


def test_a_request_whose_steering_fails_gets_an_error_and_the_rest_go_on(random_sae_dir, monkeypatch):
    """Faults injected in the worker: preparing any clamp of feature 13, applying a step that clamps
    feature 14. Those requests finish with an error and no tokens; the engine and the others go on."""
    monkeypatch.setenv("STEER_PLUGIN_INJECT_FAULT", "prepare:13,apply:14")
    with offline_llm(random_sae_dir) as engine:
        plain = token_ids(engine.generate(PROMPTS[1:2], [params()]))
        for bad in ([{"feature": 13, "value": 5.0}], [{"feature": 14, "value": 5.0}]):
            outputs = engine.generate(PROMPTS[:2], [params(bad), params()])
            assert outputs[0].outputs[0].finish_reason == "error" and list(outputs[0].outputs[0].token_ids) == []
            assert outputs[1].outputs[0].finish_reason in ("length", "stop") and outputs[1].outputs[0].token_ids
        steered = engine.generate(PROMPTS[1:2], [params(STRONG)])[0].outputs[0]
        assert steered.finish_reason in ("length", "stop") and list(steered.token_ids) != plain[0]


def test_hook_resid_pre_reads_the_stream_of_the_layer_before(tmp_path):
    """An SAE on blocks.16.hook_resid_pre reads what one on blocks.15.hook_resid_post reads: the same
    steering. One on blocks.0.hook_resid_pre steers the embeddings: a strong clamp changes the reply,
    an identity clamp leaves it bit-identical."""
    import shutil

    from steer_plugin.core.sae import CFG_FILENAME

    post = write_sae(tmp_path / "post", d_sae=1024)
    outputs = {}
    for name, hook in (("post", None), ("pre16", "blocks.16.hook_resid_pre"), ("pre0", "blocks.0.hook_resid_pre")):
        folder = post if hook is None else tmp_path / name
        if hook is not None:
            shutil.copytree(post, folder)
            cfg = json.loads((folder / CFG_FILENAME).read_text())
            cfg["metadata"]["hook_name"] = hook
            (folder / CFG_FILENAME).write_text(json.dumps(cfg))
        with offline_llm(folder) as engine:
            outputs[name] = [token_ids(engine.generate(PROMPTS[:2], [params(c)] * 2)) for c in (None, STRONG, IDENTITY)]
    assert outputs["pre16"] == outputs["post"]
    plain, strong, identity = outputs["pre0"]
    assert identity == plain and strong != plain


def test_an_engine_in_the_callers_process_steers(random_sae_dir):
    """VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM loads plugins once, as the frontend; the worker's hooks
    must be installed then too, or clamps would be ignored in silence."""
    script = (f"import json, os\nfrom vllm import LLM, SamplingParams\nif __name__ == '__main__':\n"
              f"    llm = LLM(model={MODEL!r}, dtype='float32', enforce_eager=True, max_model_len=512,"
              f" additional_config={{'steer': {{'saes': [{{'path': {str(random_sae_dir)!r}}}]}}}})\n"
              f"    ps = [SamplingParams(temperature=0, max_tokens=8, extra_args=e) for e in"
              f" (None, {{'feature_clamps': json.dumps({STRONG!r})}})]\n"
              f"    a, b = [o.outputs[0].token_ids for o in llm.generate([{PROMPTS[0]!r}] * 2, ps)]\n"
              f"    print('STEERED' if list(a) != list(b) else 'UNSTEERED', flush=True)\n    os._exit(0)\n")
    env = {**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env=env)
    assert "STEERED" in result.stdout.split(), result.stdout[-2000:] + result.stderr[-2000:]
