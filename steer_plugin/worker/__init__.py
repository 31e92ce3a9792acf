"""Runs in vLLM's worker process, next to the model: the op at the SAE layer, the per-step token
layout, the clamp table, feature recording and the worker-side metrics. Never imports `api`."""
