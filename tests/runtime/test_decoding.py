"""blip_runtime.decoding against transformers' `generate` and logits processors.

A tiny BLIP text decoder (transformers, re-randomized weights, EOS logit raised so that some rows end
early) is wrapped in a cache-free torch `Inference`; `generate` over it must give the tokens that
`model.generate` gives. Sampling cannot share torch's random stream, so it is checked through the
filtered distributions (against transformers' warpers) and structural properties.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from blip_runtime.decoding import (
    GenerationOptions, RepetitionPenalty, SuppressEos, Temperature, TopK, TopP, build_filters, generate,
    prompt_position_ids,
)

EOS, PAD, BOS, VOCAB = 3, 0, 97, 99


def tiny_decoder(seed: int = 0, std: float = 0.4, eos_bias: float = 1.5) -> transformers.BlipTextLMHeadModel:
    config = transformers.BlipTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        encoder_hidden_size=24, max_position_embeddings=64, bos_token_id=BOS, sep_token_id=EOS,
        pad_token_id=PAD, eos_token_id=EOS)
    model = transformers.BlipTextLMHeadModel(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # std 0.4 makes the distributions peaky enough for varied, non-tied tokens
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((std if p.ndim > 1 else 0.1) * torch.randn(p.shape, generator=g))
        model.cls.predictions.bias[EOS] += eos_bias  # some sequences end by EOS well before max_new_tokens
    return model


class TorchOracle:
    """Test Inference: keeps the whole history and reruns the full forward, no cache. Position ids are
    the ones transformers' `generate` passes (see test_position_ids_follow_transformers)."""

    def __init__(self, model, encoder_states: torch.Tensor):
        self.model, self.encoder_states = model, encoder_states
        self.tokens = self.positions = None
        self.calls: list[tuple[tuple, tuple]] = []  # (tokens shape, mask shape) per logits call

    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        assert tokens.dtype == np.int64 and attention_mask.dtype == np.int64
        self.calls.append((tokens.shape, attention_mask.shape))
        new = torch.from_numpy(tokens)
        if self.tokens is None:
            self.tokens, self.positions = new, torch.from_numpy(prompt_position_ids(attention_mask))
        else:
            step = torch.arange(1, new.shape[1] + 1)
            self.tokens = torch.cat([self.tokens, new], 1)
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + step], 1)
        assert attention_mask.shape == self.tokens.shape
        with torch.no_grad():
            out = self.model(input_ids=self.tokens, attention_mask=torch.from_numpy(attention_mask),
                             position_ids=self.positions, encoder_hidden_states=self.encoder_states, is_decoder=True)
        return out.logits[:, -1].float().numpy()

    def rearrange(self, source_indices: np.ndarray) -> None:
        index = torch.from_numpy(np.asarray(source_indices, dtype=np.int64))
        self.encoder_states = self.encoder_states[index]
        if self.tokens is not None:
            self.tokens, self.positions = self.tokens[index], self.positions[index]


def cut_after_eos(row: list[int], eos=(EOS,)) -> list[int]:
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0] + 1] if ends else row


def prompts(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[BOS, words...] right-padded with PAD, as BLIP pads batched prompts. int64 [B, max(lengths)] x2."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, 1:n], mask[i, :n] = BOS, rng.integers(4, 90, n - 1), 1
    return ids, mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for threads; with other jobs on the machine they only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return tiny_decoder()


def encoder_states(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 7, 24, generator=torch.Generator().manual_seed(seed))


def both(model, ids, mask, seed=1, eos=EOS, **kw) -> tuple[list[list[int]], list[list[int]]]:
    """(ours, transformers') generated tokens per returned sequence, EOS included, pads stripped.
    seed: the encoder states'."""
    enc = encoder_states(len(ids), seed)
    options = GenerationOptions(eos_token_id=eos, pad_token_id=PAD, **kw)
    ours = generate(TorchOracle(model, enc), ids, mask, options)
    kw.pop("seed", None)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             encoder_hidden_states=enc, eos_token_id=eos, pad_token_id=PAD, **kw)
    theirs = [cut_after_eos(row[ids.shape[1]:], np.atleast_1d(eos).tolist()) for row in out.tolist()]
    return ours, theirs


