"""``diverse_uncertainty``: an uncertain image unlike what is labelled or was just handed out (row ``grading``).

1. Pool: the ``pool`` (default 16) unlabelled images with the highest ``grade_entropy``
   (the ``grade_uncertainty`` score, computed first if missing or stale, see :mod:`.common`).
2. Covered set: the grader embeddings (pooled features before the linear head, L2-normalised,
   from :mod:`.embeddings`) of every labelled image and of the images this strategy returned
   in its last ``recent`` calls (default 8).
3. k-center greedy (:func:`monailabel_dr.metrics.uncertainty.k_center_greedy`, k = 1): the pool
   image farthest from the covered set; images near labelled ones lose to any farther
   candidate, and ``min_distance`` (default 0 = off) drops pool images closer than that to a
   labelled one outright (unless that leaves none). Ties go to the more uncertain image.

Recently returned images are left out of the pool (if that empties it, only the last one;
if only it remains, it is returned again), so successive calls of one session do not get the
same or near-identical images.

**Memory of recent hand-outs: in memory**, per ``client_id`` (the request parameter MONAI
Label's endpoint also records), the last ``recent`` ids. It is what this strategy returned,
whether or not the client came through the HTTP endpoint, and it is cheap; it is lost when
the server restarts, which ends the sessions it serves anyway. (MONAI Label's endpoint also
stamps ``image_info["strategy"][name]["ts"]`` in the datastore, but only for calls through
HTTP, at one-second resolution and shared by all clients.)

Returns ``{"id", "score" (its grade_entropy), "strategy", "rank_key", "distance" (to the
covered set, None when nothing is covered yet), "pool", "excluded_recent", "models"}``.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from monailabel_dr.config import AppSettings, ModelSettings
from monailabel_dr.lib.activelearning.common import (
    DEFAULT_MAX_INLINE_SCORING,
    ScoreStrategy,
    float_param,
    identity_key,
    int_param,
    valid_score,
)
from monailabel_dr.lib.activelearning.grade_uncertainty import GradeUncertaintyScoring
from monailabel_dr.lib.errors import Conflict
from monailabel_dr.metrics.uncertainty import k_center_greedy, l2_normalise

DEFAULT_POOL = 16
DEFAULT_RECENT = 8


class DiverseUncertaintyStrategy(ScoreStrategy):
    name = "diverse_uncertainty"
    scoring_class = GradeUncertaintyScoring

    def __init__(self, model: ModelSettings, app: AppSettings):
        super().__init__(model, app, "k-center greedy on grader embeddings among the most uncertain unlabelled "
                                     "images, away from labelled and recently returned ones (diverse_uncertainty)")
        self._recent: dict[str, deque] = {}
        self._recent_lock = threading.Lock()

    def recent(self, client: str) -> list[str]:
        with self._recent_lock:
            return list(self._recent.get(client, ()))

    def _remember(self, client: str, image_id: str, k: int) -> None:
        if k <= 0:
            return
        with self._recent_lock:
            q = self._recent.get(client)
            if q is None or q.maxlen != k:
                q = self._recent[client] = deque(q or (), maxlen=k)
            q.append(image_id)

    def __call__(self, request, datastore):
        request = dict(request or {})
        scorer = self.scorer()
        identity = scorer.identity()                                 # 409 when the grader is untrained
        pool_size = int_param(request, "pool", DEFAULT_POOL, 1, 100000)
        recent_k = int_param(request, "recent", DEFAULT_RECENT, 0, 100000)
        min_distance = float_param(request, "min_distance", 0.0, 0.0, 2.0)
        client = str(request.get("client_id") or "")

        unlabeled = sorted(datastore.get_unlabeled_images())
        if not unlabeled:
            return None
        labeled = sorted(set(datastore.list_images()) - set(unlabeled))
        everyone = unlabeled + labeled
        stored, stale = self.current_scores(request, datastore, everyone, scorer, fallback=True)
        if set(stale) & set(unlabeled):   # rescoring in the background: the fallback rules (no embeddings yet)
            return self.fallback_pick(scorer, stored, [i for i in stale if i in set(unlabeled)], unlabeled)
        key = identity_key(identity)
        emb = scorer.embeddings.get(everyone, key)
        missing = [i for i in everyone if valid_score(stored[i]) is not None and i not in emb]
        if missing:                                                  # scores current but the embedding file lost
            cap = int_param(request, "max_inline_scoring", DEFAULT_MAX_INLINE_SCORING, 0, 10**6)
            if len(missing) > cap:
                raise Conflict(f"{len(missing)} images have no grader embedding for the current model; run "
                               f"`POST /scoring/{scorer.name}?run_sync=true` with {{\"force\": true}} first")
            scorer({"image_ids": missing, "force": True, "device": request.get("device")}, datastore)
            stored = {i: scorer.stored(datastore, i) for i in everyone}
            emb = scorer.embeddings.get(everyone, key)

        ranked = sorted((-valid_score(stored[i]), i) for i in unlabeled
                        if valid_score(stored[i]) is not None and i in emb)
        if not ranked:
            raise Conflict(f"none of the {len(unlabeled)} unlabelled images could be scored by '{scorer.name}'")
        pool = [i for _, i in ranked[:pool_size]]
        recent = self.recent(client)
        candidates = [i for i in pool if i not in recent]
        if not candidates and recent:
            candidates = [i for i in pool if i != recent[-1]] or pool
        covered_labeled = [emb[i] for i in labeled if i in emb]
        if min_distance > 0 and covered_labeled:
            lab = l2_normalise(np.stack(covered_labeled))
            cand = l2_normalise(np.stack([emb[i] for i in candidates]))
            near = np.sqrt(((cand[:, None] - lab[None]) ** 2).sum(-1)).min(axis=1) < min_distance
            candidates = [i for i, n in zip(candidates, near) if not n] or candidates
        centres = covered_labeled + [emb[i] for i in recent if i in emb]
        picked, gaps = k_center_greedy(
            l2_normalise(np.stack([emb[i] for i in candidates])),
            l2_normalise(np.stack(centres)) if centres else None,
            k=1,
        )
        best = candidates[picked[0]]
        self._remember(client, best, recent_k)
        s = stored[best]
        return {
            "id": best,
            "score": valid_score(s),
            "strategy": self.name,
            "rank_key": s.get("rank_key"),
            "distance": round(gaps[0], 6) if np.isfinite(gaps[0]) else None,
            "pool": pool,
            "excluded_recent": [i for i in pool if i in recent],
            "rule": "score",
            "rule_description": "k-center greedy on grader embeddings among the most uncertain unlabelled images",
            "models": s.get("models"),
        }
