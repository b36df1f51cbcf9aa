"""blip_serve: scale-out on engines others run in production, over BlipRuntime.

- `blip-serve`: a Ray Serve application (task routes, an OpenAI-compatible chat route, batching,
  replicas, bounded queues, metrics) and `--write-triton-repo` for NVIDIA Triton's Python backend;
- `blip-capfilt`: BLIP's CapFilt (caption, then keep the texts ITM accepts) as a Ray Data pipeline.

The runtime stays the unit of work: everything here wraps `blip_runtime.BlipRuntime`. Ray is
imported only by the modules that need it (app, metrics, capfilt).
"""