def assert_same(ours, theirs):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"sequence {i}: ours {a} != transformers {b}"
    assert len(ours) == len(theirs)


# --------------------------------------------------------------------------------------------------
# Token-for-token parity with model.generate


def test_greedy_batch1(model):
    ids, mask = prompts([4])
    ours, theirs = both(model, ids, mask, max_new_tokens=20)
    assert_same(ours, theirs)


def test_greedy_batch4_right_padded(model):
    ids, mask = prompts([1, 3, 5, 2], seed=0)
    ours, theirs = both(model, ids, mask, seed=4, max_new_tokens=20)
    assert_same(ours, theirs)
    ended = [len(s) < 20 and s[-1] == EOS for s in ours]
    assert any(ended) and not all(ended), f"want rows ending by EOS and by max_new_tokens: {ours}"


BEAM_PROMPTS = dict(lengths=[2, 4, 1], seed=2)  # with encoder seed 5: some beams end by EOS, some at max


@pytest.mark.parametrize("length_penalty", [1.0, 0.6, 2.0])
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search(model, length_penalty, early_stopping):
    ids, mask = prompts(**BEAM_PROMPTS)
    ours, theirs = both(model, ids, mask, seed=5, max_new_tokens=12, num_beams=3,
                        length_penalty=length_penalty, early_stopping=early_stopping)
    assert_same(ours, theirs)
    assert any(s[-1] == EOS and len(s) < 12 for s in ours) and any(EOS not in s for s in ours), ours


def test_beam_search_options_matter(model):
    """Not vacuous: length_penalty and early_stopping change the results of test_beam_search."""
    ids, mask = prompts(**BEAM_PROMPTS)
    results = {str(generate(TorchOracle(model, encoder_states(3, 5)), ids, mask,
                            GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=12, num_beams=3,
                                              length_penalty=lp, early_stopping=es)))
               for lp in (1.0, 0.6, 2.0) for es in (True, False)}
    assert len(results) >= 4


@pytest.mark.parametrize("early_stopping", ["never", True])
def test_beam_search_return_sequences(model, early_stopping):
    ids, mask = prompts([3, 1], seed=7)
    ours, theirs = both(model, ids, mask, seed=4, max_new_tokens=10, num_beams=4, num_return_sequences=3,
                        early_stopping=early_stopping, length_penalty=0.8)
    assert len(ours) == 6
    assert_same(ours, theirs)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens(model, num_beams):
    ids, mask = prompts([1, 2, 3, 1], seed=11)
    free, _ = both(model, ids, mask, seed=6, max_new_tokens=15, num_beams=num_beams)
    assert any(len(s) < 6 and s[-1] == EOS for s in free), f"nothing ends before 6 tokens: {free}"
    ours, theirs = both(model, ids, mask, seed=6, max_new_tokens=15, num_beams=num_beams, min_new_tokens=6)
    assert_same(ours, theirs)
    assert all(EOS not in s[:5] for s in ours)


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")
def test_min_new_tokens_above_max(model):
    """Allowed, as in transformers: EOS is never possible, every row runs to max_new_tokens."""
    ids, mask = prompts([1, 2, 3, 1], seed=11)
    ours, theirs = both(model, ids, mask, seed=6, max_new_tokens=7, num_beams=2, min_new_tokens=30)
    assert_same(ours, theirs)
    assert all(len(s) == 7 and EOS not in s for s in ours)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty(model, num_beams):
    ids, mask = prompts([2, 5, 3], seed=13)
    plain, _ = both(model, ids, mask, seed=8, max_new_tokens=15, num_beams=num_beams)
    ours, theirs = both(model, ids, mask, seed=8, max_new_tokens=15, num_beams=num_beams, repetition_penalty=1.3)
    assert_same(ours, theirs)
    assert ours != plain  # the penalty changed something


def test_max_new_tokens_vs_eos(model):
    ids, mask = prompts([2, 2, 4, 1, 3, 2], seed=17)
    ours, theirs = both(model, ids, mask, seed=9, max_new_tokens=8)
    assert_same(ours, theirs)
    by_eos = [s for s in ours if s[-1] == EOS]
    by_length = [s for s in ours if EOS not in s]
    assert by_eos and by_length and all(len(s) == 8 for s in by_length), ours
    short, theirs = both(model, ids, mask, seed=9, max_new_tokens=2)
    assert_same(short, theirs)
    assert all(a[: len(b)] == b for a, b in zip(ours, short))


