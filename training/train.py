"""Train the small BLIP that blip_export ships, on easy-VQA, with BLIP's own objectives.

One seeded run on the CPU (2 threads) trains, with the reference modules of blip_export.families.blip.modeling:

- captioning: LM loss of the caption decoder over the image tokens, "[DEC] caption [SEP]";
- VQA: the question encoded over the image, the answer "[DEC] answer [SEP]" decoded over the
  question states (LM loss);
- ITC: image [CLS] and text-only [CLS] projected, L2-normalized, contrastive with a learned
  temperature; captions that are equal count as positives of each other;
- ITM: the text encoder over the image, 2-way head on [CLS], on the positive pairs and one hard
  negative image per text and one hard negative text per image, drawn by ITC similarity (BLIP).

The vision transformer is shared by all three tasks, the text encoder by ITC, ITM and the VQA
question encoder; captions and answers have a decoder each. The result is three Hugging Face
checkpoints written by blip_export.families.blip.checkpoint.save_checkpoint: `caption`
(BlipForConditionalGeneration), `vqa` (BlipForQuestionAnswering), `itm` (BlipForImageTextRetrieval).

    python training/train.py --out blip_export/models --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made
# steps 4-8x slower. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from blip_export.families.blip.checkpoint import CLIP_MEAN, CLIP_STD, save_checkpoint  # noqa: E402
from blip_export.families.blip.config import BlipConfig, config_from_dict  # noqa: E402
from blip_export.families.blip.modeling import (  # noqa: E402
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)
from data import IMAGE_SIZE, Split, caption, load_split  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

CHECKPOINTS = {"caption": BlipForConditionalGeneration, "vqa": BlipForQuestionAnswering,
               "itm": BlipForImageTextRetrieval}


def config_dict(args, tok) -> dict:
    """config.json contents as transformers writes them (what config_from_dict reads)."""
    sep = tok.token_to_id("[SEP]")
    return {
        "model_type": "blip",
        "architectures": ["BlipForConditionalGeneration"],
        "vision_config": {
            "hidden_size": args.width, "intermediate_size": 4 * args.width, "num_hidden_layers": args.vision_layers,
            "num_attention_heads": args.width // 32, "image_size": IMAGE_SIZE, "patch_size": args.patch,
            "projection_dim": args.itc_dim,
        },
        # BLIP's VQA decoder cross-attends to the question states through weights sized for the
        # vision width (encoder_hidden_size): text and vision widths must be equal.
        "text_config": {
            "vocab_size": tok.get_vocab_size(), "hidden_size": args.width, "intermediate_size": 4 * args.width,
            "num_hidden_layers": args.text_layers, "num_attention_heads": args.width // 32,
            "max_position_embeddings": 64, "bos_token_id": tok.token_to_id("[DEC]"), "sep_token_id": sep,
            "eos_token_id": sep, "pad_token_id": tok.token_to_id("[PAD]"),
        },
        "projection_dim": args.itc_dim,
        "image_text_hidden_size": args.itc_dim,
    }


class EasyBlip(nn.Module):
    """The three task models with shared modules; `temp` is ITC's training-only temperature."""

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.caption = BlipForConditionalGeneration(cfg)
        self.vqa = BlipForQuestionAnswering(cfg)
        self.itm = BlipForImageTextRetrieval(cfg)
        self.vqa.vision_model = self.itm.vision_model = self.caption.vision_model
        self.itm.text_encoder = self.vqa.text_encoder
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.apply(_init)
        for decoder in (self.caption.text_decoder, self.vqa.text_decoder):  # tie_word_embeddings, as BLIP
            decoder.cls.predictions.decoder.weight = decoder.bert.embeddings.word_embeddings.weight
        vision = self.caption.vision_model.embeddings
        nn.init.trunc_normal_(vision.position_embedding, std=0.02)
        nn.init.trunc_normal_(vision.class_embedding, std=0.02)

    @property
    def vision(self):
        return self.caption.vision_model

    @property
    def encoder(self):
        return self.vqa.text_encoder


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class Batches:
    """Seeded batches of images (augmented), their captions and k questions per image, as tensors."""

    def __init__(self, split: Split, tok, batch: int, questions_per_image: int, seed: int, augment: bool):
        self.split, self.tok, self.batch, self.k, self.augment = split, tok, batch, questions_per_image, augment
        self.rng = np.random.default_rng(seed)
        self.mean = np.array(CLIP_MEAN, np.float32)
        self.std = np.array(CLIP_STD, np.float32)
        self.by_image = [[] for _ in range(len(split.images))]
        for q, i in enumerate(split.question_image):
            self.by_image[i].append(q)
        from data import _mask

        self.masks = np.stack([_mask(im) for im in split.images])  # (N, 64, 64)
        self.order = np.empty(0, np.int64)

    def _ids(self, texts: list[str], first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [e.ids for e in self.tok.encode_batch(texts)]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        if first is not None:
            ids[:, 0] = first  # [CLS] -> [DEC]: BLIP's decoder inputs start with the bos token
        return ids, mask

    def _shift(self, coords: np.ndarray, most: int = 12) -> int:
        """A random shift along one axis that keeps the shape and its anti-aliased rim (2 px) inside,
        so rolled-in pixels are background and the roll is a plain shift. A shape the image edge cuts
        stays where it is on that axis: moved inward it would show its cut edge."""
        if coords.min() == 0 or coords.max() == IMAGE_SIZE - 1:
            return 0
        lo = min(max(coords.min() - 2, 0), most)
        hi = min(max(IMAGE_SIZE - 3 - coords.max(), 0), most)
        return int(self.rng.integers(-lo, hi + 1))

    def _augment(self, n: int) -> tuple[np.ndarray, str, str]:
        """Image n mirrored at random and shifted so the shape stays whole; its caption follows."""
        from data import _size_and_position

        image, mask = self.split.images[n], self.masks[n]
        if self.augment:
            if self.rng.random() < 0.5:
                image, mask = image[:, ::-1], mask[:, ::-1]
            ys, xs = np.nonzero(mask)
            dy, dx = self._shift(ys), self._shift(xs)
            image, mask = np.roll(image, (dy, dx), axis=(0, 1)), np.roll(mask, (dy, dx), axis=(0, 1))
        size, position = _size_and_position(mask)
        return image, size, position

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if len(self.order) < self.batch:
            self.order = np.concatenate([self.order, self.rng.permutation(len(self.split.images))])
        picked, self.order = self.order[: self.batch], self.order[self.batch :]
        s = self.split
        images, captions = [], []
        for n in picked:
            image, size, position = self._augment(int(n))
            images.append(image)
            captions.append(caption(s.colors[n], s.shapes[n], size, position))
        pixels = (np.stack(images).astype(np.float32) / 255.0 - self.mean) / self.std
        qs = [int(self.rng.choice(self.by_image[n])) for n in picked for _ in range(self.k)]
        bos = self.tok.token_to_id("[DEC]")
        return {
            "pixels": torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),  # (B, 3, 64, 64)
            "captions": captions,
            "text": self._ids(captions),  # [CLS] caption [SEP]: ITC / ITM
            "caption": self._ids(captions, first=bos),  # [DEC] caption [SEP]: captioning
            "question": self._ids([s.questions[q] for q in qs]),  # (B*k, Sq)
            "answer": self._ids([s.answers[q] for q in qs], first=bos),  # [DEC] answer [SEP]
        }


