"""Backend-neutral decoding: greedy, sampling and beam search over an `Inference` backend.

Shaped like openai/whisper's decoding.py: `DecodingTask` talks only to an `Inference` (ONNX Runtime,
TensorRT, or a test oracle), small `LogitFilter`s reshape the scores, and a `GreedyDecoder` (which
also samples) or a `BeamSearchDecoder` picks the tokens. numpy only: `blip_runtime` never imports torch.

Given the same logits it reproduces transformers' `generate` (5.23: `_sample`, `_beam_search`,
logits_process.py, stopping_criteria.py) token for token, float32 arithmetic in the same order.
Sampling draws from numpy's generator, so it matches in distribution, not in the draws. Each request
draws from a generator of its own, seeded with `seed`, so a request's samples do not depend on the
other requests in its batch (transformers draws for the whole batch from one generator).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from .options import GenerationOptions

# transformers' "impossible" beam score: finite, so that masked sums still order among themselves.
_NEG = np.float32(-1.0e9)


class Inference(Protocol):
    def logits(self, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """tokens: int64 [N, S], the tokens the model has not seen yet (first call: the whole prompt,
        later [N, 1]). attention_mask: int64 [N, P+S], 1 for real tokens, over everything seen so far
        plus these. Returns float32 [N, V], the logits of each row's last position."""
        ...

    def rearrange(self, source_indices: np.ndarray) -> None:
        """source_indices: int64 [N']. Row i of every cached state (KV cache, encoder states) becomes old
        row source_indices[i]. Also called before the first step to expand B requests to K beams or
        samples each, with np.repeat(np.arange(B), K)."""
        ...


# ---------------------------------------------------------------------------------------------------
# Logit filters: each mirrors one transformers LogitsProcessor, in place on float32 [N, V] scores.


class LogitFilter:
    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        """scores: float32 [N, V], changed in place. tokens: int64 [N, T], prompt (with its pads) plus
        the tokens generated so far, as transformers' `input_ids`."""
        raise NotImplementedError


class RepetitionPenalty(LogitFilter):
    """RepetitionPenaltyLogitsProcessor: every token present once or more in a row is divided by the
    penalty (multiplied where negative). `generate` skips each row's leading mask-0 columns (left
    padding) but not trailing ones, so a right-padded prompt penalizes pad_token_id too."""

    def __init__(self, penalty: float, skip: np.ndarray):
        self.penalty = np.float32(penalty)
        self.skip = skip  # int64 [N]: index of each row's first 1 in the prompt's attention mask

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        n, v = scores.shape
        ids = np.where(np.arange(tokens.shape[1]) < self.skip[:, None], v, np.minimum(tokens, v))
        present = np.zeros((n, v + 1), dtype=bool)
        present[np.arange(n)[:, None], ids] = True  # column v collects the skipped and out-of-vocab ids
        present = present[:, :v]
        hit = scores[present]
        scores[present] = np.where(hit < 0, hit * self.penalty, hit / self.penalty)


class SuppressEos(LogitFilter):
    """MinNewTokensLengthLogitsProcessor: EOS gets -inf while fewer than `min_new_tokens` were generated."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_ids: np.ndarray):
        self.prompt_length, self.min_new_tokens, self.eos_ids = prompt_length, min_new_tokens, eos_ids

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        if tokens.shape[1] - self.prompt_length < self.min_new_tokens:
            scores[:, self.eos_ids[self.eos_ids < scores.shape[1]]] = -np.inf


class Temperature(LogitFilter):
    """TemperatureLogitsWarper"""

    def __init__(self, temperature: float):
        self.temperature = np.float32(temperature)

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        scores /= self.temperature


class TopK(LogitFilter):
    """TopKLogitsWarper: -inf below the k-th best score; ties with it are kept."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        k = min(self.top_k, scores.shape[1])
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
        scores[scores < kth] = -np.inf


