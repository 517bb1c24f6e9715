"""``lesion_uncertainty``: MC-dropout uncertainty of Lesion-Net's lesion maps (row ``lesion_seg``).

Per image, ``mc_samples`` (default 8) stochastic passes with channel dropout (``nn.Dropout2d``
semantics) on the output head's input (``LesionNet.head_input``; the backbone and expansive
path run once, in eval mode), each giving 4 sigmoid lesion maps at the working resolution.
Stored under ``score_lesion_uncertainty`` (see :mod:`.common`):

- ``lesion_mean_entropy`` (**the ranking key**, bits, 0..1): per pixel and lesion the binary
  entropy of the MC-mean probability, averaged over the field of view and the 4 lesions;
- ``lesion_uncertain_fraction``: fraction of field-of-view pixels where some lesion's entropy
  exceeds ``entropy_threshold`` (default 0.5 bit, i.e. a mean probability in ~[0.11, 0.89]);
- ``lesion_mutual_information`` (the epistemic part, BALD) and ``per_lesion_entropy``;
- ``mc_dropout_p``, ``mc_dropout_source``: the model's ``network.dropout`` when > 0 (trained
  with it), else ``DEFAULT_MC_DROPOUT`` = 0.1 (``default``); a request may set ``mc_dropout``.
  0.1 and not the usual 0.5: a network trained without dropout has never seen dropped
  channels, and a small rate perturbs its maps without destroying them.

Computed on the working grid (``image_size`` of the profile, inside ``LoadFundusd``'s field
of view): the input-resolution maps of ``/infer`` are bilinear enlargements of these, so the
FOV means are the same up to interpolation, at a fraction of the cost.
"""

from __future__ import annotations

import torch

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.activelearning.common import (
    MCDropoutScoring,
    ScoreStrategy,
    as_batch,
    dropout_keep,
    float_param,
    fov_mask,
    preprocess,
    shared_infer_task,
    sig,
)
from monailabel_dr.metrics.uncertainty import lesion_map_uncertainty

DEFAULT_MC_SAMPLES = 8
DEFAULT_MC_DROPOUT = 0.1
DEFAULT_ENTROPY_THRESHOLD = 0.5
_CHUNK = 4   # MC passes per head evaluation (memory: chunk x 4 x S x S floats)


def lesion_mc_probs(network, x: torch.Tensor, n: int, p: float, seed: int = 0) -> torch.Tensor:
    """(n, m, S, S) sigmoid maps of n channel-dropout passes through Lesion-Net's output head. An ensemble
    (``LesionEnsemble``) shares the n passes among its K members as evenly as they go (member k makes
    ``len(range(k, n, K))`` of them; member 0's come first), so the spread holds the members' disagreement as
    well as the dropout's."""
    members = list(getattr(network, "members", [network]))
    counts = [len(range(k, n, len(members))) for k in range(len(members))]
    out = []
    with torch.no_grad():
        for k, (member, count) in enumerate(zip(members, counts)):
            if not count:
                continue
            y = member.head_input(x)                                     # (1, C, h, w)
            keep = dropout_keep((count, y.shape[1], 1, 1), p, seed + k, str(y.device))
            out += [torch.sigmoid(member.head_output(y * keep[i:i + _CHUNK], x.shape[-2:])).float().cpu()
                    for i in range(0, count, _CHUNK)]
    return torch.cat(out)


def _no_landmarks(task) -> None:
    task.detect_landmarks = False   # scoring needs no optic disc / fovea (the slowest pre-transform)


class LesionUncertaintyScoring(MCDropoutScoring):
    name = "lesion_uncertainty"
    rank_key = "lesion_mean_entropy"
    default_mc_samples = DEFAULT_MC_SAMPLES
    default_mc_dropout = DEFAULT_MC_DROPOUT

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Lesion-Net MC-dropout uncertainty: mean binary entropy of the lesion maps over "
                                     "the field of view (ranking key lesion_mean_entropy) and uncertain-pixel fraction")

    def task(self):
        return shared_infer_task(self.app_settings, self.model.name, "lesion_seg", configure=_no_landmarks)

    def extra_params(self, request: dict) -> dict:
        return {"threshold": float_param(request, "entropy_threshold", DEFAULT_ENTROPY_THRESHOLD, 0.0, 1.0)}

    def score_image(self, image_id: str, image_path: str, params: dict) -> dict:
        task = self.task()
        device = params["device"]
        data = preprocess(task, image_path, device)
        network = task._get_network(device, data)          # the served checkpoint, reloaded when it changes
        p, source = self.mc_rate(params, float(network.config.dropout))
        probs = lesion_mc_probs(network, as_batch(data, device), params["n"], p, params["seed"])
        stats = lesion_map_uncertainty(probs.numpy(), fov_mask(data), params["threshold"])
        return {
            "lesion_mean_entropy": sig(stats["mean_entropy"]),
            "lesion_uncertain_fraction": sig(stats["uncertain_fraction"]),
            "lesion_mutual_information": sig(stats["mutual_information"]),
            "per_lesion_entropy": [sig(v) for v in stats["per_lesion_entropy"]],
            "entropy_threshold": params["threshold"],
            "mc_samples": params["n"],
            "mc_dropout_p": p,
            "mc_dropout_source": source,
            "working_size": int(probs.shape[-1]),
        }


class LesionUncertaintyStrategy(ScoreStrategy):
    name = "lesion_uncertainty"
    scoring_class = LesionUncertaintyScoring

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "Unlabelled image with the highest Lesion-Net MC-dropout entropy (lesion_uncertainty)")
