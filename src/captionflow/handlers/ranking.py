"""From one score per (image, candidate) pair to each image's candidates, best first."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from captionflow.records import ScoredCaption


def best_first(
    candidates: Sequence[Sequence[str]], scores: torch.Tensor, logits: torch.Tensor
) -> list[list[ScoredCaption]]:
    """`scores` and `logits` hold one value per candidate, all images' candidates in a row.
    Each candidate keeps its score; its probability is the softmax of the logits among its
    image's candidates."""
    ranked, start = [], 0
    for group in candidates:
        end = start + len(group)
        probabilities = logits[start:end].float().softmax(dim=0).tolist()
        scored = [
            ScoredCaption(text, float(score), float(probability))
            for text, score, probability in zip(
                group, scores[start:end].tolist(), probabilities, strict=True
            )
        ]
        ranked.append(sorted(scored, key=lambda s: s.score, reverse=True))
        start = end
    return ranked
