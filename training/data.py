"""easy-VQA as arrays: images, per-image labels and captions, and the questions.

The `easy_vqa` package ships 64x64 RGB PNGs of one shape on a light background, and questions about
the shape's colour and kind. It has no per-image labels (and some images have no question that
names their shape), so they are read from the pixels: the colour is the palette colour nearest the
shape's median pixel, the kind how much of its bounding box the shape fills. Those labels are then
checked to answer every question of the split exactly as the data set does. Size and position come
from the pixels too (the shape's mask against the background).

Captions are deterministic per image, e.g. "a small red circle in the top left"; a generated
caption is *correct* when it names the image's colour and shape (`caption_correct`), whatever it
says about size and position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
IMAGE_SIZE = 64

_COLOR_RE = re.compile(r"\b(" + "|".join(COLORS) + r")\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")
_NEGATED_RE = re.compile(r"\b(not|no)\b")


@dataclass(frozen=True)
class Split:
    """One easy-VQA split. Images are indexed 0..N-1 (position in `image_ids`)."""

    name: str
    image_ids: np.ndarray  # int64 [N]: easy-VQA image ids (file names)
    images: np.ndarray  # uint8 [N, 64, 64, 3] RGB
    colors: tuple[str, ...]  # [N]
    shapes: tuple[str, ...]  # [N]
    sizes: tuple[str, ...]  # [N] "small" / "large"
    positions: tuple[str, ...]  # [N] e.g. "in the top left"
    questions: tuple[str, ...]  # [Q]
    answers: tuple[str, ...]  # [Q]
    question_image: np.ndarray  # int64 [Q]: index into images of each question

    @property
    def captions(self) -> tuple[str, ...]:
        return tuple(
            caption(c, s, z, p) for c, s, z, p in zip(self.colors, self.shapes, self.sizes, self.positions)
        )


def caption(color: str, shape: str, size: str, position: str) -> str:
    return f"a {size} {color} {shape} {position}"


def caption_correct(text: str, color: str, shape: str) -> bool:
    """A caption is correct when the only colour it names is `color` and the only shape `shape`."""
    return set(_COLOR_RE.findall(text)) == {color} and set(_SHAPE_RE.findall(text)) == {shape}


# The colours as the generator draws them; a shape's median pixel is within ~40 of its colour.
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
           "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0)}


def _pixel_labels(image: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """(colour, shape) of the one shape in `image`. Shape from how much of its bounding box the mask
    fills: rectangles >= 0.96, circles 0.76-0.91 (pi/4 = 0.785 plus edges), triangles 0.50-0.71."""
    median = np.median(image[mask], axis=0)
    color = min(PALETTE, key=lambda c: float(np.abs(median - PALETTE[c]).sum()))
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fill > 0.935 else "circle" if fill > 0.733 else "triangle"
    return color, shape


def expected_answer(question: str, color: str, shape: str) -> str:
    """The answer to an easy-VQA question about an image with one `color` `shape`. Each question
    names a colour or a shape (never both) or asks for one; negations flip yes/no."""
    if question.startswith("what"):
        if "color" in question:
            return color
        return shape
    named = _COLOR_RE.findall(question) + _SHAPE_RE.findall(question)
    if len(named) != 1:
        raise ValueError(f"unexpected easy-VQA question {question!r}")
    present = named[0] in (color, shape)
    return "yes" if present != bool(_NEGATED_RE.search(question)) else "no"


def _mask(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> bool [H, W], True on the shape. The background is one light colour (the
    most common pixel); the shape is far from it (anti-aliased edge pixels may fall either way)."""
    pixels = image.astype(np.int32)
    packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]  # one int per colour
    values, counts = np.unique(packed, return_counts=True)
    bg = int(values[counts.argmax()])
    background = np.array([bg >> 16, (bg >> 8) & 255, bg & 255], dtype=np.int32)
    return np.abs(pixels - background).sum(-1) > 96


def _size_and_position(mask: np.ndarray) -> tuple[str, str]:
    area = mask.mean()
    size = "small" if area < 0.08 else "large"  # about the median over easy-VQA's images
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    row = ("top", "middle", "bottom")[min(int(3 * ys.mean() / h), 2)]
    col = ("left", "center", "right")[min(int(3 * xs.mean() / w), 2)]
    names = {("middle", "center"): "in the center", ("top", "center"): "at the top",
             ("bottom", "center"): "at the bottom", ("middle", "left"): "on the left",
             ("middle", "right"): "on the right"}
    return size, names.get((row, col), f"in the {row} {col}")


@lru_cache(maxsize=2)
def load_split(name: str) -> Split:
    """name: "train" (4,000 images, 38,575 questions) or "test" (1,000 / 9,673)."""
    import easy_vqa

    if name == "train":
        questions, answers, qids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    elif name == "test":
        questions, answers, qids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {name!r}")
    ids = np.array(sorted(paths), dtype=np.int64)
    index = {int(i): n for n, i in enumerate(ids)}
    images = np.stack([np.asarray(Image.open(paths[int(i)]).convert("RGB")) for i in ids])
    masks = [_mask(im) for im in images]
    colors, shapes = zip(*(_pixel_labels(im, m) for im, m in zip(images, masks)))
    sizes, positions = zip(*(_size_and_position(m) for m in masks))
    # The labels read from the pixels must answer every question of the data set as it does.
    wrong = [(q, a, int(i)) for q, a, i in zip(questions, answers, qids)
             if expected_answer(q, colors[index[i]], shapes[index[i]]) != a]
    if wrong:
        raise ValueError(f"easy-VQA {name}: pixel labels contradict {len(wrong)} answers, e.g. {wrong[:3]}")
    return Split(
        name=name,
        image_ids=ids,
        images=images,
        colors=colors,
        shapes=shapes,
        sizes=sizes,
        positions=positions,
        questions=tuple(questions),
        answers=tuple(answers),
        question_image=np.array([index[i] for i in qids], dtype=np.int64),
    )


def all_texts() -> list[str]:
    """Every question, answer and caption of both splits: the tokenizer's training corpus. (The test
    split adds no word the train split lacks; it is included so no test text can ever hit [UNK].)"""
    texts = []
    for name in ("train", "test"):
        s = load_split(name)
        texts += list(s.questions) + list(s.answers) + list(s.captions)
    return texts
