"""Runs in vLLM's worker process, next to the model: the ops at the SAE and vector layers, the per-step
token layout, the clamp and vector tables, feature recording and the worker-side metrics. Never
imports `api`."""
