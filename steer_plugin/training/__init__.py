"""Training pipeline for the default SAE: corpus -> residual capture -> TopK SAE -> evaluation,
feature statistics and catalogue. Entry point: `python -m steer_plugin.training --help`."""
