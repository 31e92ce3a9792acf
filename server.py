"""The user's entry point: `python server.py [options] [-- vLLM options]` starts vLLM's OpenAI-compatible
server with SAE feature steering (the default model and SAE unless told otherwise). The launcher
itself lives in the package (`steer_plugin/launcher/serve.py`), where the installed `steer-server`
command finds it too; `python server.py --help` lists the options."""

from steer_plugin.launcher.serve import main

if __name__ == "__main__":
    main()
