"""The MONAI Label app: `monailabel start_server --app monailabel_dr --studies DIR`.

Everything served is built from one table (``configs/models.yaml``): each row's
infer tasks, trainer, strategies and scoring methods, with network profiles and
checkpoints chosen by ``--conf`` (see :mod:`monailabel_dr.config` and the README).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import monailabel_dr
from monailabel_dr.config import import_object, load_model_table, parse_conf
from monailabel_dr.fundus.lesions import LESIONS as LESION_CODES
from monailabel_dr.lib.errors import InvalidId, NotFound, is_valid_id
from monailabel_dr.lib.retrain import RetrainOnCorrection
from monailabel_dr.lib.slicer import segment_labels

logger = logging.getLogger(__name__)


def _in_background_job() -> bool:
    """True in the subprocess MONAI Label starts for a background job (``python -m monailabel.interfaces.utils.app``)."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monailabel.interfaces.utils.app"


class MONAILabelDRApp(MONAILabelApp):
    """Diabetic retinopathy app: grading + CAM (and the models later rows add)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, Any]):
        # Attributes used by the init_* hooks must exist before MONAILabelApp.__init__ runs them.
        self.table = load_model_table()
        self.app_settings = parse_conf(conf, app_dir, self.table)
        if _in_background_job():
            # a background job (MONAI Label's subprocess, e.g. training) yields the CPU to the server's requests;
            # from the start: building the app is part of the job (lib/priority.py)
            from monailabel_dr.lib.priority import lower_process_priority

            logger.info(f"background job priority: {lower_process_priority(self.app_settings.train_nice)}")
        for model in self.app_settings.models.values():
            os.makedirs(model.model_dir, exist_ok=True)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monailabel-dr",
            description="Diabetic retinopathy in colour fundus photographs: grading, CAM, lesion models",
            version=monailabel_dr.__version__,
        )
        from monailabel_dr.lib.offload import InferSlots

        # at most --conf infer_concurrency inferences compute at once per device (lib/offload.py)
        self.infer_slots = InferSlots(self.app_settings.infer_concurrency, self.app_settings.device,
                                      order=self.app_settings.infer_order)
        self.retrain = RetrainOnCorrection(
            self.app_settings, set(self._trainers), submit=self._queue_training,
            state_path=os.path.join(next(iter(self.app_settings.models.values())).model_dir, "retrain_state.json")
            if self.app_settings.models else None,
        )
        # a person's SEG that arrives in a DICOMweb server counts as a correction, as a PUT /datastore/label does
        if hasattr(self.datastore(), "label_listener"):
            self.datastore().label_listener = self.retrain.on_saved

    # ------------------------------------------------------------- hooks
    def init_datastore(self):
        from monailabel.config import settings

        if self.studies.startswith(("http://", "https://")):
            # a DICOMweb server (Orthanc, a PACS): OP photographs in, DICOM SEG lesion labels back (lib/dicomweb.py);
            # never MONAI Label's DICOMWebDatastore, which is built for volumes and downloads dcmqi at start
            from monailabel_dr.lib.dicomweb import make_dicomweb_datastore

            self.studies = self.studies.rstrip("/").strip()
            return make_dicomweb_datastore(self.studies, self.conf, max_pixels=self.app_settings.max_image_pixels,
                                           min_side=self.app_settings.min_image_side)

        from monailabel_dr.lib.datastore import FundusDatastore

        return FundusDatastore(
            self.studies,
            max_pixels=self.app_settings.max_image_pixels,
            min_side=self.app_settings.min_image_side,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, model in self.app_settings.models.items():
            for infer_name, ref in model.spec.infers.items():
                infers[infer_name] = import_object(ref)(infer_name, model, self.app_settings)
        if "grading" in infers and "lesion_seg" in infers:   # the grade rationale reads lesion_seg's answer
            infers["grading"].lesion_answer = infers["lesion_seg"].answer
        from monailabel_dr.lib.activelearning.common import register_serving_tasks

        register_serving_tasks(self.app_settings, infers)   # scoring shares their network copies
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        return {
            name: import_object(model.spec.trainer)(model, self.app_settings)
            for name, model in self.app_settings.models.items()
            if model.spec.trainer
        }

    def init_strategies(self) -> dict[str, Strategy]:
        strategies: dict[str, Strategy] = {"random": Random(), "first": First()}
        for model in self.app_settings.models.values():
            for name, ref in model.spec.strategies.items():
                strategies[name] = import_object(ref)(model, self.app_settings)
        return strategies

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        methods: dict[str, ScoringMethod] = {}
        for model in self.app_settings.models.values():
            for name, ref in model.spec.scoring.items():
                methods[name] = import_object(ref)(model, self.app_settings)
        return methods

    def on_init_complete(self):
        # MONAI Label's auto-update would start one background scoring process per method (each rebuilding
        # the app) at start-up and after every training and /activelearning call, failing while models are
        # untrained. Scores are checked against the served checkpoint instead: a strategy recomputes stale
        # scores itself (lib/activelearning/common.py), and POST /scoring/{method} refreshes them on demand.
        self._auto_update_scoring = False
        super().on_init_complete()
        # --conf max_upload_mb: 413 for larger request bodies, in front of MONAI Label's endpoints (lib/upload_limit.py)
        from monailabel_dr.lib.auth import fix_token_check
        from monailabel_dr.lib.upload_limit import install_in_server

        install_in_server(self.app_settings.max_upload_bytes)
        # requests in worker threads, off uvicorn's event loop; --conf offload false: the stock path (lib/offload.py)
        from monailabel_dr.lib import offload

        offload.install_in_server(self.app_settings.offload)
        if self.app_settings.infer_workers > 0:
            # the server's inferences in worker processes (lib/infer_workers.py); one at a time in each
            from monailabel_dr.lib.infer_workers import InferWorkers, WorkerTask

            self.infer_workers = InferWorkers(self.app_settings.infer_workers, self.app_dir, self.conf)
            self._infers = {name: WorkerTask(task, self.infer_workers) for name, task in self._infers.items()}
            self.infer_slots.per_device = self.app_settings.infer_workers
            self.infer_slots.handoff = 1   # each worker gets its next request while it computes (InferSlots)
        fix_token_check()  # MONAI_LABEL_AUTH_ENABLE: accept valid tokens (lib/auth.py)
        # stale active-learning scores recomputed after every publish, while no inference runs (activelearning/common.py)
        from monailabel_dr.lib.activelearning.common import start_rescoring

        self.rescorer = start_rescoring(self.app_settings, self._scoring_methods, self.datastore(), self.infer_slots.idle,
                                        self.app_settings.rescore_interval)
        for model in self.app_settings.train_on_start:
            logger.info(f"train_on_start: starting background training of '{model}'")
            self.async_training(model, enqueue=True)

    # ------------------------------------------------------------- retrain on correction
    def _queue_training(self, model: str, request: dict) -> dict | None:
        from monailabel.utils.async_tasks.task import AsyncTask

        request = dict(request)
        request.pop("model", None)
        # the MONAI Label train queue (one worker: jobs run one after the other, each in a subprocess)
        task, _ = AsyncTask.run("train", request={"model": model}, params=request, enqueue=True)
        return task

    def on_save_label(self, image_id, label_id):
        res = super().on_save_label(image_id, label_id) or {}
        saved = getattr(self.datastore(), "last_saved", lambda _: None)(image_id)
        tag, kind = saved if saved else ("final", None)   # a datastore that does not say: count it for every model
        counted = self.retrain.on_saved(image_id, tag, kind)
        if counted:
            res["retrain"] = counted
        upload = getattr(self.datastore(), "label_upload_state", None)   # DICOMweb: stored as SEG, or pending
        if upload is not None and kind == "lesion_map" and tag == "final":
            res["dicomweb"] = upload(image_id)
        return res

    # ------------------------------------------------------------- info
    def info(self):
        meta = super().info()
        meta["retrain"] = self.retrain.info()
        meta["model_state"] = {name: task.state() for name, task in self._infers.items() if hasattr(task, "state")}
        meta["profiles"] = {name: m.profile_name for name, m in self.app_settings.models.items()}
        meta["inference_slots"] = self.infer_slots.info()
        meta["inference_slots"]["worker_processes"] = self.infer_workers.n if getattr(self, "infer_workers", None) else 0
        rescorer = getattr(self, "rescorer", None)
        if rescorer is not None:
            meta["rescoring"] = rescorer.info()
        # the segments 3D Slicer creates for an image, in label-value order (lib/slicer.py)
        meta["labels"] = segment_labels(meta["models"])
        return meta

    # ------------------------------------------------------------- request checks (4xx, not 500)
    def _check_model(self, model: str | None, tasks: dict, what: str) -> None:
        if not model or model not in tasks:
            raise NotFound(f"unknown {what} '{model}'; available: {sorted(tasks)}")

    @staticmethod
    def _is_uploaded_file(path: str) -> bool:
        """A file the /infer endpoint itself wrote from a multipart upload (NamedTemporaryFile)."""
        if "\x00" in path:
            return False
        real = os.path.realpath(path)
        return (
            os.path.isabs(path)
            and os.path.isfile(real)
            and os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
            and os.path.basename(real).startswith("tmp")
        )

    def infer(self, request, datastore=None):
        self._check_model(request.get("model"), self._infers, "model")
        # the client's parameters as sent (MONAI Label overwrites some, e.g. save_label, before the task runs)
        from monailabel_dr.lib.params import check_device, check_request

        task = self._infers[request["model"]]
        request = check_request(request, getattr(task, "params", {}), f"model '{request['model']}'")
        if request.get("device") not in (None, ""):
            request["device"] = check_device(request["device"])
        image = request.get("image")
        if isinstance(image, str):
            ds = datastore or self.datastore()
            if is_valid_id(image) and ds.get_image_uri(image):
                request = dict(request)
                request["image"] = ds.get_image_uri(image)  # absolute path: never resolved against the CWD
            elif not self._is_uploaded_file(image):
                if not is_valid_id(image):
                    raise InvalidId(f"invalid image id {image!r} (no paths; ids are file names without extension)")
                raise NotFound(f"image '{image}' is not in the datastore")
        with self.infer_slots.slot(request.get("device") or self.app_settings.device, job=request["model"]):
            return super().infer(request, datastore)

    # ------------------------------------------------------------- predictions into the PACS
    def route_override(self, module: str, kwargs: dict):
        """Called by lib/offload.py for every MONAI Label route: a zero-argument callable that answers the request
        instead of MONAI Label's handler, or None. ``/infer?output=dicom_seg`` is answered here: MONAI Label's
        path converts NIfTI volumes with dcmqi and answers 500 for any other datastore."""
        if module == "monailabel.endpoints.infer" and kwargs.get("output") == "dicom_seg":
            return lambda: self.infer_to_dicom_seg(kwargs.get("model"), kwargs.get("image"), kwargs.get("params"),
                                                   uploaded=bool(kwargs.get("file")))
        return None

    def infer_to_dicom_seg(self, model: str, image: str | None, params: str | dict | None = None,
                           uploaded: bool = False) -> dict:
        """Run ``model`` on a photograph of the DICOMweb server and store its label map there as a DICOM SEG with
        AUTOMATIC segments (a proposal: never read back as a label). Answers the infer JSON with a
        ``dicom_seg`` block (the stored series and instance UIDs)."""
        import json

        from monailabel_dr.dicom.seg import Proposal
        from monailabel_dr.fundus import io as fio
        from monailabel_dr.lib.errors import BadInput

        self._check_model(model, self._infers, "model")
        ds = self.datastore()
        if not hasattr(ds, "store_proposal"):
            raise BadInput("output=dicom_seg needs a DICOMweb datastore (--studies http://HOST/dicom-web): the SEG is "
                           "stored in the server beside its photograph; with a folder datastore use output=image")
        if uploaded or not image:
            raise BadInput("output=dicom_seg stores the SEG beside a photograph of the DICOMweb server: give "
                           "?image=<its SeriesInstanceUID>, not an uploaded file")
        task = self._infers[model]
        if task.type != "segmentation" or not isinstance(task.labels, dict):
            raise BadInput(f"model '{model}' answers {task.type}, not a label map; output=dicom_seg is for "
                           f"segmentation models ({', '.join(n for n, t in self._infers.items() if t.type == 'segmentation')})")
        p = json.loads(params) if isinstance(params, str) and params.strip() else dict(params or {})
        request = {**self.info().get("config", {}).get("infer", {}), **p, "model": model, "image": image}
        result = self.infer(request)
        path = result.get("file") or result.get("label")
        try:
            label = fio.read_label(path)
        except fio.FundusIOError as e:
            raise BadInput(f"the answer of '{model}' with these parameters is not a label map ({e}); "
                           f"output=dicom_seg stores label maps only") from e
        finally:
            if path and os.path.isfile(path) and os.path.dirname(os.path.abspath(path)).startswith(tempfile.gettempdir()):
                os.unlink(path)
        answer = dict(result.get("params") or {})
        served = answer.get("model") or task.model_json()
        record = served.get("validation") or {}
        trained = " ".join(x for x in (f"epoch {record['epoch']}" if record.get("epoch") is not None else "",
                                       str(served.get("modified") or "")[:16]) if x)
        proposal = Proposal(model=model, checkpoint=os.path.basename(str(served.get("checkpoint") or "")), trained=trained)
        levels = None if set(task.labels) <= set(LESION_CODES) else dict(task.labels)
        answer["dicom_seg"] = ds.store_proposal(image, label, proposal, levels=levels)
        return answer

    def check_request(self, module: str, kwargs: dict) -> None:
        """Called by lib/offload.py before a MONAI Label handler runs: checks MONAI Label would only make in
        a training subprocess (where a bad setting fails after the client was answered 200)."""
        if module == "monailabel.endpoints.train" and kwargs.get("model"):
            trainer = self._trainers.get(kwargs["model"])
            if trainer is not None and hasattr(trainer, "check_request"):
                trainer.check_request({**(kwargs.get("params") or {}), "model": kwargs["model"]})

    def train(self, request):
        self._check_model(request.get("model"), self._trainers, "trainer")
        return super().train(request)

    def bundle_path(self, model):
        # AsyncTask.run() asks for this before spawning any train job: refuse unknown models here,
        # or `POST /train/unknown` would start a subprocess that can only fail.
        if model is not None and model not in self._trainers and model not in self._infers:
            raise NotFound(f"unknown model '{model}'; available: {sorted(self._trainers)}")
        return super().bundle_path(model)

    def next_sample(self, request):
        self._check_model(request.get("strategy") or "random", self._strategies, "strategy")
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        self._check_model(request.get("method"), self._scoring_methods, "scoring method")
        return super().scoring(request, datastore)
