"""Fine-tune the ITM head of the shipped easy-VQA BLIP (easyvqa-itm) on explicit hard negatives.

train.py's ITM draws one negative caption per image and one negative image per caption by ITC
similarity among captions that differ in anything, size and position included: those are fuzzy
labels (a centroid near a grid line, an area near the size threshold), and the head ended at 75 %
on them with p(match) 0.004-0.76 for right captions. This run starts from that checkpoint and
trains ITM, the text encoder over the image and the 2-way head on [CLS], on five pairs per image:

- the image's own caption (match);
- the caption with another colour, same shape, size and position (no match);
- the caption with another shape, same colour, size and position (no match);
- a caption of the batch naming another colour or shape, drawn by ITC similarity (no match);
- for the image's caption, an image of the batch whose caption names another colour or shape,
  drawn by ITC similarity (no match).

Positives and negatives weigh the same in the loss (a mean over each). The vision encoder is
frozen: it is the one every shipped BLIP folder shares and the BLIP-2 models' frozen image encoder
(checked bit-identical to easyvqa-caption's before saving). Only the text encoder's cross-attention
blocks and the ITM head train: ITC runs the text encoder without cross-attention, so its features,
and its retrieval, stay bit-identical (checked), with no ITC loss needed to hold them.

    python training/train_itm.py --seed 0      # rewrites blip_export/models/easyvqa-itm

The start must be train.py's easyvqa-itm (SHA-256 START_SHA256; `--init` names its folder),
so that a rerun of the command reproduces the shipped file bitwise.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: idle threads sleep on a shared machine

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from blip_export import load_model  # noqa: E402
from blip_export.families.blip.checkpoint import save_checkpoint  # noqa: E402
from data import COLORS, IMAGE_SIZE, SHAPES, load_split  # noqa: E402
from train import Batches, take  # noqa: E402

MODELS = ROOT / "blip_export" / "models"
# model.safetensors of easyvqa-itm as `train.py --seed 0` writes it: the start of the shipped run.
START_SHA256 = "e48bd11bcb6bbfeb501b61ee67f4b31ca2541717f9fb44ebbb6dd8783618bb05"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def swap(text: str, rng: np.random.Generator, kind: str) -> str:
    """"a {size} {colour} {shape} {position}" (data.caption) with another colour or another shape."""
    words = text.split(" ")
    slot, names = (2, COLORS) if kind == "colour" else (3, SHAPES)
    if words[slot] not in names:
        raise ValueError(f"caption {text!r}: expected a {kind} as word {slot + 1}")
    words[slot] = str(rng.choice([n for n in names if n != words[slot]]))
    return " ".join(words)


def kind_of(text: str) -> tuple[str, str]:
    """(colour, shape) a data.caption names."""
    words = text.split(" ")
    return words[2], words[3]


def trained(name: str) -> bool:
    """Whether parameter `name` trains: the cross-attention blocks and the ITM head, which ITC never runs."""
    return ".crossattention." in name or name.startswith("itm_head.")


@torch.no_grad()
def itc(model, image_embeds, t_ids, t_mask, temp):
    """ITC logits [B, B] (image rows) of the batch: unimodal [CLS] features, L2-normalized, / temp."""
    text_states, _, _ = model.text_encoder(t_ids, t_mask)  # text-only mode: no cross-attention
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text_states[:, 0]), dim=-1)
    return image_feat @ text_feat.t() / temp


def step_losses(model, b: dict, batches: Batches, temp: float, rng: np.random.Generator,
                gen: torch.Generator) -> dict[str, torch.Tensor]:
    """ITM loss over the five pairs per image of the module docstring, and accuracy per kind of pair."""
    with torch.no_grad():  # frozen vision encoder
        image_embeds, _ = model.vision_model(b["pixels"])  # (B, N, D)
    B = image_embeds.shape[0]
    caps = b["captions"]
    t_ids, t_mask = b["text"]
    out = {}
    kinds = [kind_of(c) for c in caps]
    same_kind = torch.tensor([[a == c for c in kinds] for a in kinds])  # never ITM negatives (fuzzy labels)
    sim = itc(model, image_embeds, t_ids, t_mask, temp)  # (B, B)
    with torch.no_grad():
        w_i2t = F.softmax(sim, 1).masked_fill(same_kind, 0) + 1e-9 * (~same_kind)
        w_t2i = F.softmax(sim.t(), 1).masked_fill(same_kind, 0) + 1e-9 * (~same_kind)
        all_same = same_kind.all(1)  # one kind in the whole batch: no mined negative (tiny batches only)
        w_i2t[all_same] = 1.0
        w_t2i[all_same] = 1.0
        neg_text = torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)  # (B,)
        neg_image = torch.multinomial(w_t2i, 1, generator=gen).squeeze(1)
    swapped = [swap(c, rng, "colour") for c in caps] + [swap(c, rng, "shape") for c in caps]
    s_ids, s_mask = batches._ids(swapped)  # (2B, S')
    idx = torch.arange(B)
    S = max(t_ids.shape[1], s_ids.shape[1])
    ids = torch.cat([F.pad(t_ids, (0, S - t_ids.shape[1])), F.pad(s_ids, (0, S - s_ids.shape[1]))])  # (3B, S)
    mask = torch.cat([F.pad(t_mask, (0, S - t_mask.shape[1])), F.pad(s_mask, (0, S - s_mask.shape[1]))])
    text_rows = torch.cat([idx, B + idx, 2 * B + idx, neg_text, idx])  # into ids: own, colour, shape, mined
    image_rows = torch.cat([idx, idx, idx, idx, neg_image])
    image_kv = model.text_encoder.cross_key_values(image_embeds)  # per layer (B, H, N, Dh)
    states, _, _ = model.text_encoder(ids[text_rows], mask[text_rows], cross_key_values=take(image_kv, image_rows))
    logits = model.itm_head(states[:, 0])  # (5B, 2)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(4 * B, dtype=torch.long)])
    loss = F.cross_entropy(logits, labels, reduction="none")
    out["itm"] = loss[:B].mean() + loss[B:].mean()  # positives and negatives weigh the same
    right = (logits.argmax(-1) == labels).float()
    for k, name in enumerate(("pos", "colour", "shape", "mined_text", "mined_image")):
        out[f"acc_{name}"] = right[k * B : (k + 1) * B].mean()
    return out


@torch.no_grad()
def fitted_temperature(model, b: dict) -> float:
    """The ITC temperature (training-only, so not in the checkpoint) that minimizes ITC loss on batch
    `b`: mined negatives are drawn in proportion to softmax(similarity / temperature), as train.py's."""
    image_embeds, _ = model.vision_model(b["pixels"])
    caps = b["captions"]
    same = torch.tensor([[a == c for c in caps] for a in caps]).float()
    targets = same / same.sum(1, keepdim=True)
    cos = itc(model, image_embeds, *b["text"], 1.0)

    def loss(t):
        s = cos / t
        return float((torch.sum(-F.log_softmax(s, 1) * targets, 1).mean()
                      + torch.sum(-F.log_softmax(s.t(), 1) * targets, 1).mean()) / 2)

    grid = np.geomspace(0.002, 0.5, 200)
    return float(grid[int(np.argmin([loss(t) for t in grid]))])


