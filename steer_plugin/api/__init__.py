"""Runs in vLLM's API server process (or the process of an offline `vllm.LLM`): the HTTP edge,
admission of every request, `return_features`, the /v1/features routes. Never imports `worker`."""
