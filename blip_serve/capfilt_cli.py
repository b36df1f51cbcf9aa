"""blip-capfilt: caption every image, keep the synthetic caption and the web text that the ITM
filter accepts, as parquet shards (see blip_serve.capfilt).

    blip-capfilt images/ --captioner engines/caption --filter engines/itm --output out/ [--web-texts web.jsonl]
    blip-capfilt listing.parquet --captioner ... --filter ... --output s3-or-shared/out --address ray://head:10001
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .capfilt import DEFAULT_THRESHOLD, CapFiltConfig, read_listing, run_capfilt
from .cli import init_ray


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip-capfilt", description=__doc__.split("\n")[0])
    p.add_argument("images", help="a folder of images, or a .jsonl / .parquet listing (image, optional text)")
    p.add_argument("--captioner", required=True, help="bundle with the caption task")
    p.add_argument("--filter", required=True, help="bundle with the itm task")
    p.add_argument("--output", required=True, help="folder for the parquet shards (reruns skip finished shards)")
    p.add_argument("--web-texts", default=None, help='.jsonl of {"image": name, "text": web text} (folder input)')
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"ITM probability a text needs (default {DEFAULT_THRESHOLD}, measured on easy-VQA train)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of the synthetic captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1, help="runtime actors (each loads both bundles once)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5, help="Ray CPUs per actor (fractional on small machines)")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards (rerun to go on)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray on 127.0.0.1)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--temp-dir", default=None, help="the local Ray's session folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("shard_size", "batch_size", "actors"):
        if getattr(args, name) < 1:
            print(f"blip-capfilt: --{name.replace('_', '-')}={getattr(args, name)}: expected >= 1", file=sys.stderr)
            return 2
    if not 0.0 <= args.threshold <= 1.0 or not 0.0 < args.top_p <= 1.0:
        print("blip-capfilt: --threshold: expected a probability in [0, 1]; --top-p: in (0, 1]", file=sys.stderr)
        return 2
    known = {f.name for f in fields(CapFiltConfig)}
    config = CapFiltConfig(**{k: v for k, v in vars(args).items() if k in known})
    try:
        listing = read_listing(args.images, args.web_texts)
    except (OSError, ValueError) as e:
        print(f"blip-capfilt: {e}", file=sys.stderr)
        return 2
    init_ray(args.address, args.num_cpus, args.temp_dir)
    import ray

    try:
        report = run_capfilt(listing, args.output, config, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                             max_shards=args.max_shards, progress=lambda m: print(m, flush=True))
    except ValueError as e:
        print(f"blip-capfilt: {e}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    rate = report["images"] / report["seconds"] if report["seconds"] > 0 else 0.0
    print(f"blip-capfilt: {report['processed']} shard(s) run, {report['done_before']} done before, "
          f"{report['images']} images, {report['kept']} pairs kept, {rate:.1f} images/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
