"""P-LoRA on Ray Serve: many engine replicas behind one OpenAI-compatible gateway, with
adapter-affinity routing, forecast-driven pre-loading and pre-warming, and scale to zero.
Needs the `cluster` extra (`pip install -e .[cluster]`). See `app.py` for the architecture."""

from .app import ClusterConfig, build_application, start

__all__ = ["ClusterConfig", "build_application", "start"]
