"""The benchmark cases: the same work for every contender.

Generation is forced to exactly NEW_TOKENS new tokens (min_new_tokens = max_new_tokens), so a
contender cannot look fast by stopping at [SEP] earlier than another. Inputs are fixed random
images (480x640, so preprocessing resizes as it would for a photo) and fixed texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEW_TOKENS = 20
QUESTION = "what color is the shape on the left?"
TEXT = "a red circle and two blue squares on a table"


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # which checkpoint: "caption", "vqa", "itr" (image-text retrieval: ITM + ITC) or "blip2"
    task: str  # "caption", "vqa", "itm", "itc"
    batch: int
    repeats: int  # timed runs after WARMUP; chosen so the full run stays under ~15 min on 2 cores
    num_beams: int = 1
    why: str = ""

    @property
    def generation(self) -> dict:
        return dict(min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, num_beams=self.num_beams)

    @property
    def throughput(self) -> bool:
        return self.batch > 1


WARMUP = 1
CASES = (
    Case("caption-greedy", "caption", "caption", 1, 7, why="one caption: what an interactive user waits for"),
    Case("caption-beam3", "caption", "caption", 1, 3, num_beams=3, why="BLIP's usual decoding; 3 rows per step"),
    Case("caption-batch8", "caption", "caption", 8, 2, why="offline captioning throughput (captions/s)"),
    Case("vqa", "vqa", "vqa", 1, 5, why="question encoder + answer decoder"),
    Case("itm", "itr", "itm", 1, 7, why="one image-text match: vision + multimodal text encoder"),
    Case("itc-batch8", "itr", "itc", 8, 2, why="retrieval indexing throughput: image features (images/s)"),
    # BLIP-2 (benchmarks.blip2_cases): ViT-g + Q-Former + OPT at opt-1.3b size; VQA as "Question: ... Answer:"
    Case("blip2-caption", "blip2", "caption", 1, 3, why="BLIP-2 caption: ViT-g, Q-Former, OPT prefill + 20 steps"),
    Case("blip2-vqa", "blip2", "vqa", 1, 3, why="BLIP-2 VQA: the question in OPT's prompt after the queries"),
)
MODELS = ("caption", "vqa", "itr", "blip2")
ARCH = {"caption": "BlipForConditionalGeneration", "vqa": "BlipForQuestionAnswering", "itr": "BlipForImageTextRetrieval",
        "blip2": "Blip2ForConditionalGeneration"}
BLIP2 = frozenset({"blip2"})  # models of the BLIP-2 family (their own report section)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n)]
