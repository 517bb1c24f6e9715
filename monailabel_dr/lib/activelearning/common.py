"""What every active-learning scoring method and strategy of the app shares.

Scores live in the datastore's image info (``datastore.update_image_info``), one key per
method, ``score_<method>``::

    {"score": <the value strategies rank by>, "rank_key": <which number that is>,
     ...the method's numbers...,
     "models": {<model>: {"checkpoint", "mtime_ns", "size"}},   # the model file(s) used
     "scored_at": <unix time>, "seconds": <time spent>}

or, for an image the models cannot read (grey photograph, corrupt file), ``{"error": ...,
"status": 422, "models": ...}`` so it is not retried until a new model is published.

**Staleness rule.** A stored score is current when its ``models`` equals the identity of the
checkpoint(s) the method would use now (served path, ``st_mtime_ns`` and size, see
:func:`model_identity`). Publishing a new model (training, a replaced or touched file)
changes the identity, and the next scoring run recomputes exactly those images; images
whose score is current are skipped (``force: true`` recomputes everything). Changing
``mc_samples`` or other parameters does not by itself make scores stale.

**Strategies with missing or stale scores** compute them inline (the scoring method, only
for the images that need it) when at most ``max_inline_scoring`` images (default 32) need
it. With more, "next sample" never dead-ends: the strategy answers at once by a documented
fallback and says which rule chose the image (``rule`` in the answer):

- ``score``: every unlabelled image has a current score (the method's own ranking);
- ``best_current_score``: the best among the images already scored for the current model;
- ``best_previous_model_score``: none is, so the best by the scores of the model served before;
- ``random_unlabelled``: no image has any score yet: one unlabelled image at random (seeded by the
  model identity, so repeated requests agree until something changes).

and the stale scores are recomputed in the background (:class:`BackgroundRescorer`: one
thread, lowest CPU priority, one image at a time and only while no inference is running or
waiting, after every publish, without being asked). Only a model that was never trained
answers 409.

Infer tasks: the methods use the app's own infer-task classes of each row
(``models.yaml`` -> ``import_object``, as ``main.py`` builds them): the same checkpoint
selection (``ModelSettings.serve_path``), reload-on-change, pre-transforms (``LoadFundusd``
+ normalisation), 409 when untrained or unusable and 422 for unusable images. They are
separate instances from the ones serving ``/infer`` (the app does not hand its infer tasks
to strategies), shared between this package's methods and strategies of one app.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any, Callable

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.infer.basic_infer import CallBackTypes

from monailabel_dr.config import AppSettings, ModelSettings, import_object
from monailabel_dr.lib.errors import BadInput, ClientError, Conflict, ModelNotTrained

logger = logging.getLogger(__name__)

DEFAULT_MAX_INLINE_SCORING = 32
_REGISTRY_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- shared objects per app
def _registry(app: AppSettings) -> dict:
    """Objects shared by this package's methods and strategies of one app, kept on its AppSettings
    (the one object main.py hands to all of them), so they live and die with the app."""
    with _REGISTRY_LOCK:
        reg = app.__dict__.get("_active_learning")
        if reg is None:
            reg = app.__dict__["_active_learning"] = {"tasks": {}, "scorers": {}}
        return reg


def shared_infer_task(app: AppSettings, model_name: str, infer_name: str,
                      configure: Callable[[InferTask], None] | None = None) -> InferTask | None:
    """The infer task ``infer_name`` of row ``model_name`` built as main.py builds it, or None when
    the row is not served (``--conf models``) or has no such infer."""
    model = app.models.get(model_name)
    if model is None or infer_name not in model.spec.infers:
        return None
    reg = _registry(app)
    key = (model_name, infer_name)
    with _REGISTRY_LOCK:
        task = reg["tasks"].get(key)
        if task is None:
            task = import_object(model.spec.infers[infer_name])(infer_name, model, app)
            if configure:
                configure(task)
            serving = reg.get("serving", {}).get(key)
            if serving is not None and hasattr(serving, "_load_lock"):
                # one network copy per model and device: the serving task's cache (and its load lock)
                task._networks, task._load_lock = serving._networks, serving._load_lock
            reg["tasks"][key] = task
        return task


def register_serving_tasks(app: AppSettings, infers: dict[str, InferTask]) -> None:
    """The app's own infer tasks (main.py): scoring copies of them share their network cache."""
    reg = _registry(app)
    with _REGISTRY_LOCK:
        reg["serving"] = {(t.model.name, name): t for name, t in infers.items() if hasattr(t, "model")}