def check_unchanged(model, start: dict[str, torch.Tensor], names, what: str) -> None:
    now = model.state_dict()
    changed = [n for n in names if not torch.equal(now[n], start[n])]
    if changed:
        raise AssertionError(f"{what} changed in training: {changed[:5]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", type=Path, default=MODELS / "easyvqa-itm",
                    help="train.py's easyvqa-itm folder (model.safetensors SHA-256 START_SHA256)")
    ap.add_argument("--any-start", action="store_true", help="accept another starting checkpoint")
    ap.add_argument("--out", type=Path, default=MODELS / "easyvqa-itm")
    ap.add_argument("--vision-reference", type=Path, default=MODELS / "easyvqa-caption",
                    help="the folder whose vision encoder the result must hold bit for bit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=64, help="images per step (5 ITM pairs each)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)  # bitwise reproducible, as train.py
    torch.manual_seed(args.seed)
    start_wall, start_cpu = time.time(), time.process_time()
    start_sha = sha256(args.init / "model.safetensors")
    if start_sha != START_SHA256 and not args.any_start:
        raise SystemExit(f"{args.init / 'model.safetensors'}: SHA-256 {start_sha[:12]}..., expected train.py's "
                         f"easyvqa-itm {START_SHA256[:12]}... (run `python training/train.py --seed 0 --out DIR` "
                         "and pass --init DIR/easyvqa-itm, or --any-start)")
    model, cfg = load_model(args.init)
    if type(model).__name__ != "BlipForImageTextRetrieval":
        raise SystemExit(f"{args.init}: expected a BlipForImageTextRetrieval checkpoint, got {type(model).__name__}")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        p.requires_grad_(trained(name))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    print(f"start {args.init} (SHA-256 {start_sha[:12]}...), training {sum(p.numel() for _, p in params)} "
          "parameters (cross-attention, ITM head)", flush=True)
    model.train()

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(args.init / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    batches = Batches(load_split("train"), tok, args.batch, 1, args.seed, augment=not args.no_augment)
    rng = np.random.default_rng(args.seed + 1)  # the swapped colours / shapes
    gen = torch.Generator().manual_seed(args.seed)
    temp = fitted_temperature(model, next(batches))
    print(f"ITC temperature {temp:.4f} (fitted on the first batch)", flush=True)
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine decay to 2% of the peak (train.py's schedule)
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    running: dict[str, float] = {}
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        losses = step_losses(model, next(batches), batches, temp, rng, gen)
        opt.zero_grad(set_to_none=True)
        losses["itm"].backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        for key, value in losses.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        if (step + 1) % args.log_every == 0:
            shown = " ".join(f"{k} {v / args.log_every:.3f}" for k, v in running.items())
            print(f"step {step + 1} lr {lr_at(step):.2e} {shown} [{time.time() - start_wall:.0f}s wall, "
                  f"{time.process_time() - start_cpu:.0f}s cpu]", flush=True)
            running = {}

    model.eval()
    vision = [n for n in start if n.startswith("vision_model.")]
    check_unchanged(model, start, vision, "the vision encoder")
    check_unchanged(model, start, [n for n in start if not trained(n)], "what ITC uses")
    from safetensors import safe_open

    with safe_open(str(args.vision_reference / "model.safetensors"), "pt") as f:
        differ = [n for n in vision if not torch.equal(f.get_tensor(n), start[n])]
    if differ:
        raise AssertionError(f"vision encoder differs from {args.vision_reference}'s: {differ[:5]}")
    with tempfile.TemporaryDirectory() as tmp:  # --out may be --init: copy the tokenizer out first
        for name in TOKENIZER_FILES:
            shutil.copyfile(args.init / name, Path(tmp) / name)
        save_checkpoint(model, cfg, args.out, tokenizer_dir=tmp, image_size=IMAGE_SIZE)
    print(f"wrote {args.out} (model.safetensors SHA-256 {sha256(args.out / 'model.safetensors')}) after "
          f"{args.steps} steps: {time.time() - start_wall:.0f}s wall, {time.process_time() - start_cpu:.0f}s cpu",
          flush=True)


if __name__ == "__main__":
    main()
