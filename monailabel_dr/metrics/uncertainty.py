"""Numbers behind the active-learning scores: entropies, MC-dropout statistics, Dice
disagreement and k-center greedy selection.

Plain NumPy on arrays the scoring methods hand over (``monailabel_dr.lib.activelearning``);
nothing here imports MONAI Label or torch, so every function is unit-tested alone.

Conventions:

- Entropies are in **bits** (log base 2): a binary entropy lies in [0, 1], the entropy of
  the 5-grade softmax in [0, log2 5 = 2.32]. Probabilities are clipped to [EPS, 1 - EPS]
  before the logarithm (0 log 0 = 0 up to that clipping).
- MC statistics take the samples on axis 0: ``(N, ...)`` for N stochastic passes.
- Dice of two empty masks is 1 (both say "nothing here": they agree), so their
  disagreement ``1 - Dice`` is 0.

Why by hand: MONAI's ``monai.metrics.compute_variance`` / ``VarianceMetric`` need a spatial
axis ((N, C, H, ...)), replace values <= 0 in place and give no entropy; MONAI Label's
``EpistemicScoring.entropy_volume`` is a method of a scoring class (not importable without
an infer task) and sums ``-p log p`` over channels, which for per-lesion sigmoid outputs
(multi-label) is not the binary entropy of each map. ``monai.metrics.compute_dice`` works
on one-hot torch batches and treats an empty reference as NaN or 1 depending on
``ignore_empty``; the symmetric rule above is one line of NumPy. No k-center is offered.
"""

from __future__ import annotations

from itertools import combinations
from typing import Mapping

import numpy as np

from monailabel_dr.metrics.overlap import mask_dice

EPS = 1e-7


# ----------------------------------------------------------------------------- entropies
def categorical_entropy(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy (bits) of probability vectors along ``axis`` (e.g. a grade softmax)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0)
    return -np.sum(p * np.log2(p), axis=axis)