@pytest.mark.parametrize("case", range(12))
def test_random_configurations(model, case):
    """Random batch, prompt lengths and options, one or two EOS ids (a 200-case run of this found no
    difference; these 12 keep it honest)."""
    r = np.random.default_rng(case)
    lengths = r.integers(1, 6, int(r.integers(1, 5))).tolist()
    kw = dict(max_new_tokens=int(r.integers(1, 16)), num_beams=int(r.choice([1, 2, 3, 4, 5])))
    if kw["num_beams"] > 1:
        kw.update(length_penalty=float(r.choice([1.0, 0.6, 2.0, 0.0, -0.5])),
                  early_stopping=[True, False, "never"][int(r.integers(3))],
                  num_return_sequences=int(r.integers(1, kw["num_beams"] + 1)))
    if r.random() < 0.4:
        kw["min_new_tokens"] = int(r.integers(0, kw["max_new_tokens"] + 1))
    if r.random() < 0.4:
        kw["repetition_penalty"] = float(r.choice([1.3, 0.8, 2.0]))
    eos = [EOS, 7] if case % 2 else EOS
    ids, mask = prompts(lengths, seed=case)
    ours, theirs = both(model, ids, mask, seed=case, eos=eos, **kw)
    assert_same(ours, theirs)


def test_position_ids_follow_transformers(model):
    """transformers 5.23 gives a right-padded prompt position ids cumsum(mask) - 1 (0 on pads) and then
    continues from the LAST column's position + 1: after trailing pads, new tokens restart at 1."""
    ids, mask = prompts([2, 4], seed=19)
    seen = []
    embeddings = model.bert.embeddings
    original = embeddings.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["position_ids"].clone())
        return original(*args, **kwargs)

    embeddings.forward = spy
    try:
        with torch.no_grad():
            model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False,
                           encoder_hidden_states=encoder_states(2), eos_token_id=EOS, pad_token_id=PAD,
                           max_new_tokens=3, min_new_tokens=3)
    finally:
        del embeddings.forward
    expected = prompt_position_ids(mask)
    assert expected.tolist() == [[0, 1, 0, 0], [0, 1, 2, 3]]
    for k, positions in enumerate(seen):
        assert positions.tolist() == np.concatenate([expected, expected[:, -1:] + np.arange(1, k + 1)], 1).tolist()
    assert seen[-1].tolist() == [[0, 1, 0, 0, 1, 2], [0, 1, 2, 3, 4, 5]]


def test_inference_protocol_calls(model):
    """The prompt once, then one token per row; beams expanded by rearrange before the first call."""
    ids, mask = prompts([2, 3], seed=23)
    oracle = TorchOracle(model, encoder_states(2))
    out = generate(oracle, ids, mask, GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, num_beams=3,
                                                        max_new_tokens=5, min_new_tokens=5))
    assert [len(s) for s in out] == [5, 5]
    assert oracle.calls[0] == ((6, 3), (6, 3))
    assert oracle.calls[1:] == [((6, 1), (6, 3 + k)) for k in range(1, 5)]


# --------------------------------------------------------------------------------------------------
# Filters against transformers' processors on the same random logits


def random_scores(n=6, v=VOCAB, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    scores[0, :5] = scores[0, 5]  # ties
    return scores


def compare(ours_filter, theirs_processor, tokens=None, what=""):
    scores = random_scores()
    tokens = np.zeros((len(scores), 1), np.int64) if tokens is None else tokens
    expected = theirs_processor(torch.from_numpy(tokens), torch.from_numpy(scores.copy())).numpy()
    got = scores.copy()
    ours_filter.apply(got, tokens)
    assert (np.isneginf(got) == np.isneginf(expected)).all(), f"{what}: different tokens filtered"
    finite = np.isfinite(expected)
    err = float(np.abs(got[finite] - expected[finite]).max())
    print(f"{what}: max abs error {err:.3e}, {int((~finite).sum())} filtered")
    assert err == 0.0, f"{what}: max abs error {err:.3e}"


@pytest.mark.parametrize("top_k,keep", [(1, 1), (5, 1), (1, 2), (50, 1), (200, 1)])
def test_top_k_matches_transformers(top_k, keep):
    compare(TopK(top_k, keep), hf.TopKLogitsWarper(top_k, min_tokens_to_keep=keep), what=f"top_k={top_k} keep={keep}")


@pytest.mark.parametrize("top_p,keep", [(0.9, 1), (0.5, 1), (1e-6, 1), (1e-6, 2), (0.999, 3)])
def test_top_p_matches_transformers(top_p, keep):
    compare(TopP(top_p, keep), hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep), what=f"top_p={top_p} keep={keep}")


