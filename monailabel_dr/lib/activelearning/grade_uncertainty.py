"""``grade_uncertainty``: how unsure the DR grader is about an image (row ``grading``).

Stored in image info under ``score_grade_uncertainty`` (see :mod:`.common`):

- ``grade_entropy`` (**the ranking key**, bits, 0..2.32): entropy of the grade softmax of
  the grader in eval mode, exactly the probabilities ``/infer/grading`` answers;
- ``grade_mc_variance``: MC-dropout variance, the per-grade variance of the softmax over
  ``mc_samples`` stochastic passes (default 8) summed over the 5 grades; with
  ``grade_mc_entropy`` (entropy of the MC mean) and ``grade_mc_mutual_information`` (BALD);
- ``mc_dropout_p`` and ``mc_dropout_source``: ``model`` when the grader has dropout
  (``network.dropout`` > 0, e.g. the demo profile's 0.2), else ``default``: the dropout is
  applied at ``DEFAULT_MC_DROPOUT`` = 0.2 anyway (a request may set ``mc_dropout``).
  Why not "entropy only" for a grader trained without dropout: the MC numbers stay
  comparable across profiles and the ranking does not depend on them (it uses the eval-mode
  entropy); the stored source says when the variance is the sensitivity of a model that
  never saw dropout rather than a trained-dropout posterior. 0.2 is the rate the repo's own
  demo/attention profiles train with.
- ``grade``, ``grade_probabilities``.

The grader's dropout sits on the pooled features before the linear head
(``fc(dropout(GAP(A)))``), so one backbone pass gives the eval-mode output, the MC passes
(``fc`` on dropped-out pooled features, seeded) and the embedding (the pooled features,
kept for the diversity strategy in :mod:`.embeddings`). The network stays in eval mode
(batch norm on running statistics), as MC dropout prescribes. This method scores every
image (``images: all``), labelled ones included: the diversity strategy needs their
embeddings.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.activelearning.common import (
    MCDropoutScoring,
    ScoreStrategy,
    as_batch,
    dropout_keep,
    identity_key,
    preprocess,
    shared_infer_task,
    sig,
)
from monailabel_dr.lib.activelearning.embeddings import EmbeddingStore
from monailabel_dr.metrics.uncertainty import grade_uncertainty
from monailabel_dr.networks.cam_grader import N_GRADES

DEFAULT_MC_SAMPLES = 8
DEFAULT_MC_DROPOUT = 0.2


def grader_parts(network: torch.nn.Module):
    """(feature-map function, dropout p, linear head) of a CAM grader or a lesion-attention grader."""
    core = getattr(network, "grader", network)   # LesionAttentionGrader wraps a CAMGrader
    return network.feature_maps, float(core.config.dropout), core.fc


def grader_mc(network, x: torch.Tensor, n: int, p: float, seed: int = 0):
    """Eval-mode grade softmax (5,), MC-dropout grade softmaxes (n, 5) and the embedding (K,)."""
    feature_maps, _, fc = grader_parts(network)
    with torch.no_grad():
        pooled = F.adaptive_avg_pool2d(feature_maps(x), 1).flatten(1)          # (1, K)
        eval_logits = fc(pooled)
        keep = dropout_keep((n, pooled.shape[1]), p, seed, str(pooled.device))
        mc_logits = fc(pooled * keep)                                           # (n, 10)
    eval_p = torch.softmax(eval_logits[0, :N_GRADES].float(), -1).cpu().numpy()
    mc_p = torch.softmax(mc_logits[:, :N_GRADES].float(), -1).cpu().numpy()
    return eval_p, mc_p, pooled[0].float().cpu().numpy()


def embedding_store(model: ModelSettings) -> EmbeddingStore:
    return EmbeddingStore.for_path(os.path.join(model.model_dir, "active_learning", f"{model.name}_embeddings.npz"))


class GradeUncertaintyScoring(MCDropoutScoring):
    name = "grade_uncertainty"
    rank_key = "grade_entropy"
    default_mc_samples = DEFAULT_MC_SAMPLES
    default_mc_dropout = DEFAULT_MC_DROPOUT
    default_images = "all"

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Grader uncertainty: entropy of the grade softmax (ranking key grade_entropy) "
                                     "and MC-dropout variance; stores the grader embeddings for diverse_uncertainty")
        self.embeddings = embedding_store(model)

    def task(self):
        return shared_infer_task(self.app_settings, self.model.name, "grading")

    def score_image(self, image_id: str, image_path: str, params: dict) -> dict:
        task = self.task()
        device = params["device"]
        data = preprocess(task, image_path, device)
        network = task._get_network(device, data)          # the served checkpoint, reloaded when it changes
        p, source = self.mc_rate(params, grader_parts(network)[1])
        eval_p, mc_p, emb = grader_mc(network, as_batch(data, device), params["n"], p, params["seed"])
        stats = grade_uncertainty(eval_p, mc_p if p > 0 else None)
        self.embeddings.put(image_id, identity_key(params["identity"]), emb)
        out = {k: sig(v) for k, v in stats.items()}
        out.update({
            "grade": int(np.argmax(eval_p)),
            "grade_probabilities": [round(float(v), 4) for v in eval_p],
            "mc_samples": params["n"],
            "mc_dropout_p": p,
            "mc_dropout_source": source,
        })
        if p == 0:
            out["mc_note"] = "mc_dropout 0: no MC passes, entropy only"
        return out

    def finish(self) -> None:
        self.embeddings.flush()


class GradeUncertaintyStrategy(ScoreStrategy):
    name = "grade_uncertainty"
    scoring_class = GradeUncertaintyScoring

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Unlabelled image with the highest grade-softmax entropy (grade_uncertainty)")