def binary_entropy(p) -> np.ndarray:
    """Element-wise entropy (bits) of Bernoulli probabilities (per-pixel sigmoid maps)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


# ----------------------------------------------------------------------------- MC dropout (categorical)
def mc_total_variance(samples) -> float:
    """MC-dropout variance of a probability vector: per-class variance over the N samples
    (axis 0, population variance), summed over the classes (the trace of the covariance)."""
    s = np.asarray(samples, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] < 2:
        raise ValueError(f"samples must be (N >= 2, K), got {s.shape}")
    return float(np.var(s, axis=0).sum())


def mc_mutual_information(samples) -> float:
    """BALD mutual information (bits) of categorical samples (N, K): entropy of the mean
    minus the mean entropy (0 when every pass agrees)."""
    s = np.asarray(samples, dtype=np.float64)
    return float(max(0.0, categorical_entropy(s.mean(axis=0)) - categorical_entropy(s, axis=-1).mean()))


def grade_uncertainty(eval_probs, mc_probs) -> dict:
    """The grading scores of one image.

    ``eval_probs`` (K,): softmax of the network in eval mode; ``mc_probs`` (N, K) or None:
    softmaxes of N dropout passes. ``grade_entropy`` (the ranking key) is the entropy of the
    eval-mode softmax; the MC numbers describe the spread of the stochastic passes.
    """
    eval_probs = np.asarray(eval_probs, dtype=np.float64).reshape(-1)
    out = {"grade_entropy": float(categorical_entropy(eval_probs))}
    if mc_probs is not None:
        mc = np.asarray(mc_probs, dtype=np.float64)
        out["grade_mc_variance"] = mc_total_variance(mc)
        out["grade_mc_entropy"] = float(categorical_entropy(mc.mean(axis=0)))
        out["grade_mc_mutual_information"] = mc_mutual_information(mc)
    return out


# ----------------------------------------------------------------------------- MC dropout (lesion maps)
def lesion_map_uncertainty(mc_probs, fov, threshold: float = 0.5) -> dict:
    """MC-dropout uncertainty of per-lesion probability maps over the field of view.

    ``mc_probs`` (N, m, H, W): sigmoid maps of N dropout passes; ``fov`` (H, W) bool.
    Per pixel and lesion the predictive entropy is the binary entropy of the MC mean.

    - ``mean_entropy`` (the ranking key): mean over FOV pixels and lesions of that entropy;
    - ``uncertain_fraction``: fraction of FOV pixels where some lesion's entropy > ``threshold``;
    - ``mutual_information``: mean over FOV pixels and lesions of H(mean) - mean_n H(p_n)
      (the epistemic part; 0 with a single pass or when every pass agrees);
    - ``per_lesion_entropy``: the mean entropy of each lesion map (m values).
    """
    p = np.asarray(mc_probs, dtype=np.float64)
    if p.ndim != 4:
        raise ValueError(f"mc_probs must be (N, m, H, W), got {p.shape}")
    fov = np.asarray(fov, dtype=bool)
    if fov.shape != p.shape[-2:]:
        raise ValueError(f"fov {fov.shape} does not match the maps {p.shape[-2:]}")
    n_fov = int(fov.sum())
    m = p.shape[1]
    if n_fov == 0:
        return {"mean_entropy": 0.0, "uncertain_fraction": 0.0, "mutual_information": 0.0,
                "per_lesion_entropy": [0.0] * m, "fov_pixels": 0}
    inside = p[:, :, fov]                                   # (N, m, P)
    h_mean = binary_entropy(inside.mean(axis=0))           # (m, P)
    h_each = binary_entropy(inside).mean(axis=0)           # (m, P)
    return {
        "mean_entropy": float(h_mean.mean()),
        "uncertain_fraction": float(np.mean(h_mean.max(axis=0) > threshold)),
        "mutual_information": float(max(0.0, (h_mean - h_each).mean())),
        "per_lesion_entropy": [float(v) for v in h_mean.mean(axis=1)],
        "fov_pixels": n_fov,
    }


# ----------------------------------------------------------------------------- disagreement
def dice(a, b) -> float:
    """Agreement of two models' binary masks: metrics/overlap.py's Dice, with two empty masks counted as
    full agreement (1.0: both models say there is nothing), where the overlap rule leaves it undefined."""
    d = mask_dice(a, b)
    return 1.0 if np.isnan(d) else d


def pairwise_disagreement(masks: Mapping[str, np.ndarray]) -> tuple[float, dict[str, float]]:
    """Mean over all pairs of ``1 - Dice`` and the Dice of each pair ("a|b", names sorted)."""
    names = sorted(masks)
    if len(names) < 2:
        raise ValueError("disagreement needs at least two masks")
    pairs = {f"{a}|{b}": dice(masks[a], masks[b]) for a, b in combinations(names, 2)}
    return float(np.mean([1.0 - d for d in pairs.values()])), pairs


# ----------------------------------------------------------------------------- diversity
def l2_normalise(x, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length (distances between them are then sqrt(2 - 2 cos))."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def k_center_greedy(candidates, centres=None, k: int = 1) -> tuple[list[int], list[float]]:
    """Greedy k-center selection (Sener & Savarese, core-set active learning).

    ``candidates`` (n, d); ``centres`` (c, d) or None: points already covered (labelled
    images, images handed out recently). Repeatedly picks the candidate farthest (Euclidean)
    from everything covered so far and adds it to the covered set. Returns the picked
    candidate indices in order and each one's distance to the covered set when picked
    (``inf`` for a first pick without centres). Ties go to the lower index, so candidates
    sorted by uncertainty break ties towards the more uncertain one.
    """
    cand = np.asarray(candidates, dtype=np.float64)
    if cand.ndim != 2:
        raise ValueError(f"candidates must be (n, d), got {cand.shape}")
    n = cand.shape[0]
    k = min(int(k), n)
    dist = np.full(n, np.inf)
    if centres is not None:
        c = np.asarray(centres, dtype=np.float64)
        if c.size:
            c = c.reshape(-1, cand.shape[1])
            dist = np.sqrt(((cand[:, None, :] - c[None, :, :]) ** 2).sum(-1)).min(axis=1)
    picked: list[int] = []
    gaps: list[float] = []
    for _ in range(k):
        d = dist.copy()
        d[picked] = -1.0
        i = int(np.argmax(d))          # first maximum: the lowest index among ties
        picked.append(i)
        gaps.append(float(dist[i]))
        dist = np.minimum(dist, np.sqrt(((cand - cand[i]) ** 2).sum(-1)))
    return picked, gaps