@pytest.mark.parametrize("temperature", [0.3, 1.7])
def test_temperature_matches_transformers(temperature):
    compare(Temperature(temperature), hf.TemperatureLogitsWarper(temperature), what=f"temperature={temperature}")


def test_repetition_penalty_matches_transformers():
    tokens = np.random.default_rng(1).integers(0, VOCAB, (6, 12))
    skip = np.array([0, 3, 0, 11, 1, 0])  # left-pad lengths, as generate passes them
    compare(RepetitionPenalty(1.3, skip), hf.RepetitionPenaltyLogitsProcessor(1.3, torch.from_numpy(skip)),
            tokens, what="repetition_penalty=1.3")
    compare(RepetitionPenalty(0.7, np.zeros(6, np.int64)), hf.RepetitionPenaltyLogitsProcessor(0.7),
            tokens, what="repetition_penalty=0.7")


@pytest.mark.parametrize("generated", [0, 3, 4])
def test_min_new_tokens_matches_transformers(generated):
    tokens = np.ones((6, 5 + generated), np.int64)
    compare(SuppressEos(5, 4, np.array([EOS, 7])), hf.MinNewTokensLengthLogitsProcessor(5, 4, [EOS, 7]),
            tokens, what=f"min_new_tokens=4 after {generated}")


def test_sampling_chain_matches_transformers():
    """temperature, top-k, top-p in generate's order, on the processed distribution."""
    options = GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, do_sample=True, temperature=0.7, top_k=20,
                                top_p=0.8, repetition_penalty=1.2)
    tokens = np.random.default_rng(2).integers(0, VOCAB, (6, 8))
    chain = hf.LogitsProcessorList([hf.RepetitionPenaltyLogitsProcessor(1.2, torch.zeros(6, dtype=torch.long)),
                                    hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.8)])

    class Chain:
        def apply(self, scores, tokens):
            for f in build_filters(options, np.ones_like(tokens)):
                f.apply(scores, tokens)

    compare(Chain(), chain, tokens, what="sampling chain")


# --------------------------------------------------------------------------------------------------
# Sampling: structural and statistical


class FixedLogits:
    """Inference returning the same logits every step (one row per request, repeated by rearrange)."""

    def __init__(self, scores: np.ndarray):
        self.scores = scores

    def logits(self, tokens, attention_mask):
        return self.scores.copy()

    def rearrange(self, source_indices):
        self.scores = self.scores[source_indices]


def sample(model, ids, mask, **kw):
    return generate(TorchOracle(model, encoder_states(len(ids), 2)), ids, mask,
                    GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, do_sample=True, **kw))


def test_sampling_degenerate_cases_equal_greedy(model):
    ids, mask = prompts([2, 4, 1], seed=29)
    greedy, _ = both(model, ids, mask, seed=2, max_new_tokens=12)
    assert sample(model, ids, mask, max_new_tokens=12, top_k=1, seed=0) == greedy
    assert sample(model, ids, mask, max_new_tokens=12, top_p=1e-6, seed=0) == greedy
    assert sample(model, ids, mask, max_new_tokens=12, temperature=1e-3, seed=0) == greedy


def test_sampling_is_deterministic_per_seed(model):
    ids, mask = prompts([2, 4, 1], seed=29)
    a = sample(model, ids, mask, max_new_tokens=12, seed=123)
    assert a == sample(model, ids, mask, max_new_tokens=12, seed=123)
    assert a != sample(model, ids, mask, max_new_tokens=12, seed=124)
    beams = dict(max_new_tokens=8, num_beams=3, seed=5)
    assert sample(model, ids, mask, **beams) == sample(model, ids, mask, **beams)


