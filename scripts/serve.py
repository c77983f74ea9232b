"""Serve translations over HTTP with dynamic batching: `serve.py MODEL [--port 8000]` (see --help)."""

from hf_attention.serving.server import main

if __name__ == "__main__":
    main()
