"""Peak memory and time of `load_model` on a blip2-opt-2.7b-sized checkpoint (fp16, sharded safetensors).

Why: BLIP-2's public checkpoints are 4-12 B parameters; on a 24 GB machine the loader must never hold
the weights twice. This writes a checkpoint with blip2-opt-2.7b's dimensions (ViT-g 39 layers, Q-Former
12, OPT-2.7b 32 layers; random fp16 weights, ~7.7 GB), then loads it with `load_model(dtype=float16)` in
a fresh process and reports the load time and the process's peak resident memory (getrusage) against
the weights' size. Target: peak <= 1.3x the weights.

    .venv/bin/python -m benchmarks.blip2_load [/tmp/blip2-opt-2.7b-fp16] [--shard-gb 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Salesforce/blip2-opt-2.7b's config.json, as transformers writes it (fields that matter here).
CONFIG = {
    "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 32,
    "image_text_hidden_size": 256, "image_token_index": 50265, "dtype": "float16",
    "vision_config": {"model_type": "blip_2_vision_model", "hidden_size": 1408, "intermediate_size": 6144,
                      "num_hidden_layers": 39, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "layer_norm_eps": 1e-6, "qkv_bias": True},
    "qformer_config": {"model_type": "blip_2_qformer", "hidden_size": 768, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "intermediate_size": 3072, "cross_attention_frequency": 2,
                       "encoder_hidden_size": 1408, "vocab_size": 30522},
    "text_config": {"model_type": "opt", "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                    "ffn_dim": 10240, "num_attention_heads": 32, "max_position_embeddings": 2048,
                    "word_embed_proj_dim": 2560, "do_layer_norm_before": True, "activation_function": "relu",
                    "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1, "tie_word_embeddings": True},
}

# Peak RSS from /proc's VmHWM (this process's own high-water mark; getrusage's ru_maxrss can carry
# over a parent's peak across exec), getrusage where /proc is absent.
LOAD = """
import json, resource, sys, time
import torch
import blip_export
from blip_export.loading import load_model

def peak_rss():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

base = peak_rss()
t0 = time.perf_counter()
model, config = load_model(sys.argv[1], dtype=torch.float16)
seconds = time.perf_counter() - t0
peak = peak_rss()
params = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if not n.startswith(("qformer", "query_tokens"))})
qformer = sorted({str(p.dtype) for p in model.qformer.parameters()})
print(json.dumps(dict(seconds=seconds, peak_rss=peak, rss_before_load=base, param_bytes=params,
                      dtypes=dtypes, qformer_dtypes=qformer)))
"""


def write_checkpoint(folder: Path, shard_bytes: int) -> int:
    """Random fp16 weights under the model's own key names (lm_head omitted: tied, as transformers
    writes it), one shard in memory at a time. Returns the bytes of tensor data written."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from blip_export.families.blip2.config import config_from_dict
    from blip_export.families.blip2.modeling.models import MODEL_CLASSES

    config = config_from_dict(CONFIG)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MODEL_CLASSES[config.architecture](config).state_dict().items()}
    shapes.pop("language_model.lm_head.weight")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    shards, current, size, total = [], {}, 0, 0
    g = torch.Generator().manual_seed(0)

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(current)))
        current.clear()

    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float16)
        t.normal_(0.0, 0.02, generator=g)
        current[key] = t
        size += t.numel() * 2
        total += t.numel() * 2
        if size >= shard_bytes:
            flush()
            size = 0
    if current:
        flush()
    n = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="/tmp/blip2-opt-2.7b-fp16", type=Path)
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    args = ap.parse_args()
    folder: Path = args.folder
    if not (folder / "model.safetensors.index.json").is_file():
        free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
        if free < 9e9:
            sys.exit(f"{folder}: needs ~8 GB of free disk, {free / 1e9:.1f} GB free")
        t0 = time.perf_counter()
        written = write_checkpoint(folder, int(args.shard_gb * 1e9))
        print(f"wrote {written / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s to {folder}")
    files = sorted(folder.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in files)
    out = subprocess.run([sys.executable, "-c", LOAD, str(folder)], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        sys.exit(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"weights: {weights / 1e9:.2f} GB in {len(files)} shards; parameters in memory: {r['param_bytes'] / 1e9:.2f} GB "
          f"(dtypes {r['dtypes']}, Q-Former {r['qformer_dtypes']})")
    print(f"load_model: {r['seconds']:.1f} s; peak RSS {r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / weights:.2f}x the weights "
          f"(process before loading: {r['rss_before_load'] / 1e9:.2f} GB)")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
