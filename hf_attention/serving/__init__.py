"""Serving: the HTTP translation server (`hf-attention-serve MODEL`, `scripts/serve.py`), its dynamic batching, and
the same app as a Ray Serve deployment (`serving.ray_app`). Needs the `serve` extra (`pip install
'hf_attention[serve]'`; Ray Serve: the `ray` extra)."""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as error:
    raise ImportError(
        f"hf_attention.serving needs {error.name}: pip install 'hf_attention[serve]' (FastAPI, uvicorn, "
        "prometheus-client)."
    ) from None

from .app import TranslationService, create_app
from .arguments import ServeArgumentError, ServeArguments
from .batching import DynamicBatcher, QueueFull, ShuttingDown

__all__ = [
    "DynamicBatcher",
    "QueueFull",
    "ServeArgumentError",
    "ServeArguments",
    "ShuttingDown",
    "TranslationService",
    "create_app",
]