class TopP(LogitFilter):
    """TopPLogitsWarper: ascending sort, drop the tokens whose cumulative probability is <= 1 - top_p."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.threshold = np.float32(1.0 - top_p)  # torch compares float32 against the scalar as float32
        self.min_tokens_to_keep = min_tokens_to_keep

    def apply(self, scores: np.ndarray, tokens: np.ndarray) -> None:
        order = np.argsort(scores, axis=1, kind="stable")
        # torch's CPU cumsum accumulates float32 in double
        cumulative = np.cumsum(_softmax(np.take_along_axis(scores, order, 1)), axis=1, dtype=np.float64)
        drop_sorted = cumulative.astype(np.float32) <= self.threshold
        drop_sorted[:, -self.min_tokens_to_keep :] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, 1)
        scores[drop] = -np.inf


def build_filters(options: GenerationOptions, prompt_mask: np.ndarray) -> list[LogitFilter]:
    """The filters in transformers' `_get_logits_processor` order. prompt_mask: int64 [N, S0] (expanded)."""
    filters: list[LogitFilter] = []
    if options.repetition_penalty != 1.0:
        filters.append(RepetitionPenalty(options.repetition_penalty, (prompt_mask != 0).argmax(axis=1)))
    if options.min_new_tokens > 0:
        filters.append(SuppressEos(prompt_mask.shape[1], options.min_new_tokens, options.eos_ids))
    if options.do_sample:
        # beams keep one non-EOS token more than there are EOS ids, so that a beam can always continue
        keep = len(options.eos_ids) + 1 if options.num_beams > 1 else 1
        if options.temperature != 1.0:
            filters.append(Temperature(options.temperature))
        if options.top_k != 0:
            filters.append(TopK(options.top_k, keep))
        if options.top_p < 1.0:
            filters.append(TopP(options.top_p, keep))
    return filters


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices [R, k] of the k largest values of each row of x [R, C], best first (torch.topk, sorted),
    equal values lowest index first. Beam search ranks num_beams * V candidates (~92k for BLIP with 3
    beams) for 2 * num_beams of them: k passes of argmax (which returns the first maximum) take 0.05 ms
    there against 1 ms for a partition and a sort. Narrow rows, and rows with fewer than k values above
    -inf (where an argmax pass could pick a masked index again), take a stable sort."""
    if x.shape[1] > 32 * k:
        work, rows = x.copy(), np.arange(x.shape[0])
        out = np.empty((x.shape[0], k), dtype=np.int64)
        for j in range(k):
            out[:, j] = work.argmax(axis=1)
            work[rows, out[:, j]] = -np.inf
        if not np.isneginf(np.take_along_axis(x, out, 1)).any():
            return out
    return np.argsort(-x, axis=1, kind="stable")[:, :k]


# ---------------------------------------------------------------------------------------------------
# Decoders: choose the next tokens from the logits; the task feeds them back to the backend.


class Step(NamedTuple):
    next_tokens: np.ndarray  # int64 [N], appended to the rows below
    source_indices: np.ndarray | None  # int64 [N]: rows to keep (beam reordering), None: unchanged
    done: bool  # no further step needed


def _generators(options: GenerationOptions, requests: int) -> list[np.random.Generator] | None:
    """One generator per request, all seeded alike: a request draws what it draws alone."""
    return [np.random.default_rng(options.seed) for _ in range(requests)] if options.do_sample else None


class GreedyDecoder:
    """transformers' `_sample`: argmax, or one multinomial draw per row; EOS ends a row, which then
    receives pad_token_id until every row has ended or max_new_tokens is reached. Rows are
    request-major: `rows // requests` consecutive rows per request, each request sampling from its
    own generator (requests=1: one generator for all rows)."""

    def __init__(self, options: GenerationOptions, filters: list[LogitFilter], rows: int, prompt_length: int,
                 requests: int = 1):
        self.options, self.filters, self.prompt_length = options, filters, prompt_length
        self.rngs = _generators(options, requests)
        self.lengths = np.full(rows, options.max_new_tokens, dtype=np.int64)  # final length of each row
        self.running = np.ones(rows, dtype=bool)
        self.scores = np.zeros(rows, dtype=np.float32)  # [N] sum of the chosen tokens' log-probs

    def update(self, tokens: np.ndarray, logits: np.ndarray) -> Step:
        scores = logits.astype(np.float32, copy=True)
        for f in self.filters:
            f.apply(scores, tokens)
        next_tokens = _sample(_softmax(scores), self.rngs) if self.rngs is not None else scores.argmax(axis=1)
        # log-probs after the filters, as compute_transition_scores(normalize_logits=True); none after EOS
        chosen = np.take_along_axis(_log_softmax(scores), next_tokens[:, None].astype(np.int64), 1)[:, 0]
        self.scores += np.where(self.running, chosen, np.float32(0.0))
        next_tokens = np.where(self.running, next_tokens, self.options.pad_token_id).astype(np.int64)
        generated = tokens.shape[1] + 1 - self.prompt_length
        ended = self.running & np.isin(next_tokens, self.options.eos_ids)
        self.lengths[ended] = generated
        self.running &= ~ended
        return Step(next_tokens, None, not self.running.any() or generated >= self.options.max_new_tokens)

    def finalize(self, tokens: np.ndarray) -> list[list[int]]:
        """tokens: int64 [N, T] after the last step. Generated tokens per row, EOS included, no pads."""
        return [row[self.prompt_length : self.prompt_length + n].tolist() for row, n in zip(tokens, self.lengths)]


def _sample(probs: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One draw per row of probs [N, V] (torch.multinomial, num_samples=1); rows are request-major,
    N // len(rngs) per request, each request's from its own generator."""
    cdf = np.cumsum(probs, axis=1, dtype=np.float64)
    per = len(probs) // len(rngs)
    u = np.concatenate([rng.random(per) for rng in rngs]) * cdf[:, -1]
    last_possible = probs.shape[1] - 1 - (probs[:, ::-1] > 0).argmax(axis=1)  # u rounding up to the total
    return np.minimum((cdf <= u[:, None]).sum(axis=1), last_possible)