def find_infer(app: AppSettings, cls: type) -> tuple[str, str] | None:
    """(row, infer name) of the first served infer task of class ``cls`` (or a subclass)."""
    for model_name, model in app.models.items():
        for infer_name, ref in model.spec.infers.items():
            try:
                c = import_object(ref)
            except (ImportError, AttributeError):
                continue
            if isinstance(c, type) and issubclass(c, cls):
                return model_name, infer_name
    return None


def shared_scorer(app: AppSettings, cls: type, model: ModelSettings) -> "FundusScoringMethod":
    reg = _registry(app)
    with _REGISTRY_LOCK:
        scorer = reg["scorers"].get(cls)
    return scorer if scorer is not None else cls(model, app)


# ----------------------------------------------------------------------------- model identity
def model_identity(model: ModelSettings) -> dict[str, Any] | None:
    """Identity of the checkpoint a model serves now (None when untrained): path, mtime (ns), size."""
    path = model.serve_path
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return {"checkpoint": os.path.realpath(path), "mtime_ns": int(st.st_mtime_ns), "size": int(st.st_size)}


def identity_key(identity: dict) -> str:
    """A string form of a ``models`` identity (for caches keyed by it)."""
    return "|".join(f"{m}:{v['checkpoint']}:{v['mtime_ns']}:{v['size']}" for m, v in sorted(identity.items()))


def untrained_message(model: ModelSettings, what: str) -> str:
    m = model.name
    return (
        f"{what} needs a trained '{m}' model (expected {model.serve_path}); it never scores with random weights. "
        f"Train it (`POST /train/{m}` after saving final labels, or `monailabel-dr train {m}`), "
        f"or start the server with `--conf {m}_checkpoint /path/to/{m}.pt`."
    )


# ----------------------------------------------------------------------------- running infer tasks
class _Preprocessed(Exception):
    def __init__(self, data: dict):
        super().__init__("pre-transforms done")
        self.data = data


def preprocess(task: InferTask, image_path: str, device: str, **params) -> dict:
    """The task's own request handling and pre-transforms for one image (``LoadFundusd`` and
    normalisation), stopped before its inferer: the same 409/422 answers as ``/infer``, without
    paying for a forward pass the caller replaces by its own (MC passes)."""

    def stop(data):
        raise _Preprocessed(data)

    try:
        task({**params, "image": image_path, "device": device}, callbacks={CallBackTypes.PRE_TRANSFORMS: stop})
    except _Preprocessed as p:
        return p.data
    raise RuntimeError(f"infer task {getattr(task, 'name', task)} did not run its pre-transforms")


def as_batch(data: dict, device: str) -> torch.Tensor:
    x = data["image"]
    x = x if torch.is_tensor(x) else torch.as_tensor(x)
    return x[None].float().to(torch.device(device))


def fov_mask(data: dict):
    fov = data["fov"]
    fov = fov.numpy() if torch.is_tensor(fov) else fov
    return fov[0] > 0.5


