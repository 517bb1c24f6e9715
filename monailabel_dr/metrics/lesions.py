"""Lesion segmentation and detection metrics, accumulated image by image.

Full-size fundus photographs (4288x2848 = 12.2 M pixels) are evaluated one at a time:
:class:`LesionSegAccumulator` keeps, per image and lesion, only TP/FP/FN counts at the
threshold, two binned probability histograms and the image-level truth / score (about
16 kB per lesion with 1000 bins), so a whole test set never sits in memory.
:class:`FROCAccumulator` keeps, per image, only the scores of its false-positive
proposals and the detection score of each ground-truth lesion.

Conventions (each number in the output names its variant under ``"variant"``):

- A pixel is predicted positive when ``prob >= threshold`` (as MONAI's
  ``AsDiscrete(threshold=...)``). All pixel metrics use only pixels inside the field of
  view (FOV); truth pixels outside it are ignored (their count is reported).
- Dice, pooled (the papers' default): ``2 TP / (2 TP + FP + FN)`` with TP/FP/FN summed
  over all images. Per-image mean: mean of the per-image Dice over the images where the
  truth or the prediction is non-empty; an image with both empty is skipped (it has no
  defined Dice and would otherwise count as a perfect 1).
- AUC-PR: the step (average-precision) rule of ``sklearn.metrics.average_precision_score``,
  ``AP = sum_k (R_k - R_{k-1}) P_k``, with one threshold per bin (the bin's lower edge,
  swept from high to low), from pooled histograms of ``floor(prob * n_bins)``. It equals
  sklearn's AP on the probabilities quantised to their bins (a bin acts as one tied score).
- AUC-ROC: trapezoid rule over the same binned ROC points, starting at (0, 0); equals
  ``roc_auc_score`` on the quantised probabilities.
- Image level: truth = any truth pixel inside the FOV, score = max probability inside the
  FOV (max pooling, as Lesion-Net); ``image_auc`` is sklearn's ``roc_auc_score``.
- Confidence intervals: percentile bootstrap over images (the image is the unit
  resampled), ``n_boot`` resamples from ``numpy.random.default_rng(seed)``, the same
  resamples for every lesion and metric; resamples where a metric is undefined are dropped.

Nothing here knows about MONAI Label or torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from monailabel_dr.fundus.components import connected_components
from monailabel_dr.fundus.lesions import LESIONS
from monailabel_dr.metrics.overlap import dice_from_counts, iou_from_counts

__all__ = [
    "FROCAccumulator",
    "LesionSegAccumulator",
    "best_dice_threshold",
    "dice_by_threshold",
    "pr_roc_from_histograms",
    "proposals_from_map",
    "CAM_THRESHOLD",
]

# np.trapz was renamed np.trapezoid in numpy 2.0
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------- PR / ROC from histograms


def _pr_roc_batch(pos: np.ndarray, neg: np.ndarray) -> dict[str, np.ndarray]:
    """PR / ROC curves and areas for histograms ``(..., n_bins)`` (bin 0 = lowest probabilities).

    Hand-written rather than sklearn's ``precision_recall_curve`` / ``roc_curve``: those
    need every pixel score in memory (12 M per image), and here the same formula is also
    applied at once to the ``n_boot`` bootstrap histograms (vectorised over leading axes).
    Thresholds are swept from high to low: point k predicts positive the pixels in bins
    ``>= n_bins - 1 - k``.
    """
    pos = np.asarray(pos, dtype=np.float64)[..., ::-1]
    neg = np.asarray(neg, dtype=np.float64)[..., ::-1]
    tp = np.cumsum(pos, axis=-1)
    fp = np.cumsum(neg, axis=-1)
    n_pos = tp[..., -1:]
    n_neg = fp[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / n_pos  # nan when there is no positive pixel
        fpr = fp / n_neg  # nan when there is no negative pixel
        predicted = tp + fp
        # precision is undefined before the first predicted pixel: 1 (sklearn's convention);
        # it is never weighted there as recall does not move.
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), 1.0)
    zero = np.zeros(recall.shape[:-1] + (1,))
    d_recall = np.diff(np.concatenate([zero, recall], axis=-1), axis=-1)
    auc_pr = np.sum(d_recall * precision, axis=-1)  # average precision, step rule
    tpr0 = np.concatenate([zero, recall], axis=-1)
    fpr0 = np.concatenate([zero, fpr], axis=-1)
    auc_roc = _trapezoid(tpr0, fpr0, axis=-1)
    return {
        "auc_pr": auc_pr,
        "auc_roc": auc_roc,
        "precision": precision,
        "recall": recall,
        "fpr": fpr,
        "tpr": recall,
    }


def pr_roc_from_histograms(pos_hist: Sequence[float], neg_hist: Sequence[float]) -> dict[str, Any]:
    """Pixel AUC-PR / AUC-ROC from binned probability histograms of positive / negative pixels.

    ``pos_hist[b]`` / ``neg_hist[b]``: number of positive / negative pixels whose
    probability falls in bin ``b`` of ``n_bins`` equal-width bins on [0, 1] (bin 0 lowest).
    Thresholds are the bin lower edges ``b / n_bins`` swept from high to low; point k of the
    returned curves predicts positive the pixels in bins ``>= n_bins - 1 - k`` (its threshold
    is in ``"thresholds"``).

    - ``auc_pr``: average precision, ``sum_k (R_k - R_{k-1}) P_k`` (sklearn's
      ``average_precision_score`` rule, no interpolation); nan without positives.
    - ``auc_roc``: trapezoid area under (FPR, TPR) from (0, 0); nan without positives or
      without negatives.

    Both equal sklearn's values on scores quantised to the bins (ties within a bin).
    """
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.size == 0:
        raise ValueError(
            f"pos_hist and neg_hist must be 1-D of equal length, got {pos.shape} and {neg.shape}"
        )
    if np.any(pos < 0) or np.any(neg < 0):
        raise ValueError("histogram counts must be >= 0")
    out = _pr_roc_batch(pos, neg)
    n_bins = pos.size
    return {
        "auc_pr": float(out["auc_pr"]),
        "auc_roc": float(out["auc_roc"]),
        "precision": out["precision"],
        "recall": out["recall"],
        "fpr": out["fpr"],
        "tpr": out["tpr"],
        "thresholds": np.arange(n_bins - 1, -1, -1, dtype=np.float64) / n_bins,
    }


def dice_by_threshold(pos_hist: Sequence[float], neg_hist: Sequence[float]) -> np.ndarray:
    """Pooled Dice at every bin threshold: element ``b`` predicts positive the pixels of bins ``>= b``
    (threshold ``b / n_bins``, the bin's lower edge), from the same histograms as
    :func:`pr_roc_from_histograms`. nan where truth and prediction are both empty."""
    pos = np.asarray(pos_hist, dtype=np.float64)
    neg = np.asarray(neg_hist, dtype=np.float64)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.size == 0:
        raise ValueError(f"pos_hist and neg_hist must be 1-D of equal length, got {pos.shape} and {neg.shape}")
    tp = np.cumsum(pos[::-1])[::-1]          # positives at or above each bin
    fp = np.cumsum(neg[::-1])[::-1]
    return dice_from_counts(tp, fp, pos.sum() - tp)


def best_dice_threshold(pos_hist: Sequence[float], neg_hist: Sequence[float],
                        bounds: tuple[float, float] = (0.05, 0.95)) -> tuple[float, float]:
    """The operating threshold of one lesion: the bin lower edge within ``bounds`` whose pooled Dice
    (:func:`dice_by_threshold`) is highest, and that Dice; the lowest such threshold on ties.
    (0.5, nan) without any positive pixel. ``bounds`` keeps a threshold chosen on a few images away
    from the extremes, where one image's pixels decide it."""
    dice = dice_by_threshold(pos_hist, neg_hist)
    n = dice.size
    if not np.any(np.asarray(pos_hist) > 0) or not np.any(np.isfinite(dice)):
        return 0.5, float("nan")
    lo, hi = int(np.ceil(bounds[0] * n)), int(np.floor(bounds[1] * n))
    window = np.where(np.isfinite(dice[lo:hi + 1]), dice[lo:hi + 1], -1.0)
    b = lo + int(np.argmax(window))
    return b / n, float(dice[b])


# --------------------------------------------------------------------------- bootstrap helpers


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) multiplicity of each image in each bootstrap resample (rows sum to n)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w = np.zeros((n_boot, n), dtype=np.float64)
    np.add.at(w, (np.repeat(np.arange(n_boot), n), idx.ravel()), 1.0)
    return w


