"""Image loading and BLIP preprocessing with numpy and pillow only.

Reproduces transformers' `BlipImageProcessor` as transformers 5.23 builds it where torchvision is
absent (it then falls back to `BlipImageProcessorPil`, the `PilBackend`), bit for bit:

1. RGB conversion of the PIL image (`transformers.image_transforms.convert_to_rgb`): a mode with
   an "A" band or a `transparency` entry in `info` is converted to RGBA and alpha-composited onto
   white; every other mode goes through `Image.convert("RGB")`. Quirks this keeps: "LAB" counts as
   having alpha because its a* band is named "A"; a file path given to the processor is loaded by
   `transformers.image_utils.load_image`, which applies the EXIF orientation and then
   `convert("RGB")` *without* compositing, so an RGBA PNG path keeps its RGB under the alpha, while
   the same image passed as a PIL object is composited onto white. `load_image` below follows both.
   One deliberate difference: transformers clips "I;16", "I" and "F" images to [0, 255] (a 16-bit
   photo becomes nearly white); we scale them to 8 bits first (`to_8bit`).
2. Resize of the uint8 RGB image with PIL (`Image.resize`, bicubic by default, no reducing_gap).
3. Rescale: uint8 -> float64, times `rescale_factor`, then cast to float32.
4. Normalize in float32: `(x - mean) / std` with mean and std cast to float32.

Size limits (not in transformers): an image of more than `max_image_pixels` pixels (default
`MAX_IMAGE_PIXELS`, 50 M) is refused, so that one small file that decodes huge (a 10000 x 10000 PNG
of 300 KB is 300 MB of RGB) cannot exhaust memory; a JPEG file above the limit is instead decoded
reduced by its DCT scaling (`Image.draft`: 1/2, 1/4 or 1/8) to no less than `DRAFT_MARGIN` (2) times
the model's input size per side, which moves the resized pixels by up to 2 grey levels on a
photograph (mean 0.2) and 5 on pure noise. Images within the limit are decoded in full, as
transformers does. Pillow's own bomb guard (twice `PIL.Image.MAX_IMAGE_PIXELS`) still applies at
open.

The torchvision backend (what `BlipImageProcessor()` gives once torchvision is installed) differs:
it resizes uint8 tensors with torchvision's antialiased bicubic, which is close to PIL but not bit
exact (off by a grey level here and there), and fuses rescale+normalize as
`(x - 255*mean) / (255*std)` in float32 (~1e-7 apart). We follow the PIL backend because it is
deterministic, needs no torch, and is what the original BLIP repository used (PIL bicubic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# Pixels (width x height) an image may decode to; a user may change it here or per ImageSettings.
MAX_IMAGE_PIXELS = 50_000_000
# A JPEG above the limit decodes reduced, to at least this many times the model's input size per side.
DRAFT_MARGIN = 2
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")

# transformers.image_utils.OPENAI_CLIP_MEAN / OPENAI_CLIP_STD: BLIP and BLIP-2 both use them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_size(size: tuple[int, int], limit: int | None, where: str, what: str = "the image") -> None:
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    w, h = size
    if w * h > limit:
        raise ValueError(
            f"{where}: {what} has {w}x{h} pixels ({w * h / 1e6:.1f} M), above the limit of {limit / 1e6:g} M "
            "pixels; expected a smaller image (or raise blip_runtime.image.MAX_IMAGE_PIXELS / "
            "ImageSettings.max_image_pixels)"
        )


def _open(path: str, where: str, need: tuple[int, int], limit: int | None) -> Image.Image:
    """Decode a file as transformers' load_image does (upright by EXIF, then plain RGB), within the
    pixel limit: a JPEG above it decodes reduced to no less than DRAFT_MARGIN x `need` (width, height)."""
    limit = MAX_IMAGE_PIXELS if limit is None else limit
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > limit and im.format == "JPEG":
                im.draft(im.mode, (need[0] * DRAFT_MARGIN, need[1] * DRAFT_MARGIN))
            drafted = f" (a {w}x{h} JPEG, decoded reduced)" if im.size != (w, h) else ""
            _check_size(im.size, limit, where, f"image file {path!r}{drafted}")
            im.load()
            im = ImageOps.exif_transpose(im, in_place=False) if im.getexif().get(0x0112, 1) != 1 else im
            if im.mode in HIGH_DEPTH_MODES:
                im = to_8bit(im)
            # convert("RGB") copies even an RGB image: skip it then, one full-size copy fewer
            return im if im.mode == "RGB" else im.convert("RGB")
    except Image.DecompressionBombError as e:  # Pillow's guard, above twice its MAX_IMAGE_PIXELS
        raise ValueError(f"{where}: image file {path!r} is too large to decode: {e}") from None
    except (OSError, ValueError) as e:  # missing file, unreadable or truncated data
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: cannot read image file {path!r}: {e}") from e


def _load(x: Any, where: str, need: tuple[int, int] = (384, 384), limit: int | None = None) -> Image.Image:
    if isinstance(x, Image.Image):
        _check_size(x.size, limit, where)
        return x
    if isinstance(x, (str, os.PathLike)):
        return _open(os.fspath(x), where, need, limit)
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
            raise ValueError(
                f"{where}: numpy image must be uint8 with shape (H, W, 3) RGB or (H, W) grayscale, "
                f"got dtype {x.dtype} shape {x.shape}"
            )
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{where}: numpy image is empty, shape {x.shape}")
        _check_size((x.shape[1], x.shape[0]), limit, where)
        # transformers reads an (H, W, 3) array exactly as Image.fromarray does; it cannot take
        # (H, W) arrays at all (it mistakes them for a list of rows), so those become mode "L".
        return Image.fromarray(np.ascontiguousarray(x))
    raise ValueError(
        f"{where}: expected a file path (str or os.PathLike), a PIL.Image.Image or a uint8 numpy "
        f"array (H, W, 3) or (H, W), got {type(x).__name__}"
    )


def load_image(x: Any, max_image_pixels: int | None = None) -> Image.Image:
    """A path, PIL image or uint8 array (H, W, 3) / (H, W) as a PIL image.

    Paths are decoded, EXIF-transposed and converted to RGB (as transformers does for paths, with
    16-bit and float data scaled to 8 bits, see `to_8bit`); PIL images are returned unchanged
    (their mode is handled by `preprocess`); arrays become "RGB" or "L" images. Anything else, an
    unreadable file, or an image of more than `max_image_pixels` pixels (default MAX_IMAGE_PIXELS)
    raises ValueError naming the image.
    """
    return _load(x, "image", limit=max_image_pixels)


@dataclass(frozen=True)
class ImageSettings:
    """How images become pixel_values; field defaults are `BlipImageProcessor`'s (BLIP, 384 px)."""

    size: tuple[int, int] = (384, 384)  # (height, width) after resize; BLIP-2 uses 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)  # PIL resample filter id (3)
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    max_image_pixels: int | None = None  # pixels an input may have; None: the module's MAX_IMAGE_PIXELS

    def __post_init__(self):
        for name in ("size", "mean", "std"):  # lists from JSON become tuples: hashable, immutable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) with positive ints, got {self.size}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {getattr(self, name)}")
        if any(s == 0 for s in self.std):
            raise ValueError(f"std must be non-zero, got {self.std}")
        Image.Resampling(self.resample)  # raises ValueError for an unknown filter id

    @classmethod
    def from_preprocessor_config(cls, d: dict) -> ImageSettings:
        """Build from the dict of a Hugging Face `preprocessor_config.json` for BLIP / BLIP-2.

        Missing keys take the class defaults, as transformers does. `size` may be
        {"height", "width"}, an int (square, BLIP's `default_to_square`) or [height, width].
        """
        size = d.get("size", cls.size)
        if isinstance(size, dict):
            size = {k: v for k, v in size.items() if v is not None}
            if set(size) != {"height", "width"}:
                # transformers would keep the aspect ratio ({"shortest_edge"} and friends), giving
                # a different H, W per image: BLIP's vision graph has fixed position embeddings.
                raise ValueError(
                    f"preprocessor_config size {size} is not supported: BLIP needs a fixed "
                    '{"height": H, "width": W}'
                )
            size = (size["height"], size["width"])
        elif isinstance(size, int):
            size = (size, size)
        for key in ("do_center_crop", "do_pad"):
            if d.get(key):
                raise ValueError(f"preprocessor_config {key}=true is not supported for BLIP")

        def triple(key, default):
            v = d.get(key)
            if v is None:
                return default
            return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

        def flag(key):
            v = d.get(key)
            return getattr(cls, key) if v is None else bool(v)

        factor = d.get("rescale_factor")
        resample = d.get("resample")
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=triple("image_mean", CLIP_MEAN),
            std=triple("image_std", CLIP_STD),
            rescale_factor=cls.rescale_factor if factor is None else float(factor),
            resample=cls.resample if resample is None else int(resample),
            do_convert_rgb=flag("do_convert_rgb"),
            do_resize=flag("do_resize"),
            do_rescale=flag("do_rescale"),
            do_normalize=flag("do_normalize"),
        )

    def to_dict(self) -> dict:
        """JSON-ready, with `preprocessor_config.json` key names (round-trips through the above)."""
        return {
            "size": {"height": self.size[0], "width": self.size[1]},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "rescale_factor": self.rescale_factor,
            "resample": self.resample,
            "do_convert_rgb": self.do_convert_rgb,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }


def to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float image ("I;16*", "I", "F") as an 8-bit "L" image, scaled
    rather than clipped (transformers clips to [0, 255]):

    - "I;16*": 16-bit data, v * 255 / 65535 rounded;
    - "I": taken as 8-bit when every value is in [0, 255], as 16-bit when in [0, 65535] (what 16-bit
      PNG and TIFF data decode to in older Pillow), otherwise stretched from its [min, max];
    - "F": taken as [0, 1] data when every value is in [0, 1], as 8-bit when in [0, 255], otherwise
      stretched from its [min, max]; NaN becomes 0.
    """
    a = np.asarray(image)
    if image.mode.startswith("I;16"):
        out = (a.astype(np.uint32) * 255 + 32767) // 65535
    else:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1.0 if image.mode == "F" else 255.0
        if lo >= 0 and hi <= top:
            scale, lo = 255.0 / top, 0.0
        elif lo >= 0 and hi <= (255.0 if image.mode == "F" else 65535.0):
            scale, lo = 255.0 / (255.0 if image.mode == "F" else 65535.0), 0.0
        else:
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.rint((a - lo) * scale)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL: composite transparency onto white, else convert;
    16-bit and float images are scaled to 8 bits first (`to_8bit`), not clipped."""
    if image.mode in HIGH_DEPTH_MODES:
        image = to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(images: list, settings: ImageSettings = ImageSettings()) -> np.ndarray:
    """Images (paths, PIL images or uint8 arrays, see `load_image`) -> pixel_values.

    Returns float32 [B, 3, H, W], H, W = settings.size (or the input size when do_resize is off,
    in which case all images must share it).
    """
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"images must be a non-empty list, got {type(images).__name__} {images!r:.80}")
    h, w = settings.size
    rgb = []  # uint8 (H, W, 3) each
    for i, x in enumerate(images):
        where = f"images[{i}]"
        try:
            im = _load(x, where, need=(w, h), limit=settings.max_image_pixels)
            if settings.do_convert_rgb:
                im = to_rgb(im)
            elif im.mode != "RGB":
                raise ValueError(f"{where}: mode {im.mode!r} with do_convert_rgb=False; expected RGB")
            if settings.do_resize:
                im = im.resize((w, h), resample=settings.resample)  # PIL takes (width, height)
        except OSError as e:  # PIL decodes lazily: a truncated file can fail at convert/resize
            raise ValueError(f"{where}: cannot decode image: {e}") from e
        rgb.append(np.asarray(im))
    shapes = {a.shape for a in rgb}
    if len(shapes) > 1:
        raise ValueError(f"images differ in size with do_resize=False: {sorted(shapes)}")
    x = np.stack(rgb).transpose(0, 3, 1, 2)  # (B, 3, H, W) uint8
    # A uint8 pixel has 256 values: rescale and normalize them once per channel and look the
    # pixels up (twice as fast as computing per pixel, and the same float32 numbers bit for bit).
    table = pixel_table(settings)  # (3, 256) float32
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(3):
        np.take(table[c], x[:, c], out=out[:, c])
    return out


def pixel_table(settings: ImageSettings) -> np.ndarray:
    """float32 (3, 256): what rescale + normalize make of each uint8 value, per channel, computed
    as transformers computes it per pixel."""
    v = np.arange(256, dtype=np.uint8)
    if settings.do_rescale:
        # transformers upcasts to float64 before scaling and casts to float32 after.
        v = (v.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    v = np.broadcast_to(v.astype(np.float32, copy=False), (3, 256))
    if settings.do_normalize:
        mean = np.asarray(settings.mean, dtype=np.float32).reshape(3, 1)
        std = np.asarray(settings.std, dtype=np.float32).reshape(3, 1)
        v = (v - mean) / std  # float32 throughout, as transformers' normalize
    return np.ascontiguousarray(v, dtype=np.float32)
