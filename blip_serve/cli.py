"""blip-serve: serve bundles with Ray Serve, or write a Triton model repository for them.

    blip-serve engines/caption engines/vqa [--port 8000] [--replicas 2] [--api-key KEY]
    blip-serve --write-triton-repo models/ engines/caption engines/vqa
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path


def ray_env() -> None:
    """Keep a local Ray on this machine: no cluster address advertised to the network, no usage
    reporting. Set before `import ray`."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(address: str | None, num_cpus: float | None, temp_dir: str | None):
    """Connect to a cluster at `address`, or start a local one bound to 127.0.0.1."""
    ray_env()
    import ray

    if address:
        return ray.init(address=address)
    kwargs = {"_temp_dir": str(Path(temp_dir).resolve())} if temp_dir else {}
    return ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                    **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip-serve", description=__doc__.split("\n")[0])
    p.add_argument("bundles", nargs="+", help="bundle folders; each is a model named after its folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="replicas per bundle")
    p.add_argument("--max-batch", type=int, default=8, help="requests per batch on a replica")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a replica waits to fill a batch")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting per bundle; beyond this: 503")
    p.add_argument("--api-key", default=None, help="bearer token clients must send (default: env BLIP_SERVE_API_KEY)")
    p.add_argument("--address", default=None, help="a Ray cluster to deploy on (default: start a local one)")
    p.add_argument("--temp-dir", default=None, help="Ray's session folder (default: Ray's own)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--write-triton-repo", metavar="DIR", default=None,
                   help="write a Triton model repository for the bundles to DIR and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for b in args.bundles:
        if not (Path(b) / "manifest.json").is_file():
            print(f"blip-serve: {b}: not a bundle folder (no manifest.json)", file=sys.stderr)
            return 2
    if args.write_triton_repo:
        from .triton import write_triton_repo

        try:
            written = write_triton_repo(args.write_triton_repo, args.bundles, max_batch=args.max_batch,
                                        max_wait_ms=args.max_wait_ms)
        except ValueError as e:
            print(f"blip-serve: {e}", file=sys.stderr)
            return 2
        print("\n".join(f"{name}: {path}" for name, path in written.items()))
        return 0
    for name in ("replicas", "max_batch", "max_queued"):
        if getattr(args, name) < 1:
            print(f"blip-serve: --{name.replace('_', '-')}={getattr(args, name)}: expected >= 1", file=sys.stderr)
            return 2

    init_ray(args.address, args.num_cpus, args.temp_dir)
    import ray
    from ray import serve

    from .app import ServeConfig, build_app

    cpus = float(ray.cluster_resources().get("CPU", 1))
    config = ServeConfig(
        replicas=args.replicas, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
        max_ongoing=2 * args.max_batch, max_queued=args.max_queued,
        # Fractional CPUs so every replica of every bundle fits on a small machine.
        cpus_per_replica=round(min(1.0, 0.9 * cpus / (args.replicas * len(args.bundles))), 3),
        api_key=args.api_key or os.environ.get("BLIP_SERVE_API_KEY") or None,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args.bundles, config), name="blip", route_prefix="/")
        print(f"blip-serve: {', '.join(Path(b).name for b in args.bundles)} at http://{args.host}:{args.port}/ "
              f"(POST /v1/chat/completions, /v1/<model>/<task>; GET /healthz, /metrics)", flush=True)
        stop.wait()
        print("blip-serve: shutting down (finishing requests in flight)", flush=True)
    finally:
        serve.shutdown()  # drains: each replica answers what it holds before it stops
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
