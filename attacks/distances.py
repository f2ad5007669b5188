"""Similarities between query and generation embeddings, oriented so higher = more likely member.

The paper found L1/L2 threshold AUCs below 0.5 when used as raw distances: a
distance must be negated before it can serve as a membership score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmark.kernel.registry import Registry

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: Registry[Similarity] = Registry("distance", entry_point_group="benchmark.distances")


@DISTANCES.register("cosine")
def cosine(query: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Per-patch cosine similarity, averaged over patches: (..., P, D) -> (...)."""
    return F.cosine_similarity(query, generated, dim=-1).mean(dim=-1)


@DISTANCES.register("l2")
def negative_l2(query: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Negative per-patch Euclidean distance, averaged over patches."""
    return -(query - generated).norm(dim=-1).mean(dim=-1)


@DISTANCES.register("l1")
def negative_l1(query: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Negative per-patch mean absolute difference, averaged over patches."""
    return -(query - generated).abs().mean(dim=-1).mean(dim=-1)


@DISTANCES.register("hamming")
def negative_hamming(query: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Negative fraction of embedding signs that differ (binarised at zero)."""
    return -((query > 0) != (generated > 0)).float().mean(dim=-1).mean(dim=-1)
