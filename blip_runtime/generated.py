"""What a generation task returns per sequence when asked for scores (return_scores=True)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Generated:
    text: str  # the decoded sequence, as the task returns it without scores
    tokens: list[int]  # the token ids, as the task's *_tokens form returns them
    # Beam search: transformers' sequences_scores, sum of log-probs / generated_length ** length_penalty.
    # Greedy and sampling: the sum of the generated tokens' log-probs (EOS included) after the logit
    # filters, as compute_transition_scores(..., normalize_logits=True).sum(-1) gives for the request alone.
    score: float
