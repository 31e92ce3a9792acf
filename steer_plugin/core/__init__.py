"""Pure core, shared by the API server, the worker and the offline workbench: the request contract,
SAE formats and math, configuration. Imports nothing of vLLM."""