def dropout_keep(shape, p: float, seed: int, device: str) -> torch.Tensor:
    """Inverted-dropout multipliers (0 or 1/(1-p)), as ``nn.Dropout`` draws them in train mode, from a
    seeded generator: MC passes are reproducible and the shared network is never put in train mode
    (which would also switch batch norm and disturb concurrent requests)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    keep = (torch.rand(shape, generator=g) >= p).float() / (1.0 - p)
    return keep.to(torch.device(device))


def sig(v: float, digits: int = 6) -> float:
    """``v`` to ``digits`` significant digits (a tiny MC variance must not round to 0)."""
    return float(f"{float(v):.{digits}g}")


# ----------------------------------------------------------------------------- request parameters
def int_param(request: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = request.get(key, default)
    try:
        if isinstance(v, bool) or float(v) != int(float(v)):
            raise ValueError
        v = int(float(v))
    except (TypeError, ValueError):
        raise BadInput(f"{key} must be an integer, got {v!r}") from None
    if not lo <= v <= hi:
        raise BadInput(f"{key} must be in {lo}..{hi}, got {v}")
    return v


def float_param(request: dict, key: str, default: float | None, lo: float, hi: float, hi_open: bool = False):
    v = request.get(key, default)
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise BadInput(f"{key} must be a number, got {v!r}") from None
    if not math.isfinite(v) or v < lo or v > hi or (hi_open and v >= hi):
        raise BadInput(f"{key} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}")
    return v


def bool_param(request: dict, key: str, default: bool) -> bool:
    v = request.get(key, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise BadInput(f"{key} must be true or false, got {v!r}")


# ----------------------------------------------------------------------------- scoring methods
class FundusScoringMethod(ScoringMethod):
    """Scores images one by one and stores the result in image info (see the module docstring).

    Subclasses set ``name`` (the method's name, also the image-info key ``score_<name>``),
    ``rank_key`` and implement :meth:`identity` (raising 409 when untrained) and
    :meth:`score_image`. Request parameters common to all: ``images`` (``unlabeled`` or
    ``all``; default ``default_images``), ``image_ids`` (explicit list), ``force`` (recompute
    current scores too), ``max_images`` (0 = no limit), ``device``.
    """

    name = ""
    rank_key = "score"
    default_images = "unlabeled"

    def __init__(self, model: ModelSettings, app: AppSettings, description: str):
        super().__init__(description)
        self.model = model
        self.app_settings = app
        self._lock = threading.Lock()
        reg = _registry(app)
        with _REGISTRY_LOCK:
            reg["scorers"].setdefault(type(self), self)

    @property
    def info_key(self) -> str:
        return f"score_{self.name}"

    def info(self):
        i = super().info()
        i.update({"info_key": self.info_key, "rank_key": self.rank_key, "images": self.default_images})
        return i

    # -- to implement
    def identity(self) -> dict[str, dict]:
        """{model: model_identity} of the checkpoint(s) used; raise ModelNotTrained when unusable."""
        raise NotImplementedError

    def prepare(self, request: dict) -> dict:
        """Validated method parameters (BadInput on bad values), passed to score_image."""
        return {}

    def score_image(self, image_id: str, image_path: str, params: dict) -> dict:
        """The method's numbers for one image (``params``: :meth:`prepare`'s, plus ``identity``)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after a run (flush caches)."""

    # -- shared logic
    def device(self, request: dict) -> str:
        return str(request.get("device") or self.app_settings.device)

    def stored(self, datastore: Datastore, image_id: str) -> dict | None:
        v = datastore.get_image_info(image_id).get(self.info_key)
        return v if isinstance(v, dict) else None

    def is_current(self, stored: dict | None, identity: dict) -> bool:
        return bool(stored) and stored.get("models") == identity

    def stale_images(self, datastore: Datastore, image_ids, identity: dict) -> list[str]:
        return [i for i in image_ids if not self.is_current(self.stored(datastore, i), identity)]

    def _selected_images(self, request: dict, datastore: Datastore) -> list[str]:
        ids = request.get("image_ids")
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
                raise BadInput("image_ids must be a list of image ids")
            known = set(datastore.list_images())
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise BadInput(f"image_ids not in the datastore: {unknown[:5]}")
            return sorted(set(ids))
        which = str(request.get("images", self.default_images)).lower()
        if which in ("unlabeled", "unlabelled"):
            return sorted(datastore.get_unlabeled_images())
        if which == "all":
            return sorted(datastore.list_images())
        raise BadInput(f"images must be 'unlabeled' or 'all', got {which!r}")

    def __call__(self, request, datastore: Datastore):
        request = dict(request or {})
        identity = self.identity()                                  # 409 before any work
        params = self.prepare(request)
        force = bool_param(request, "force", False)
        max_images = int_param(request, "max_images", 0, 0, 10**9)
        with self._lock:
            t0 = time.time()
            selected = self._selected_images(request, datastore)
            todo = selected if force else self.stale_images(datastore, selected, identity)
            skipped = len(selected) - len(todo)
            if max_images:
                todo = todo[:max_images]
            failed = 0
            try:
                for image_id in todo:
                    if self._score_one(image_id, datastore, params):
                        failed += 1
            finally:
                self.finish()
            summary = {
                "method": self.name,
                "rank_key": self.rank_key,
                "info_key": self.info_key,
                "total": len(selected),
                "skipped": skipped,
                "executed": len(todo),
                "failed": failed,
                "models": self.identity(),
                "latency": round(time.time() - t0, 3),
            }
        logger.info(f"scoring {self.name}: {summary}")
        return summary

    def _score_one(self, image_id: str, datastore: Datastore, params: dict) -> bool:
        """Score and store one image; True when the image could not be scored (stored as an error)."""
        path = datastore.get_image_uri(image_id)
        identity = self.identity()        # read before the network is fetched: a publish in between
        t0 = time.time()                  # leaves this score stale, never wrongly current
        failed = False
        try:
            result = self.score_image(image_id, path, dict(params, identity=identity))
            result["score"] = result[self.rank_key]
            result["rank_key"] = self.rank_key
        except ModelNotTrained:
            raise
        except ClientError as e:
            if e.status_code != 422:
                raise
            logger.warning(f"scoring {self.name}: {image_id} cannot be scored: {e.detail}")
            result = {"error": str(e.detail), "status": e.status_code}
            failed = True
        result.update({"models": identity, "scored_at": int(time.time()), "seconds": round(time.time() - t0, 3)})
        try:
            datastore.update_image_info(image_id, {self.info_key: result})
        except Exception as e:  # the image was deleted meanwhile
            logger.warning(f"scoring {self.name}: cannot store the score of {image_id}: {e}")
        return failed


class MCDropoutScoring(FundusScoringMethod):
    """What the MC-dropout scorers (``grade_uncertainty``, ``lesion_uncertainty``) share: one served model
    (409 while untrained), the request's ``mc_samples`` / ``mc_dropout`` / ``seed`` (plus a subclass's
    :meth:`extra_params`), and the dropout-rate rule (:meth:`mc_rate`). The passes themselves differ by
    network (the grader's pooled features, Lesion-Net's head input) and draw their masks from
    :func:`dropout_keep`."""

    default_mc_samples = 8
    default_mc_dropout = 0.1

    def identity(self) -> dict:
        ident = model_identity(self.model)
        if ident is None or self.task() is None:
            raise ModelNotTrained(untrained_message(self.model, f"scoring method '{self.name}'"))
        return {self.model.name: ident}

    def extra_params(self, request: dict) -> dict:
        return {}

    def prepare(self, request: dict) -> dict:
        return {
            "n": int_param(request, "mc_samples", self.default_mc_samples, 2, 128),
            "p": float_param(request, "mc_dropout", None, 0.0, 1.0, hi_open=True),
            **self.extra_params(request),
            "seed": int_param(request, "seed", 0, 0, 2**31 - 1),
            "device": self.device(request),
        }

    def mc_rate(self, params: dict, model_p: float) -> tuple[float, str]:
        """(rate, source): the request's ``mc_dropout``, else the model's own dropout when it trained with
        some, else ``default_mc_dropout``."""
        if params["p"] is not None:
            return params["p"], "request"
        return (model_p, "model") if model_p > 0 else (self.default_mc_dropout, "default")


# ----------------------------------------------------------------------------- strategies
def valid_score(stored: dict | None) -> float | None:
    if not stored or "error" in stored:
        return None
    v = stored.get("score")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


class ScoreStrategy(Strategy):
    """Returns the unlabelled image (no ``final`` label) with the highest current score of
    ``scoring_class``; missing or stale scores are computed first (see the module docstring)."""

    name = ""
    scoring_class: type = FundusScoringMethod

    def __init__(self, model: ModelSettings, app: AppSettings, description: str):
        super().__init__(description)
        self.model = model
        self.app_settings = app

    def scorer(self) -> FundusScoringMethod:
        return shared_scorer(self.app_settings, self.scoring_class, self.model)

    def current_scores(self, request: dict, datastore: Datastore, image_ids: list[str],
                       scorer: FundusScoringMethod | None = None, fallback: bool = False):
        """Stored scores of ``image_ids``, computing the missing ones inline when at most
        ``max_inline_scoring`` need it. With more: 409 naming the scoring call, or with ``fallback``
        ``(stored, stale ids)`` and the background rescorer woken (the caller picks by a fallback rule).
        Without ``fallback`` the stored scores are returned alone."""
        scorer = scorer or self.scorer()
        identity = scorer.identity()
        stale = scorer.stale_images(datastore, image_ids, identity)
        if stale:
            cap = int_param(request, "max_inline_scoring", DEFAULT_MAX_INLINE_SCORING, 0, 10**6)
            if len(stale) > cap:
                if fallback:
                    wake_rescoring(self.app_settings)
                    return {i: scorer.stored(datastore, i) for i in image_ids}, stale
                raise Conflict(
                    f"{len(stale)} of {len(image_ids)} images have no '{scorer.name}' score for the current "
                    f"model ({', '.join(identity)}); run `POST /scoring/{scorer.name}?run_sync=true` first "
                    f"(or without run_sync, in the background), or pass max_inline_scoring >= {len(stale)}"
                )
            params = {k: v for k, v in request.items() if k not in ("images", "image_ids", "force", "max_images")}
            scorer(dict(params, image_ids=stale), datastore)
        stored = {i: scorer.stored(datastore, i) for i in image_ids}
        return (stored, []) if fallback else stored

    def fallback_pick(self, scorer: FundusScoringMethod, stored: dict, stale: list[str], unlabeled: list[str]) -> dict:
        """The answer while scores are being recomputed (the rules of the module docstring)."""
        import random

        identity = scorer.identity()
        stale_set = set(stale)
        current = [(valid_score(stored[i]), i) for i in unlabeled if i not in stale_set and valid_score(stored[i]) is not None]
        previous = [(valid_score(stored[i]), i) for i in unlabeled if i in stale_set and valid_score(stored[i]) is not None]
        if current:
            rule, pool = "best_current_score", current
            why = (f"the best of the {len(current)} unlabelled images already scored for the current model "
                   f"({len(stale)} are being rescored in the background)")
        elif previous:
            rule, pool = "best_previous_model_score", previous
            why = (f"no image is scored for the current model yet ({len(stale)} are being rescored in the "
                   f"background): the best by the scores of the model served before")
        else:
            rng = random.Random(f"{identity_key(identity)}|{len(unlabeled)}")
            best = rng.choice(unlabeled)
            return {"id": best, "score": None, "strategy": self.name, "rule": "random_unlabelled",
                    "rule_description": f"no image has a score yet ({len(stale)} are being scored in the background): "
                                        f"one of the {len(unlabeled)} unlabelled images at random",
                    "models": identity, "unlabeled": len(unlabeled), "scored": 0, "rescoring": rescoring_info(self.app_settings)}
        best_score = max(v for v, _ in pool)
        best = min(i for v, i in pool if v == best_score)
        s = stored[best]
        return {"id": best, "score": best_score, "strategy": self.name, "rule": rule, "rule_description": why,
                "rank_key": s.get("rank_key"), "models": s.get("models"), "unlabeled": len(unlabeled),
                "scored": len(current), "rescoring": rescoring_info(self.app_settings)}

    def __call__(self, request, datastore: Datastore):
        request = dict(request or {})
        scorer = self.scorer()
        scorer.identity()                                           # 409 when untrained, even with nothing to label
        unlabeled = sorted(datastore.get_unlabeled_images())
        if not unlabeled:
            return None
        stored, stale = self.current_scores(request, datastore, unlabeled, scorer, fallback=True)
        if stale:
            return self.fallback_pick(scorer, stored, stale, unlabeled)
        scored = [(valid_score(s), i) for i, s in stored.items() if valid_score(s) is not None]
        if not scored:
            errors = {i: s.get("error") for i, s in stored.items() if s and "error" in s}
            raise Conflict(f"none of the {len(unlabeled)} unlabelled images could be scored by "
                           f"'{scorer.name}': {list(errors.items())[:3]}")
        best_score = max(s for s, _ in scored)
        best = min(i for s, i in scored if s == best_score)      # ties: the first id
        s = stored[best]
        return {
            "id": best,
            "score": best_score,
            "strategy": self.name,
            "rule": "score",
            "rule_description": f"the highest '{scorer.name}' score among the {len(unlabeled)} unlabelled images",
            "rank_key": s.get("rank_key"),
            "models": s.get("models"),
            "unlabeled": len(unlabeled),
            "scored": len(scored),
        }


# ----------------------------------------------------------------------------- background rescoring
class BackgroundRescorer:
    """Recomputes stale scores of every scoring method after a publish, without being asked.

    One daemon thread per app at the lowest CPU priority (Linux ``SCHED_IDLE`` for the thread, lib/priority.py), waking every
    ``interval`` seconds (or when a strategy found stale scores). It scores one image at a time, the
    unlabelled images first, and before each waits until no inference is running or waiting
    (``is_idle``), so it never delays an annotator's request by more than one image's scoring. The
    datastore keeps every score as it is stored (a stale score is replaced, never removed first).

    A periodic pass leaves a model alone until its checkpoint has not changed for ``settle`` seconds
    (default twice the interval): while a training run publishes a new best every few epochs, rescoring
    the whole datastore after each would only be thrown away. A strategy that found stale scores wakes
    it with no such wait (someone is asking for the next image now)."""

    def __init__(self, methods: dict, datastore: Datastore, is_idle: Callable[[], bool], interval: float = 10.0):
        self.methods = {k: m for k, m in methods.items() if isinstance(m, FundusScoringMethod)}
        self.datastore = datastore
        self.is_idle = is_idle
        self.interval = float(interval)
        self.settle = 2.0 * self.interval
        self._seen: dict[str, tuple[str, float]] = {}   # method -> (identity key, when it was first seen)
        self._urgent = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self.state: dict[str, Any] = {"running": False, "method": None, "done": 0, "remaining": 0,
                                      "passes": 0, "last_error": None}
        self._thread = threading.Thread(target=self._loop, name="mldr-rescoring", daemon=True)

    def start(self) -> "BackgroundRescorer":
        if self.methods and self.interval > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        self._urgent = True
        self._wake.set()

    def info(self) -> dict:
        with self._state_lock:
            return dict(self.state, enabled=bool(self.methods and self.interval > 0), interval_s=self.interval)

    def _set(self, **kw) -> None:
        with self._state_lock:
            self.state.update(kw)

    def _loop(self) -> None:
        from monailabel_dr.lib.priority import lower_priority

        lower_priority("idle", threading.get_native_id())   # this thread only: CPU time nobody else wants
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            urgent, self._urgent = self._urgent, False
            if self._stop.is_set():
                return
            try:
                self.run_once(urgent=urgent)
            except Exception as e:   # never let the thread die; the next pass tries again
                logger.warning(f"background rescoring: {type(e).__name__}: {e}")
                self._set(last_error=f"{type(e).__name__}: {e}")
            finally:
                self._set(running=False, method=None)

    def run_once(self, urgent: bool = True) -> int:
        """One pass over every method: the stale images scored; returns how many. Without ``urgent``, a
        model whose checkpoint changed less than ``settle`` seconds ago is left for a later pass."""
        done = 0
        for name, method in self.methods.items():
            try:
                identity = method.identity()
                params = method.prepare({})
            except ClientError:      # untrained (409) or unusable: nothing to rescore
                continue
            key = identity_key(identity)
            if self._seen.get(name, ("", 0.0))[0] != key:
                self._seen[name] = (key, time.time())
            if not urgent and time.time() - self._seen[name][1] < self.settle:
                continue
            unlabeled = sorted(self.datastore.get_unlabeled_images())
            labeled = sorted(set(self.datastore.list_images()) - set(unlabeled))
            order = unlabeled + (labeled if method.default_images == "all" else [])
            stale = method.stale_images(self.datastore, order, identity)
            self._set(running=bool(stale), method=name if stale else None, remaining=len(stale))
            for k, image_id in enumerate(stale):
                while not self.is_idle():                      # inference first
                    if self._stop.wait(0.2):
                        return done
                if self._stop.is_set():
                    return done
                with method._lock:
                    if method.identity() != identity:          # a newer publish: start the pass again
                        break
                    if method.is_current(method.stored(self.datastore, image_id), identity):
                        continue
                    try:
                        method._score_one(image_id, self.datastore, params)
                    finally:
                        method.finish()
                done += 1
                self._set(done=self.state["done"] + 1, remaining=len(stale) - k - 1)
        with self._state_lock:
            self.state["passes"] += 1
        return done


def start_rescoring(app: AppSettings, methods: dict, datastore: Datastore, is_idle: Callable[[], bool],
                    interval: float) -> BackgroundRescorer:
    reg = _registry(app)
    old = reg.get("rescorer")
    if old is not None:
        old.stop()
    reg["rescorer"] = BackgroundRescorer(methods, datastore, is_idle, interval).start()
    return reg["rescorer"]


def wake_rescoring(app: AppSettings) -> None:
    r = _registry(app).get("rescorer")
    if r is not None:
        r.wake()


def rescoring_info(app: AppSettings) -> dict | None:
    r = _registry(app).get("rescorer")
    return r.info() if r is not None else None