def lm_loss(decoder, ids, mask, smoothing: float, **cross) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of `ids` [B, S] (the [DEC] input predicts nothing before it); -> (loss, token acc)."""
    logits, _ = decoder(ids[:, :-1], mask[:, :-1], **cross)  # (B, S-1, V)
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, label_smoothing=smoothing)
    keep = target != -100
    acc = (logits.argmax(-1)[keep] == target[keep]).float().mean()
    return loss, acc


def take(kv, index):
    """Per-layer cross K/V [B, H, N, Dh] -> rows `index`."""
    return [(k[index], v[index]) for k, v in kv]


def step_losses(model: EasyBlip, b: dict, k: int, smoothing: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    image_embeds, _ = model.vision(b["pixels"])  # (B, N, D)
    B = image_embeds.shape[0]
    out = {}

    # Captioning: the decoder over all image tokens.
    cap_ids, cap_mask = b["caption"]
    out["caption"], out["caption_acc"] = lm_loss(model.caption.text_decoder, cap_ids, cap_mask, smoothing,
                                                 encoder_hidden_states=image_embeds)

    # VQA: k questions per image over its image tokens (cross K/V computed once per image).
    image_kv = model.encoder.cross_key_values(image_embeds)  # per layer (B, H, N, Dh)
    q_ids, q_mask = b["question"]
    rows = torch.arange(B).repeat_interleave(k)
    q_states, _, _ = model.encoder(q_ids, q_mask, cross_key_values=take(image_kv, rows))
    a_ids, a_mask = b["answer"]
    out["vqa"], out["vqa_acc"] = lm_loss(model.vqa.text_decoder, a_ids, a_mask, smoothing,
                                         encoder_hidden_states=q_states, encoder_attention_mask=q_mask)

    # ITC: unimodal [CLS] features; equal captions are positives of each other.
    t_ids, t_mask = b["text"]
    text_states, _, _ = model.encoder(t_ids, t_mask)
    image_feat = F.normalize(model.itm.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.itm.text_proj(text_states[:, 0]), dim=-1)
    temp = model.temp.clamp(0.001, 0.5)
    sim_i2t = image_feat @ text_feat.t() / temp  # (B, B)
    caps = b["captions"]
    same = torch.tensor([[a == c for c in caps] for a in caps], dtype=torch.float32)
    targets = same / same.sum(1, keepdim=True)
    out["itc"] = (torch.sum(-F.log_softmax(sim_i2t, 1) * targets, 1).mean()
                  + torch.sum(-F.log_softmax(sim_i2t.t(), 1) * targets, 1).mean()) / 2

    # ITM: positives, one hard negative image per text and one hard negative text per image, drawn
    # in proportion to ITC similarity among pairs whose captions differ.
    with torch.no_grad():
        w_i2t = F.softmax(sim_i2t.float(), 1).masked_fill(same.bool(), 0) + 1e-9 * (1 - same)
        w_t2i = F.softmax(sim_i2t.t().float(), 1).masked_fill(same.bool(), 0) + 1e-9 * (1 - same)
        all_same = same.sum(1) == B  # every caption equal: no negative exists (tiny batches only)
        w_i2t[all_same] = 1.0
        w_t2i[all_same] = 1.0
        neg_text = torch.multinomial(w_i2t, 1, generator=gen).squeeze(1)  # (B,)
        neg_image = torch.multinomial(w_t2i, 1, generator=gen).squeeze(1)
    idx = torch.arange(B)
    text_rows = torch.cat([idx, idx, neg_text])
    image_rows = torch.cat([idx, neg_image, idx])
    states, _, _ = model.encoder(t_ids[text_rows], t_mask[text_rows], cross_key_values=take(image_kv, image_rows))
    itm_logits = model.itm.itm_head(states[:, 0])  # (3B, 2)
    labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)])
    out["itm"] = F.cross_entropy(itm_logits, labels)
    out["itm_acc"] = (itm_logits.argmax(-1) == labels).float().mean()
    return out


def export(model: EasyBlip, cfg: BlipConfig, tok, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(str(Path(tmp) / "tokenizer.json"))
        for name, cls in CHECKPOINTS.items():
            task_model = getattr(model, name)
            save_checkpoint(task_model.eval(), dataclasses.replace(cfg, architecture=cls.__name__),
                            out / f"easyvqa-{name}", tokenizer_dir=tmp, image_size=IMAGE_SIZE)
    model.train()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "blip_export" / "models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2200, help="optimizer steps (the schedule is defined by them)")
    ap.add_argument("--minutes", type=float, default=24.0,
                    help="wall-clock budget: training stops early (and says so) if the steps do not fit")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--questions-per-image", type=int, default=4)
    ap.add_argument("--width", type=int, default=128, help="hidden size of vision and text (equal, see config_dict)")
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--itc-dim", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--state", type=Path,
                    help="save the training state here every --save-every steps and resume from it when it "
                         "exists: a resumed run ends bitwise where the uninterrupted one does")
    ap.add_argument("--save-every", type=int, default=100)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Bitwise reproducible runs: with 2 threads the ITM branch's gradients otherwise differed in the
    # last bits from run to run (tracked to it by elimination), and Adam makes that grow.
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    start = time.time()
    from data import all_texts

    tok = train_tokenizer(all_texts())
    cfg = config_from_dict(config_dict(args, tok))
    model = EasyBlip(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {json.dumps(config_dict(args, tok))}", flush=True)
    print(f"parameters (all tasks, shared counted once): {n_params / 1e6:.2f} M", flush=True)

    batches = Batches(load_split("train"), tok, args.batch, args.questions_per_image, args.seed,
                      augment=not args.no_augment)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):  # linear warmup, cosine decay to 2% of the peak
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    deadline = start + 60 * args.minutes
    running: dict[str, float] = {}
    print(f"setup {time.time() - start:.1f}s; training {args.steps} steps of {args.batch} images", flush=True)
    first = 0
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "minutes", "state", "save_every", "log_every")}
    if args.state is not None and args.state.is_file():
        state = torch.load(args.state, weights_only=False)
        if state["recipe"] != {k: str(v) for k, v in recipe.items()}:
            raise SystemExit(f"{args.state} was saved by a run with other arguments: {state['recipe']}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        batches.rng.bit_generator.state = state["np_rng"]
        batches.order = state["order"]
        first = state["step"]
        print(f"resumed from {args.state} at step {first}", flush=True)
    step = first
    for step in range(first, args.steps):
        if time.time() > deadline:
            print(f"STOPPED EARLY at step {step}/{args.steps}: the {args.minutes} min budget ran out "
                  "(the run is not the reproducible one)", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        losses = step_losses(model, next(batches), args.questions_per_image, args.label_smoothing, gen)
        total = losses["caption"] + losses["vqa"] + losses["itc"] + losses["itm"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for key, value in losses.items():
            running[key] = running.get(key, 0.0) + float(value.detach())
        if (step + 1) % args.log_every == 0:
            shown = " ".join(f"{k} {v / args.log_every:.3f}" for k, v in running.items())
            print(f"step {step + 1} lr {lr_at(step):.2e} temp {float(model.temp.detach()):.3f} {shown} "
                  f"[{time.time() - start:.0f}s wall, {time.process_time():.0f}s cpu]", flush=True)
            running = {}
        if args.state is not None and (step + 1) % args.save_every == 0:
            tmp = args.state.with_name(args.state.name + ".tmp")
            torch.save({"recipe": {k: str(v) for k, v in recipe.items()}, "step": step + 1,
                        "model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(),
                        "np_rng": batches.rng.bit_generator.state, "order": batches.order}, tmp)
            os.replace(tmp, args.state)
    export(model, cfg, tok, args.out)
    print(f"wrote {', '.join(f'easyvqa-{n}' for n in CHECKPOINTS)} under {args.out} "
          f"after {step + 1} steps in {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