def _percentile_ci(values: np.ndarray, ci: float) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(v, [100.0 * (1.0 - ci) / 2.0, 100.0 * (1.0 + ci) / 2.0])
    return [float(lo), float(hi)]


def _weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of ``weights`` (n_boot, n): the Mann-Whitney pair count.

    Equal to ``roc_auc_score(labels, scores, sample_weight=w)`` row by row (ties count
    1/2); written out because calling sklearn n_boot x 4 times costs seconds, while
    this is one (n_pos x n_neg) pair matrix shared by all resamples.
    """
    s_pos = scores[labels]
    s_neg = scores[~labels]
    pairs = (s_pos[:, None] > s_neg[None, :]) + 0.5 * (s_pos[:, None] == s_neg[None, :])
    w_pos = weights[:, labels]
    w_neg = weights[:, ~labels]
    num = np.einsum("bi,ij,bj->b", w_pos, pairs, w_neg)
    den = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


# --------------------------------------------------------------------------- segmentation


class LesionSegAccumulator:
    """Pixel- and image-level lesion segmentation metrics, accumulated one image at a time.

    ``update`` reduces each (H, W) probability map to a few numbers and two histograms
    (the map is not kept); ``compute`` gives pooled Dice / IoU, per-image mean Dice,
    pixel AUC-PR / AUC-ROC inside the FOV, image-level AUC / sensitivity / specificity,
    and bootstrap confidence intervals over images. See the module docstring for the
    exact definitions.
    """

    def __init__(self, lesions: Iterable[str] = LESIONS, n_bins: int = 1000, threshold: float = 0.5):
        self.lesions = tuple(lesions)
        if not self.lesions:
            raise ValueError("at least one lesion is needed")
        if len(set(self.lesions)) != len(self.lesions):
            raise ValueError(f"duplicate lesions in {self.lesions}")
        self.n_bins = int(n_bins)
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.threshold = float(threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.image_ids: list[str] = []
        n_les = len(self.lesions)
        # one row per image; columns: lesions
        self._counts: list[np.ndarray] = []  # (L, 4) int64: TP, FP, FN, truth pixels outside FOV
        self._hists: list[np.ndarray] = []  # (L, 2, n_bins) int64: [negative, positive] histograms
        self._img_truth: list[np.ndarray] = []  # (L,) bool
        self._img_score: list[np.ndarray] = []  # (L,) float64
        self._n_les = n_les

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def nbytes(self) -> int:
        """Bytes held by the per-image stores (about 16 kB per image and lesion at 1000 bins)."""
        stores = (self._counts, self._hists, self._img_truth, self._img_score)
        return sum(a.nbytes for store in stores for a in store)

    def reset(self) -> None:
        self.image_ids.clear()
        for store in (self._counts, self._hists, self._img_truth, self._img_score):
            store.clear()

    def update(
        self,
        image_id: str,
        probs: Mapping[str, np.ndarray],
        truth: Mapping[str, np.ndarray],
        fov: np.ndarray | None = None,
    ) -> None:
        """Add one image.

        ``probs[les]``: float (H, W) probabilities in [0, 1]; ``truth[les]``: (H, W) mask
        (non-zero = lesion); ``fov``: (H, W) mask of the field of view (None = whole image).
        Every lesion of ``self.lesions`` must be in both mappings. Raises ``ValueError`` for
        a repeated ``image_id``, missing lesions, mismatched shapes, an empty FOV or
        probabilities outside [0, 1] (NaN included).
        """
        image_id = str(image_id)
        if image_id in self.image_ids:
            raise ValueError(f"image '{image_id}' was already added")
        for name, mapping in (("probs", probs), ("truth", truth)):
            missing = [les for les in self.lesions if les not in mapping]
            if missing:
                raise ValueError(f"{name} of image '{image_id}' lacks lesions {missing}")
        shape = np.shape(probs[self.lesions[0]])
        if len(shape) != 2:
            raise ValueError(f"probability maps must be (H, W), got shape {shape}")
        if fov is not None:
            fov = np.asarray(fov).astype(bool, copy=False)
            if fov.shape != shape:
                raise ValueError(f"fov shape {fov.shape} differs from the map shape {shape}")
            if not fov.any():
                raise ValueError(f"the field of view of image '{image_id}' is empty")

        n = self.n_bins
        counts = np.zeros((self._n_les, 4), dtype=np.int64)
        hists = np.zeros((self._n_les, 2, n), dtype=np.int64)
        img_truth = np.zeros(self._n_les, dtype=bool)
        img_score = np.zeros(self._n_les, dtype=np.float64)
        for i, les in enumerate(self.lesions):
            p = np.asarray(probs[les])
            t = np.asarray(truth[les]).astype(bool, copy=False)
            if p.shape != shape or t.shape != shape:
                raise ValueError(
                    f"image '{image_id}', {les}: probability map {p.shape} and truth {t.shape} "
                    f"must both have shape {shape}"
                )
            if p.dtype.kind not in "fbiu":
                raise ValueError(f"image '{image_id}', {les}: probabilities must be numeric, got {p.dtype}")
            if p.dtype.kind == "f" and p.dtype.itemsize < 4:
                p = p.astype(np.float32)
            lo, hi = float(np.min(p)), float(np.max(p))
            if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
                raise ValueError(
                    f"image '{image_id}', {les}: probabilities must be in [0, 1], got range [{lo}, {hi}]"
                )
            pred = p >= self.threshold
            if fov is not None:
                counts[i, 3] = np.count_nonzero(t & ~fov)
                p, t, pred = p[fov], t[fov], pred[fov]  # 1-D, FOV pixels only
            tp = np.count_nonzero(pred & t)
            counts[i, 0] = tp
            counts[i, 1] = np.count_nonzero(pred) - tp
            counts[i, 2] = np.count_nonzero(t) - tp
            bins = np.minimum((p * n).astype(np.intp), n - 1)
            # one bincount for both classes: bins of positive pixels are shifted by n_bins
            both = np.bincount((bins + n * t).ravel(), minlength=2 * n)
            hists[i] = both.reshape(2, n)
            img_truth[i] = bool(counts[i, 0] + counts[i, 2] > 0)
            img_score[i] = float(np.max(p))
        self.image_ids.append(image_id)
        self._counts.append(counts)
        self._hists.append(hists)
        self._img_truth.append(img_truth)
        self._img_score.append(img_score)

    # ------------------------------------------------------------------ compute

    def variant(self) -> dict[str, str]:
        thr = f"prob >= {self.threshold:g}"
        return {
            "pixels": "pixels inside the field of view only; truth outside it is ignored",
            "dice_pooled": f"2TP/(2TP+FP+FN), TP/FP/FN summed over all images, prediction {thr}",
            "dice_per_image_mean": (
                f"mean over images of 2TP/(2TP+FP+FN) (prediction {thr}); images whose truth and "
                "prediction are both empty are skipped"
            ),
            "iou_pooled": f"TP/(TP+FP+FN), summed over all images, prediction {thr}",
            "auc_pr": (
                f"average precision sum_k (R_k - R_(k-1)) P_k (step rule, as sklearn "
                f"average_precision_score) over {self.n_bins} equal-width probability bins, "
                "thresholds at the bin lower edges, pixels pooled over all images"
            ),
            "auc_roc": f"trapezoid area under the pixel ROC over the same {self.n_bins} bin thresholds",
            "image_auc": (
                "sklearn roc_auc_score of image-level truth (any truth pixel in the FOV) vs image score "
                "(max probability in the FOV); nan with one class only"
            ),
            "image_sensitivity": f"fraction of images with the lesion whose max {thr}",
            "image_specificity": (
                f"fraction of images without the lesion whose max prob < {self.threshold:g}"
            ),
            "ci": (
                "percentile bootstrap over images (images resampled with replacement; same resamples "
                "for all lesions and metrics; resamples where a metric is undefined are dropped)"
            ),
            "mean": (
                "unweighted mean over the lesions with at least one positive pixel in the data "
                "(per metric: those where it is defined, counted in mean.n_lesions)"
            ),
        }

    def compute(self, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                operating: Mapping[str, float] | None = None) -> dict[str, Any]:
        """All metrics per lesion, their mean, and bootstrap CIs (``n_boot=0``: no CIs).

        ``operating``: per-lesion operating thresholds (e.g. a checkpoint's, served by its infer task):
        each lesion also gets ``dice_pooled_operating`` at its threshold and ``dice_pooled_best`` at the
        threshold that maximises it on these images (an oracle, for reference), both from the pooled
        histograms (:func:`dice_by_threshold`; exact for thresholds on the bin grid, else at the bin
        edge below).

        Returns ``{"n_images", "threshold", "n_bins", "n_boot", "seed", "ci_level",
        "variant": {...}, "<LES>": {...} for each lesion, "mean": {...}}``. Each lesion's
        dict has the metrics, the counts behind them and ``"ci": {metric: [lo, hi]}`` for
        dice_pooled, auc_pr, auc_roc and image_auc.
        """
        if not 0.0 < float(ci) < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {ci}")
        n_img = len(self.image_ids)
        out: dict[str, Any] = {
            "n_images": n_img,
            "threshold": self.threshold,
            "n_bins": self.n_bins,
            "n_boot": int(n_boot) if n_img else 0,
            "seed": int(seed),
            "ci_level": float(ci),
            "variant": self.variant(),
        }
        nan = float("nan")
        if n_img == 0:
            for les in self.lesions:
                out[les] = {"n_images": 0}
            out["mean"] = {"lesions": []}
            return out

        counts = np.stack(self._counts)  # (N, L, 4)
        hists = np.stack(self._hists)  # (N, L, 2, n_bins)
        img_truth = np.stack(self._img_truth)  # (N, L)
        img_score = np.stack(self._img_score)  # (N, L)
        weights = _resample_weights(n_img, int(n_boot), int(seed)) if n_boot and n_boot > 0 else None

        boot: dict[str, dict[str, np.ndarray]] = {}
        included: list[str] = []   # lesions with truth pixels: they enter the mean
        for i, les in enumerate(self.lesions):
            res = self._lesion_figures(counts[:, i], hists[:, i], img_truth[:, i], img_score[:, i],
                                       None if operating is None else operating.get(les))
            if res["n_pos_pixels"] > 0:
                included.append(les)
            if weights is not None:
                boot[les] = _bootstrap_lesion(weights, counts[:, i], hists[:, i], img_truth[:, i], img_score[:, i])
                res["ci"] = {k: _percentile_ci(v, ci) for k, v in boot[les].items()}
                res["ci"].setdefault("image_auc", [nan, nan])   # one image class only: undefined
            out[les] = res
        out["mean"] = _mean_over_lesions(out, included, boot if weights is not None else None, ci,
                                         with_operating=operating is not None)
        return out

    def _lesion_figures(self, counts: np.ndarray, hists: np.ndarray, y: np.ndarray, s: np.ndarray,
                        operating: float | None) -> dict[str, Any]:
        """One lesion's figures over the images: ``counts`` (N, 4) TP / FP / FN / outside, ``hists``
        (N, 2, n_bins), image truth ``y`` and image score ``s`` (N,); ``operating``: its threshold or None."""
        nan = float("nan")
        n_img = len(y)
        tp, fp, fn, outside = (counts[:, k] for k in range(4))
        neg_h, pos_h = hists[:, 0], hists[:, 1]
        pooled_pos, pooled_neg = pos_h.sum(axis=0), neg_h.sum(axis=0)
        curves = _pr_roc_batch(pooled_pos, pooled_neg)
        per_image = dice_from_counts(tp, fp, fn)  # nan where truth and prediction are both empty
        used = np.isfinite(per_image)
        n_pos_img, n_neg_img = int(y.sum()), int((~y).sum())
        res: dict[str, Any] = {
            "dice_pooled": float(dice_from_counts(tp.sum(), fp.sum(), fn.sum())),
            "dice_per_image_mean": float(per_image[used].mean()) if used.any() else nan,
            "iou_pooled": float(iou_from_counts(tp.sum(), fp.sum(), fn.sum())),
            "auc_pr": float(curves["auc_pr"]),
            "auc_roc": float(curves["auc_roc"]),
            "image_auc": float(roc_auc_score(y, s)) if n_pos_img > 0 and n_neg_img > 0 else nan,
            "image_sensitivity": _ratio(np.count_nonzero(y & (s >= self.threshold)), n_pos_img),
            "image_specificity": _ratio(np.count_nonzero(~y & (s < self.threshold)), n_neg_img),
            "tp": int(tp.sum()),
            "fp": int(fp.sum()),
            "fn": int(fn.sum()),
            "n_pos_pixels": int(pooled_pos.sum()),
            "n_neg_pixels": int(pooled_neg.sum()),
            "n_truth_outside_fov": int(outside.sum()),
            "n_images": n_img,
            "n_images_dice_per_image": int(used.sum()),
            "n_pos_images": n_pos_img,
            "n_neg_images": n_neg_img,
        }
        if operating is not None:
            by_thr = dice_by_threshold(pooled_pos, pooled_neg)
            b = min(self.n_bins - 1, max(0, int(np.floor(float(operating) * self.n_bins + 1e-9))))
            best_t, best_d = best_dice_threshold(pooled_pos, pooled_neg, bounds=(0.0, 1.0))
            res.update({"operating_threshold": float(operating), "dice_pooled_operating": float(by_thr[b]),
                        "best_threshold": best_t, "dice_pooled_best": best_d})
        return res


def _bootstrap_lesion(weights: np.ndarray, counts: np.ndarray, hists: np.ndarray, y: np.ndarray,
                      s: np.ndarray) -> dict[str, np.ndarray]:
    """One lesion's figures under each bootstrap resample (``weights`` (B, N): how often each image is drawn);
    ``image_auc`` only where both image classes are present."""
    tp, fp, fn = (counts[:, k] for k in range(3))
    curves = _pr_roc_batch(weights @ hists[:, 1], weights @ hists[:, 0])
    b = {
        "dice_pooled": dice_from_counts(weights @ tp, weights @ fp, weights @ fn),
        "auc_pr": curves["auc_pr"],
        "auc_roc": curves["auc_roc"],
    }
    if y.any() and (~y).any():
        b["image_auc"] = _weighted_auc(s, y, weights)
    return b


_MEAN_KEYS = ("dice_pooled", "dice_per_image_mean", "iou_pooled", "auc_pr", "auc_roc", "image_auc",
              "image_sensitivity", "image_specificity")


def _mean_over_lesions(out: Mapping[str, Any], included: list[str], boot: Mapping[str, Mapping] | None,
                       ci: float, with_operating: bool) -> dict[str, Any]:
    """The ``mean`` block: each metric averaged over the included lesions where it is defined (image_auc is
    nan for a lesion present in every image or in none; ``n_lesions`` says how many entered each mean), and,
    with ``boot``, its CI from the per-resample means over the same lesions."""
    nan = float("nan")
    mean: dict[str, Any] = {"lesions": included, "n_lesions": {}}
    keys = (*_MEAN_KEYS, "dice_pooled_operating", "dice_pooled_best") if with_operating else _MEAN_KEYS
    for k in keys:
        vals = [out[les][k] for les in included if k in out[les] and np.isfinite(out[les][k])]
        mean[k] = float(np.mean(vals)) if vals else nan
        mean["n_lesions"][k] = len(vals)
    if boot is not None:
        mean["ci"] = {}
        for k in ("dice_pooled", "auc_pr", "auc_roc", "image_auc"):
            used = [les for les in included if np.isfinite(out[les][k]) and k in boot[les]]
            # per resample: mean over the same lesions (a resample where one is undefined is dropped)
            mean["ci"][k] = _percentile_ci(np.mean([boot[les][k] for les in used], axis=0), ci) if used else [nan, nan]
    return mean


# --------------------------------------------------------------------------- FROC


CAM_THRESHOLD = 0.65   # the CAM paper's region-proposal threshold on the min-max normalised map


def proposals_from_map(
    score_map: np.ndarray, threshold: float = CAM_THRESHOLD, normalize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """CAM-paper region proposals: ``(labels (H, W) int32, scores (K,))``.

    The one implementation of the rule: ``/infer/cam`` serves these regions
    (:func:`monailabel_dr.lib.infers.cam.region_proposals`) and the FROC evaluation counts them.

    Optionally min-max normalise the map to [0, 1], keep pixels ``>= threshold``, take
    the 8-connected components (:func:`monailabel_dr.fundus.components.connected_components`, numbered in
    raster order); region k (label k+1) scores the maximum of the map inside it (``scipy.ndimage.maximum``).
    """
    m = np.asarray(score_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"score map must be (H, W), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("score map holds NaN or infinite values")
    if normalize:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    k, labels = connected_components(m >= threshold, raster_order=True)[:2]
    if k == 0:
        return labels.astype(np.int32), np.zeros(0, dtype=np.float64)
    inside = labels > 0  # ndimage.maximum sorts the pixels it gets: give it only the regions'
    scores = np.asarray(
        ndimage.maximum(m[inside], labels[inside], index=np.arange(1, k + 1)), dtype=np.float64
    ).reshape(k)
    return labels.astype(np.int32), scores


class FROCAccumulator:
    """Lesion-level FROC for region proposals (CAM paper).

    Ground-truth lesions are the 8-connected components of the truth mask. A proposal
    *hits* a ground-truth lesion when their overlap passes ``mode``:

    - ``"gt"`` (default): intersection / lesion area >= ``overlap`` (the paper's "50 %",
      read as the fraction of the ground-truth lesion covered);
    - ``"iou"``: intersection / union >= ``overlap``;
    - ``"pixel"``: at least one shared pixel (the paper's lenient variant; ``overlap``
      is not used).

    A proposal that hits at least one lesion is a true positive, any other proposal a
    false positive. Several proposals hitting the same lesion are all true positives
    (a duplicate is not a false positive), and a proposal hitting several lesions
    detects all of them. At score threshold s: sensitivity = fraction of lesions hit by
    a proposal with score >= s; FP rate = number of false-positive proposals with score
    >= s divided by the number of images (images with no proposal or no lesion count).
    The sensitivity at an FP rate r is the highest sensitivity among operating points
    with FP rate <= r (no interpolation); ``froc_score`` is its mean over ``fp_rates``.

    Input: :meth:`update_from_map` (a score map thresholded into connected components,
    exactly the paper's proposals) or :meth:`update` with a list of
    ``{"score": float, "mask": bool (H, W)}`` (proposals may overlap each other).
    """

    MODES = ("gt", "iou", "pixel")

    def __init__(
        self,
        overlap: float = 0.5,
        mode: str = "gt",
        fp_rates: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8),
    ):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 < float(overlap) <= 1.0:
            raise ValueError(f"overlap must be in (0, 1], got {overlap}")
        self.overlap = float(overlap)
        self.mode = mode
        self.fp_rates = tuple(float(r) for r in fp_rates)
        if not self.fp_rates or any(r < 0 for r in self.fp_rates):
            raise ValueError(f"fp_rates must be non-negative and not empty, got {fp_rates}")
        self.image_ids: list[str] = []
        self._fp_scores: list[np.ndarray] = []  # scores of false-positive proposals, per image
        self._tp_scores: list[np.ndarray] = []  # scores of true-positive proposals, per image
        self._det_scores: list[np.ndarray] = []  # per GT lesion: best hitting score (-inf: missed)

    def __len__(self) -> int:
        return len(self.image_ids)

    # ------------------------------------------------------------------ update

    def _truth_components(self, truth: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        t = np.asarray(truth).astype(bool, copy=False)
        if t.ndim != 2:
            raise ValueError(f"truth must be (H, W), got shape {t.shape}")
        c = connected_components(t)
        return c.labels, c.n, c.areas

    def _add(
        self,
        image_id: str,
        scores: np.ndarray,
        inter: np.ndarray,
        prop_area: np.ndarray,
        gt_area: np.ndarray,
    ) -> None:
        """Store one image from its (K proposals x G lesions) intersection matrix."""
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"proposal scores of image '{image_id}' must be finite")
        inter = inter.astype(np.float64)
        if self.mode == "pixel":
            hits = inter >= 1
        elif self.mode == "gt":
            hits = inter >= self.overlap * gt_area[None, :]
        else:
            union = prop_area[:, None] + gt_area[None, :] - inter
            hits = inter >= self.overlap * union
        is_tp = hits.any(axis=1)
        if scores.size:
            det = np.where(hits, scores[:, None], -np.inf).max(axis=0)
        else:
            det = np.full(gt_area.size, -np.inf)
        self.image_ids.append(image_id)
        self._fp_scores.append(scores[~is_tp])
        self._tp_scores.append(scores[is_tp])
        self._det_scores.append(det)

    def _check_id(self, image_id: str) -> str:
        image_id = str(image_id)
        if image_id in self.image_ids:
            raise ValueError(f"image '{image_id}' was already added")
        return image_id

    def update(self, image_id: str, proposals: Sequence[Mapping[str, Any]], truth: np.ndarray) -> None:
        """Add one image from a list of proposals ``{"score": float, "mask": bool (H, W)}``."""
        image_id = self._check_id(image_id)
        gt_labels, n_gt, gt_area = self._truth_components(truth)
        k = len(proposals)
        scores = np.zeros(k, dtype=np.float64)
        inter = np.zeros((k, n_gt), dtype=np.int64)
        prop_area = np.zeros(k, dtype=np.int64)
        for j, prop in enumerate(proposals):
            if "mask" not in prop or "score" not in prop:
                raise ValueError(f"proposal {j} of image '{image_id}' needs 'score' and 'mask'")
            mask = np.asarray(prop["mask"]).astype(bool, copy=False)
            if mask.shape != gt_labels.shape:
                raise ValueError(f"proposal {j} mask shape {mask.shape} differs from truth {gt_labels.shape}")
            scores[j] = float(prop["score"])
            prop_area[j] = np.count_nonzero(mask)
            inter[j] = np.bincount(gt_labels[mask], minlength=n_gt + 1)[1:]
        self._add(image_id, scores, inter, prop_area, gt_area)

    def update_regions(
        self, image_id: str, regions: np.ndarray, scores: Sequence[float], truth: np.ndarray
    ) -> None:
        """Add one image from a region label image (0 = none, region k has label k+1) and its scores."""
        image_id = self._check_id(image_id)
        gt_labels, n_gt, gt_area = self._truth_components(truth)
        regions = np.asarray(regions)
        if regions.shape != gt_labels.shape:
            raise ValueError(f"regions shape {regions.shape} differs from truth {gt_labels.shape}")
        scores = np.asarray(scores, dtype=np.float64).ravel()
        k = scores.size
        if regions.size and (regions.min() < 0 or regions.max() > k):
            raise ValueError(f"region labels must be in 0..{k} (one score per region)")
        regions = regions.astype(np.int64, copy=False)
        prop_area = np.bincount(regions.ravel(), minlength=k + 1)[1:]
        both = (regions > 0) & (gt_labels > 0)
        # one bincount over (region, lesion) pairs of the shared pixels
        pair = (regions[both] - 1) * n_gt + (gt_labels[both] - 1)
        if k * n_gt:
            inter = np.bincount(pair, minlength=k * n_gt).reshape(k, n_gt)
        else:
            inter = np.zeros((k, n_gt), np.int64)
        self._add(image_id, scores, inter, prop_area, gt_area)

    def update_from_map(
        self,
        image_id: str,
        score_map: np.ndarray,
        truth: np.ndarray,
        threshold: float = CAM_THRESHOLD,
        normalize: bool = False,
    ) -> None:
        """Add one image from a score map (e.g. a CAM): proposals = :func:`proposals_from_map`."""
        if np.shape(score_map) != np.shape(truth):
            raise ValueError(f"score map shape {np.shape(score_map)} differs from truth {np.shape(truth)}")
        labels, scores = proposals_from_map(score_map, threshold=threshold, normalize=normalize)
        self.update_regions(image_id, labels, scores, truth)

    # ------------------------------------------------------------------ compute

    def compute(self) -> dict[str, Any]:
        """FROC curve, sensitivity at each of ``fp_rates`` and their mean (``froc_score``)."""
        n_img = len(self.image_ids)
        fp = np.sort(np.concatenate(self._fp_scores)) if n_img else np.zeros(0)
        tp = np.concatenate(self._tp_scores) if n_img else np.zeros(0)
        det = np.sort(np.concatenate(self._det_scores)) if n_img else np.zeros(0)
        n_les = int(det.size)
        thresholds = np.unique(np.concatenate([fp, tp]))[::-1]  # high to low
        # counts of scores >= each threshold, from the sorted arrays
        n_fp = fp.size - np.searchsorted(fp, thresholds, side="left")
        n_det = det.size - np.searchsorted(det, thresholds, side="left")
        # operating point before any proposal: 0 FP, 0 lesions found
        fppi = np.concatenate([[0.0], n_fp / n_img]) if n_img else np.zeros(1)
        sens = np.concatenate([[0.0], n_det / n_les]) if n_les else np.full(thresholds.size + 1, np.nan)
        curve_thr = np.concatenate([[np.inf], thresholds])
        at_rate = []
        for r in self.fp_rates:
            ok = fppi <= r + 1e-12
            at_rate.append(float(np.max(sens[ok])) if n_les else float("nan"))
        return {
            "n_images": n_img,
            "n_lesions": n_les,
            "n_proposals": int(fp.size + tp.size),
            "n_true_positive_proposals": int(tp.size),
            "n_false_positive_proposals": int(fp.size),
            "mode": self.mode,
            "overlap": self.overlap,
            "fp_rates": list(self.fp_rates),
            "sensitivity": at_rate,
            "froc_score": float(np.mean(at_rate)) if n_les else float("nan"),
            "curve": {
                "thresholds": curve_thr.tolist(),
                "fp_per_image": fppi.tolist(),
                "sensitivity": sens.tolist(),
            },
            "variant": (
                "lesion-level FROC; lesions = 8-connected truth components; a proposal is a TP when "
                + {
                    "gt": f"intersection / lesion area >= {self.overlap:g}",
                    "iou": f"intersection / union >= {self.overlap:g}",
                    "pixel": "it shares >= 1 pixel with a lesion (lenient)",
                }[self.mode]
                + "; duplicates are not FPs; sensitivity at a rate = best operating point with "
                "FP/image <= rate"
            ),
        }