class BeamSearchDecoder:
    """transformers' `_beam_search` (5.23), vectorized over the batch exactly as there:

    - scores are log_softmax(logits), then the filters, plus each beam's running sum; the first step
      starts beam 0 at 0 and the others at -1e9 so that the beams start different;
    - per request, the top 2 * num_beams (more with several EOS ids) of num_beams * V candidates, or as
      many drawn without replacement when sampling (Gumbel top-k: the same distribution as torch);
    - the best num_beams candidates that did not end become the running beams;
    - an ended candidate (EOS, or max length) among the first num_beams is a hypothesis with score
      sum / generated_length ** length_penalty; the num_beams best hypotheses are kept;
    - a request stops accepting hypotheses once it cannot improve (early_stopping False: the best
      running sum at the current length vs the worst hypothesis; "never": at max length when
      length_penalty > 0), or, with early_stopping True, once it holds num_beams hypotheses; the loop
      ends when no request can improve, when early_stopping is True and all are full, or at max length.
    """

    def __init__(self, options: GenerationOptions, filters: list[LogitFilter], batch: int, prompt_length: int):
        self.options, self.filters, self.prompt_length = options, filters, prompt_length
        k = options.num_beams
        self.rngs = _generators(options, batch)
        self.candidates = max(2, 1 + len(options.eos_ids)) * k
        self.running_scores = np.zeros((batch, k), dtype=np.float32)  # [B, K] sum of log probs
        self.running_scores[:, 1:] = _NEG
        self.hyp_tokens = np.full((batch, k, options.max_new_tokens), options.pad_token_id, dtype=np.int64)
        self.hyp_lengths = np.zeros((batch, k), dtype=np.int64)
        self.hyp_scores = np.full((batch, k), _NEG, dtype=np.float32)  # length-penalized, best first
        self.hyp_done = np.zeros((batch, k), dtype=bool)  # slot holds an ended hypothesis
        self.improvable = np.ones(batch, dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied

    def update(self, tokens: np.ndarray, logits: np.ndarray) -> Step:
        o, (b, k), t = self.options, self.running_scores.shape, tokens.shape[1]
        v = logits.shape[1]
        scores = _log_softmax(logits.astype(np.float32))
        for f in self.filters:
            f.apply(scores, tokens)
        scores = (scores.reshape(b, k, v) + self.running_scores[:, :, None]).reshape(b, k * v)
        if self.rngs is not None:  # Gumbel top-k: draws without replacement, in draw order
            gumbel = np.stack([rng.gumbel(size=scores.shape[1]) for rng in self.rngs])
            flat = _topk(scores + gumbel, self.candidates)
        else:
            flat = _topk(scores, self.candidates)
        cand_scores = np.take_along_axis(scores, flat, 1)  # [B, C]
        cand_rows = flat // v + np.arange(b)[:, None] * k  # [B, C] row in tokens each candidate extends
        cand_tokens = flat % v
        generated = t + 1 - self.prompt_length
        ended = np.isin(cand_tokens, o.eos_ids) | (generated >= o.max_new_tokens)

        # running beams: the best candidates that did not end
        masked = cand_scores + ended.astype(np.float32) * _NEG
        keep = _topk(masked, k)
        self.running_scores = np.take_along_axis(masked, keep, 1)
        source = np.take_along_axis(cand_rows, keep, 1).reshape(-1)
        next_tokens = np.take_along_axis(cand_tokens, keep, 1).reshape(-1)

        # hypotheses: merge the candidates that just ended among the first K with the kept ones
        just_ended = ended & (np.arange(self.candidates) < k)
        hyp = cand_scores / np.float32(generated**o.length_penalty)
        hyp += (self.hyp_done.all(axis=1, keepdims=True) & (o.early_stopping is True)).astype(np.float32) * _NEG
        hyp += (~self.improvable[:, None]).astype(np.float32) * _NEG
        hyp += (~just_ended).astype(np.float32) * _NEG
        cand_seqs = np.full((b, self.candidates, o.max_new_tokens), o.pad_token_id, dtype=np.int64)
        cand_seqs[:, :, : generated - 1] = tokens[cand_rows, self.prompt_length :]
        cand_seqs[:, :, generated - 1] = cand_tokens
        best = _topk(np.concatenate([self.hyp_scores, hyp], axis=1), k)

        def pick(kept: np.ndarray, new: np.ndarray) -> np.ndarray:
            merged = np.concatenate([kept, new], axis=1)
            return np.take_along_axis(merged, best.reshape(best.shape + (1,) * (merged.ndim - 2)), 1)

        self.hyp_scores = pick(self.hyp_scores, hyp)
        self.hyp_done = pick(self.hyp_done, just_ended)
        self.hyp_lengths = pick(self.hyp_lengths, np.full((b, self.candidates), generated))
        self.hyp_tokens = pick(self.hyp_tokens, cand_seqs)

        # can any request still improve on its worst hypothesis?
        if o.early_stopping == "never" and o.length_penalty > 0.0:
            best_length = o.max_new_tokens
        else:
            best_length = generated
        best_possible = self.running_scores[:, :1] / np.float32(best_length**o.length_penalty)
        worst = np.where(self.hyp_done, self.hyp_scores.min(axis=1, keepdims=True), _NEG)
        self.improvable &= (best_possible > worst).any(axis=1)
        done = (not self.improvable.any()) or (self.hyp_done.all() and o.early_stopping is True) or ended.all()
        return Step(next_tokens, source, bool(done))

    def finalize(self, tokens: np.ndarray) -> list[list[int]]:
        """The best num_return_sequences hypotheses of each request, best first, EOS included."""
        n = self.options.num_return_sequences
        self.scores = self.hyp_scores[:, :n].reshape(-1)  # [B * n] transformers' sequences_scores
        return [self.hyp_tokens[i, j, : self.hyp_lengths[i, j]].tolist()
                for i in range(len(self.hyp_tokens)) for j in range(n)]


# ---------------------------------------------------------------------------------------------------


class DecodingTask:
    def __init__(self, inference: Inference, options: GenerationOptions):
        self.inference, self.options = inference, options

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> list[list[int]]:
        o = self.options
        tokens = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1 or mask.shape != tokens.shape:
            raise ValueError(f"input_ids and attention_mask: int64 [B, S0] with B, S0 >= 1 and equal shapes, "
                             f"got {tokens.shape} and {mask.shape}")
        batch, prompt_length = tokens.shape
        copies = max(o.num_beams, o.num_return_sequences)
        if copies > 1:
            rows = np.repeat(np.arange(batch), copies)
            self.inference.rearrange(rows)
            tokens, mask = tokens[rows], mask[rows]
        filters = build_filters(o, mask)
        if o.num_beams > 1:
            decoder = BeamSearchDecoder(o, filters, batch, prompt_length)
        else:
            decoder = GreedyDecoder(o, filters, len(tokens), prompt_length, requests=batch)

        fresh = tokens
        while True:
            step = decoder.update(tokens, self.inference.logits(fresh, mask))
            if step.source_indices is not None:
                tokens, mask = tokens[step.source_indices], mask[step.source_indices]
            tokens = np.concatenate([tokens, step.next_tokens[:, None]], axis=1)
            if step.done:
                sequences = decoder.finalize(tokens)
                self.scores = decoder.scores  # float32 [B * num_return_sequences], as the sequences
                return sequences
            if step.source_indices is not None:
                self.inference.rearrange(step.source_indices)
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            fresh = step.next_tokens[:, None]


def generate(inference: Inference, input_ids: np.ndarray, attention_mask: np.ndarray,
             options: GenerationOptions) -> list[list[int]]:
    """Decode a batch of prompts as transformers' `generate` does.

    input_ids, attention_mask: int64 [B, S0]; prompts may be right-padded (mask 0 on the pads): as in
    transformers, new tokens are appended after the pads and the mask grows with ones.
    Returns B * num_return_sequences lists (request-major, best beam first): the generated tokens only,
    without the prompt, ending with the EOS token when one was generated, never padded.
    """
    return DecodingTask(inference, options).run(input_ids, attention_mask)


def generate_scored(inference: Inference, input_ids: np.ndarray, attention_mask: np.ndarray,
                    options: GenerationOptions) -> tuple[list[list[int]], np.ndarray]:
    """As `generate`, with each returned sequence's score, float32 [B * num_return_sequences]:
    beam search: transformers' `sequences_scores`, sum of log-probs / generated_length ** length_penalty;
    greedy and sampling: the sum of the generated tokens' log-probs (EOS included) after the logit
    filters, i.e. `compute_transition_scores(sequences, scores, normalize_logits=True).sum(-1)` for the
    request generated alone (in a batch, transformers also adds the log-probs of the pads after EOS)."""
    task = DecodingTask(inference, options)
    return task.run(input_ids, attention_mask), task.scores


def prompt_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """int64 [N, S0]: the position ids transformers' `generate` gives a prompt, cumsum(mask) - 1 and 0
    on pads. The k-th generated token (k = 0, 1, ...) then gets position_ids[:, -1] + 1 + k: after a
    right-padded prompt the last column is a pad at position 0, so generation restarts at position 1
    (transformers 5.23 does this; backends copy it so that their outputs match)."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.where(mask == 0, 0, np.cumsum(mask, axis=1) - 1)
