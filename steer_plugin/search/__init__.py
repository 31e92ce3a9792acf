"""The feature catalogue and concept clamps of an SAE, read and searched (API server process)."""
