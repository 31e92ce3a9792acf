"""Starting a server: `steer-server` / `python server.py` (serve.py) and the default model (prepare_model.py)."""