def test_sampling_respects_top_k_and_frequencies():
    scores = random_scores(n=1, seed=3)
    options = GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, do_sample=True, top_k=5, temperature=1.5,
                                max_new_tokens=1, num_return_sequences=20000, seed=7)
    out = np.array(generate(FixedLogits(scores), np.full((1, 1), BOS), np.ones((1, 1), np.int64), options))
    expected = hf.TopKLogitsWarper(5)(None, hf.TemperatureLogitsWarper(1.5)(None, torch.from_numpy(scores)))
    probs = torch.softmax(expected, -1).numpy()[0]
    allowed = set(np.flatnonzero(probs > 0))
    assert len(allowed) == 5 and set(out.ravel()) <= allowed
    freq = np.bincount(out.ravel(), minlength=VOCAB) / out.size
    err = float(np.abs(freq - probs).max())
    print(f"top_k=5 sampling frequencies: max abs error {err:.3e} over {out.size} draws")
    assert err < 0.015


def test_sampling_finished_rows_stop():
    scores = np.full((1, VOCAB), -5.0, np.float32)
    scores[0, EOS], scores[0, 10] = 0.0, 0.0  # half the draws end at each step
    options = GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, do_sample=True, max_new_tokens=6,
                                num_return_sequences=64, seed=1, top_k=2)
    out = generate(FixedLogits(scores), np.full((1, 1), BOS), np.ones((1, 1), np.int64), options)
    assert all(set(s[:-1]) <= {10} and (s[-1] == EOS or len(s) == 6) for s in out)
    assert {len(s) for s in out} >= {1, 2, 6}


# --------------------------------------------------------------------------------------------------
# Options and the torch-free import


@pytest.mark.parametrize("field,value", [
    ("num_beams", 0), ("max_new_tokens", 0), ("min_new_tokens", -1),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0.0), ("early_stopping", "sometimes"),
    ("num_return_sequences", 2), ("eos_token_id", []), ("pad_token_id", -1), ("length_penalty", float("nan")),
])
def test_invalid_options(field, value):
    kw = dict(eos_token_id=EOS, pad_token_id=PAD)
    kw[field] = value
    with pytest.raises(ValueError, match=f"GenerationOptions.{field}=.*expected"):
        GenerationOptions(**kw)


def test_invalid_sampling_options():
    with pytest.raises(ValueError, match="temperature=0.0.*> 0"):
        GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, do_sample=True, temperature=0.0)
    GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, temperature=0.0)  # ignored without sampling
    with pytest.raises(ValueError, match="num_return_sequences"):
        GenerationOptions(eos_token_id=EOS, pad_token_id=PAD, num_beams=2, num_return_sequences=3)


def test_import_without_torch():
    root = Path(__file__).resolve().parents[2]
    code = "import sys, blip_runtime.decoding; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_topk_is_sorted_with_ties_lowest_index_first():
    """_topk against a stable full sort: the k largest per row, best first, equal values lowest index
    first (the argmax passes of wide rows and the partition of narrow ones); rows with fewer than k
    finite values (the argmax passes fall back to the sort) give the same values as the sort."""
    from blip_runtime.decoding import _topk

    rng = np.random.default_rng(0)
    for shape, k in [((3, 91572), 6), ((2, 400), 6), ((4, 12), 3), ((1, 6), 6)]:
        x = rng.standard_normal(shape).astype(np.float32)
        ties = np.round(x * 2) / 2  # many equal values, also at the k-th place
        for data in (x, ties):
            ref = np.argsort(-data, axis=1, kind="stable")[:, :k]
            assert np.array_equal(_topk(data, k), ref), (shape, k)
    sparse = np.full((2, 1000), -np.inf, dtype=np.float32)
    sparse[0, [7, 3]] = [1.0, 2.0]
    sparse[1, 500] = 0.5
    got = _topk(sparse, 4)
    assert got[0, :2].tolist() == [3, 7] and got[1, 0] == 500
    assert np.array_equal(np.take_along_axis(sparse, got, 1), -np.sort(-sparse, axis=1)[:, :4])
    assert all(len(set(row)) == 4 for row in got.tolist())
