"""Unit tests: grading metrics (hand-computed), the CAM grader, config parsing, label files."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
import pytest
import torch

from monailabel_dr.config import ConfError, load_model_table, parse_conf
from monailabel_dr.fundus.labels import LabelFormatError, make_targets, parse_grade_label
from monailabel_dr.lib.infers.cam import quantise, region_proposals
from monailabel_dr.metrics.grading import accuracy, confusion_matrix, quadratic_weighted_kappa, referable_auc
from monailabel_dr.networks.cam_grader import (
    N_OUTPUTS,
    CAMGrader,
    CAMGraderConfig,
    GraderLoss,
    split_outputs,
)


# ----------------------------------------------------------------------------- metrics
def test_quadratic_kappa_hand_computed():
    # y_true = [0, 1, 2], y_pred = [0, 2, 2] over labels 0..4:
    # O = diag-ish counts; weights w_ij = (i-j)^2 / 16.
    # observed weighted disagreement = (1/3) * (1/16) = 1/48
    # marginals: true (1/3,1/3,1/3,0,0), pred (1/3,0,2/3,0,0)
    # expected = sum_ij r_i c_j w_ij = 1/9*(0 + 4/16*2) + 1/9*(1/16 + 1/16*2) + 1/9*(4/16 + 0)
    expected = (1 / 9) * (8 / 16) + (1 / 9) * (3 / 16) + (1 / 9) * (4 / 16)
    kappa = 1 - (1 / 48) / expected
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2]) == pytest.approx(kappa, abs=1e-9)
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == pytest.approx(1.0)
    # complete reversal is worse than chance
    assert quadratic_weighted_kappa([0, 1, 3, 4], [4, 3, 1, 0]) < 0
    # unknown targets (-1) are ignored
    assert quadratic_weighted_kappa([0, -1, 2], [0, 4, 2]) == pytest.approx(1.0)


def test_accuracy_auc_confusion():
    assert accuracy([0, 1, 2, -1], [0, 1, 1, 3]) == pytest.approx(2 / 3)
    # referable = grade >= 2 ; scores rank 2 of the 2 positives above both negatives -> AUC 1
    assert referable_auc([0, 1, 2, 4], [0.1, 0.2, 0.8, 0.9]) == pytest.approx(1.0)
    # one positive ranked below one negative: 3 of 4 pairs right
    assert referable_auc([0, 1, 2, 4], [0.1, 0.85, 0.8, 0.9]) == pytest.approx(0.75)
    assert np.isnan(referable_auc([0, 1], [0.2, 0.3]))
    m = confusion_matrix([0, 0, 3, 4], [0, 1, 3, 3])
    assert m[0, 0] == 1 and m[0, 1] == 1 and m[3, 3] == 1 and m[4, 3] == 1 and m.sum() == 4


# ----------------------------------------------------------------------------- network
def test_cam_is_linear_decomposition_of_the_logits():
    net = CAMGrader(CAMGraderConfig(channels=(8, 16), strides=(2, 1), cam_channels=12)).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, cams = net.forward_with_cam(x)
    assert logits.shape == (2, N_OUTPUTS) and cams.shape == (2, N_OUTPUTS, 32, 32)
    # GAP of CAM_c plus the bias is the logit (Zhou et al.'s identity)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + net.fc.bias, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x), logits)


def test_profile_resolutions_match_the_paper():
    table = load_model_table()
    profiles = table["grading"].network_profiles()["profiles"]
    paper = profiles["paper"]
    net = CAMGrader(paper["network"]).eval()
    with torch.no_grad():
        a = net.feature_maps(torch.zeros(1, 3, paper["image_size"], paper["image_size"]))
    assert a.shape[-2:] == (32, 32) and a.shape[1] == 1024  # 32x32 at 512, 1024 kernels
    demo = profiles["demo"]
    assert demo["image_size"] // CAMGraderConfig.from_dict(demo["network"]).total_stride == 32


def test_loss_masks_unknown_targets():
    loss = GraderLoss()
    logits = torch.zeros(2, N_OUTPUTS, requires_grad=True)
    t = torch.tensor([make_targets(3, {"MA": True}), make_targets(None, {"EX": False})])
    assert t[1, 0] == -1 and t[1, 1] == -1 and t[0, 1] == 1
    value = loss(logits, t)
    value.backward()
    # only sample 0 has a grade: grade logits of sample 1 get no gradient
    assert torch.all(logits.grad[1, :5] == 0) and torch.any(logits.grad[0, :5] != 0)
    p = split_outputs(torch.zeros(N_OUTPUTS))
    assert p["grade"].sum() == pytest.approx(1.0) and p["lesions"].shape == (4,)


# ----------------------------------------------------------------------------- CAM post-processing
def test_region_proposals_threshold_components_and_scores():
    cam = np.zeros((40, 50), np.float32)
    cam[5:10, 5:15] = 0.7
    cam[7, 8] = 0.9
    cam[20:30, 30:35] = 1.0
    cam[35, 45] = 0.6  # below the threshold
    regions = region_proposals(cam, 0.65)
    assert [r["score"] for r in regions] == [1.0, 0.9]
    assert regions[0]["bbox"] == [30, 20, 35, 30] and regions[0]["area_px"] == 50
    assert regions[1]["bbox"] == [5, 5, 15, 10]
    assert quantise(np.array([0.1, 0.2, 0.5, 0.65, 0.99]), (0.2, 0.4, 0.65, 0.8)).tolist() == [0, 1, 2, 3, 4]


# ----------------------------------------------------------------------------- config
def test_parse_conf_profiles_and_errors(tmp_path):
    s = parse_conf({"profile": "tiny", "model_dir": str(tmp_path), "device": "cpu"}, "/app")
    g = s.models["grading"]
    assert g.profile_name == "tiny" and g.image_size == 64 and s.device == "cpu"
    assert g.published_path == str(tmp_path / "grading.pt")
    s = parse_conf({"grading_image_size": "96", "grading_max_epochs": "3"}, "/app")
    assert s.models["grading"].image_size == 96 and s.models["grading"].train.max_epochs == 3
    assert s.models["grading"].model_dir == "/app/model"
    with pytest.raises(ConfError, match="unknown model"):
        parse_conf({"models": "grading,nope"}, "/app")
    with pytest.raises(ConfError, match="unknown profile"):
        parse_conf({"profile": "huge"}, "/app")
    with pytest.raises(ConfError, match="integer"):
        parse_conf({"image_size": "big"}, "/app")


def test_checkpoint_override_is_served_until_trained(tmp_path):
    ext = tmp_path / "external.pt"
    ext.write_bytes(b"x")
    s = parse_conf({"grading_checkpoint": str(ext), "model_dir": str(tmp_path / "m")}, "/app")
    g = s.models["grading"]
    assert g.serve_path == str(ext)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "grading.pt").write_bytes(b"y")
    assert g.serve_path == str(tmp_path / "m" / "grading.pt")


# ----------------------------------------------------------------------------- grade labels
def test_grade_label_validation():
    g = parse_grade_label({"grade": "2", "lesions": {"ma": True, "EX": 0}})
    assert g.grade == 2 and g.lesions == {"MA": True, "EX": False}
    assert parse_grade_label({"lesions": {"HE": True}}).grade is None
    for bad in ([], {"grade": 5}, {"grade": -1}, {"grade": 1.5}, {"grade": True}, {},
                {"grade": 1, "lesions": {"OD": True}}, {"grade": 1, "lesions": {"MA": "yes"}}):
        with pytest.raises(LabelFormatError):
            parse_grade_label(bad)
    assert json.loads(json.dumps(g.to_json()))["grade"] == 2


def test_targets_from_label_files_and_label_info(tmp_path):
    from monailabel_dr.fundus import io as fio
    from monailabel_dr.lib.trainers.grading import targets_from_labels

    lab = np.zeros((80, 90), np.uint8)
    lab[10:20, 10:20] = 3  # EX visible; an HE hidden under it is only known from the label info
    p = fio.write_label(str(tmp_path / "x.png"), lab)
    g = tmp_path / "x.grade.json"
    g.write_text(json.dumps({"grade": 2, "lesions": {"MA": True}}))
    t = targets_from_labels({"lesion_map": p})
    assert t == [-1.0, -1.0, 0.0, 0.0, 1.0, 0.0]
    t = targets_from_labels({"lesion_map": p}, presence={"HE": True, "EX": True})
    assert t[2:] == [0.0, 1.0, 1.0, 0.0]
    t = targets_from_labels({"grade": str(g), "lesion_map": p})
    assert t[:2] == [2.0, 1.0] and t[2] == 1.0 and t[4] == 1.0
    assert targets_from_labels({}) is None


# ----------------------------------------------------------------------------- lesion-attention grader
def test_lesion_attention_grader_freezes_lesion_branch_and_keeps_cam_identity():
    from monailabel_dr.networks.attention_grader import LesionAttentionGrader

    grader = {"channels": [8, 16], "strides": [2, 1], "cam_channels": 12, "dropout": 0.0}
    lesion = {"widths": [8, 8, 16, 16], "depths": [1, 1, 1, 1], "cut": 8}
    net = LesionAttentionGrader(grader, lesion, lesion_size=64)
    net.freeze_lesion_branch()
    frozen = {k: v.clone() for k, v in net.lesion_net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    assert not net.lesion_net.training  # batch-norm statistics of the frozen branch stay fixed
    x = torch.randn(2, 3, 32, 32)
    net(x).sum().backward()
    opt.step()
    for k, v in net.lesion_net.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert net.attention[0].weight.grad is not None and net.grader.fc.weight.grad is not None
    net.eval()
    logits, cams = net.forward_with_cam(x)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + net.grader.fc.bias, logits, atol=1e-5, rtol=1e-5)
    other = LesionAttentionGrader(grader, lesion, lesion_size=64, mode="F(1+A)")
    other.load_state_dict(net.state_dict())
    other.eval()
    assert not torch.allclose(other(x), logits)


def test_attention_profile_resolves_lesion_network(tmp_path):
    s = parse_conf({"grading_profile": "tiny_attention", "model_dir": str(tmp_path)}, "/app")
    att = s.models["grading"].network["attention"]
    assert att["lesion_profile"] == "tiny" and att["lesion_size"] == 96
    assert att["lesion_checkpoint"] == str(tmp_path / "lesion_seg.pt") and att["mode"] == "FA"
    s = parse_conf({"grading_profile": "tiny_attention", "grading_lesion_checkpoint": "/x/l.pt",
                    "grading_attention_mode": "F(1+A)"}, "/app")
    assert s.models["grading"].network["attention"]["lesion_checkpoint"] == "/x/l.pt"
    assert s.models["grading"].network["attention"]["mode"] == "F(1+A)"


def test_readme_documents_every_conf_option():
    from conftest import ROOT
    from monailabel_dr.config import CONF_OPTIONS

    readme = (ROOT / "README.md").read_text()
    missing = [k for k in CONF_OPTIONS if f"| `{k}` |" not in readme]
    assert not missing, f"--conf options missing from the README table: {missing}"


# ----------------------------------------------------------------------------- Lesion-Net losses
def test_lesion_losses_dual_dice_fov_and_alternatives():
    from monailabel_dr.networks.lesion_net import LesionLoss, LesionNet

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.zeros(2, 5, 16, 16)
    target[:, 4] = 1  # everything inside the FOV
    target[0, 0, 4:8, 4:8] = 1
    pixel = LesionLoss("dice")(logits, target)
    dual = LesionLoss("dual_dice", lam=0.8)(logits, target)
    # hand-computed image term: presence P = max of sigmoid maps, T = any truth, Dice over the batch per lesion
    p = torch.sigmoid(logits)
    P, T = p.amax(dim=(2, 3)), target[:, :4].amax(dim=(2, 3))
    img = 1 - ((2 * (P * T).sum(0) + 1.0) / (P.sum(0) + T.sum(0) + 1.0)).mean()  # smooth 1 (Laplace)
    torch.testing.assert_close(dual, 0.8 * pixel + 0.2 * img, atol=1e-5, rtol=1e-5)
    sched = LesionLoss("dual_dice")
    sched.use_dual = False  # the paper's schedule before the first lr drop
    torch.testing.assert_close(sched(logits, target), pixel)
    # outside the field of view nothing counts: changing logits there leaves the loss unchanged
    t2 = target.clone()
    t2[:, 4, :, 8:] = 0
    l2 = logits.clone()
    l2[..., 8:] += 5
    for kind in ("dual_dice", "wbce", "focal"):
        loss = LesionLoss(kind)
        torch.testing.assert_close(loss(logits, t2), loss(l2, t2), atol=1e-5, rtol=1e-4)
    # the optional BCE term: hand-computed, with lesion pixels weighted by pos_weight (MA x10 here)
    pw = [10.0, 1.0, 1.0, 1.0]
    with_bce = LesionLoss("dice", pos_weight=pw, bce_weight=0.5)(logits, target)
    truth = target[:, :4]
    wts = 1 + (torch.tensor(pw).view(1, 4, 1, 1) - 1) * truth
    bce = -(wts * (truth * torch.log(p) + (1 - truth) * torch.log(1 - p))).sum() / (2 * 16 * 16 * 4)
    torch.testing.assert_close(with_bce, pixel + 0.5 * bce, atol=1e-5, rtol=1e-5)
    unweighted = LesionLoss("dice", bce_weight=0.5)(logits, target)
    assert with_bce > unweighted  # the MA square's positive pixels now count ten times
    net = LesionNet({"widths": [8, 8, 8, 8], "cut": 2})
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 4, 64, 64)
    with pytest.raises(ValueError):
        LesionNet({"cut": 3})


@pytest.mark.parametrize("cut", [32, 16, 8, 4, 2])
def test_lesion_net_backbones_and_expansive_path(cut):
    """Both contracting paths give input-sized maps at every cut; the expansive path is 1x1 convs only
    (plus BN/ReLU when it adjusts to expansive_width maps) and its length follows the cut."""
    from monailabel_dr.networks.lesion_net import LesionNet

    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    for cfg in ({"widths": [8, 8, 8, 8], "cut": cut},
                {"backbone": "unet_encoder", "widths": [4, 4, 8, 8, 8, 8], "cut": cut, "expansive_width": 6}):
        net = LesionNet(cfg).eval()
        assert net(x).shape == (2, 4, 96, 96)
        assert net.levels == [s for s in (32, 16, 8, 4, 2) if s >= cut]
        assert len(net.reduce) == len(net.levels) - 1
        convs = [m for m in list(net.reduce.modules()) + [net.head] if isinstance(m, torch.nn.Conv2d)]
        assert all(c.kernel_size == (1, 1) for c in convs)
        if cfg.get("expansive_width") and len(net.reduce):
            assert all(seq[0].out_channels == 6 for seq in net.reduce.values())
        # features at strides 2..32 from both backbones
        f = net.features(x)
        assert f[32].shape[-1] == 3 and f[2].shape[-1] == 48
    with pytest.raises(ValueError):
        LesionNet({"backbone": "vgg"})
    with pytest.raises(ValueError):
        LesionNet({"backbone": "unet_encoder", "widths": [8, 8, 8, 8]})


def test_lesion_ensemble_serves_the_logit_of_its_members_mean_probability():
    """`network.members` K > 1 builds K Lesion-Nets whose output is logit(mean of their sigmoids): averaged
    as probabilities, not as logits; a member's own state dict loads into members[k]; K = 1 is one LesionNet."""
    from monailabel_dr.networks.attention_grader import LesionAttentionGrader
    from monailabel_dr.networks.lesion_net import LesionEnsemble, LesionNet, build_lesion_net, member_config

    cfg = {"widths": [8, 8, 8, 8], "cut": 8}
    assert type(build_lesion_net(cfg)) is LesionNet and type(build_lesion_net({**cfg, "members": 1})) is LesionNet
    torch.manual_seed(0)
    ens = build_lesion_net({**cfg, "members": 3}).eval()
    assert isinstance(ens, LesionEnsemble) and len(ens.members) == 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = [m(x) for m in ens.members]
        want = torch.stack([torch.sigmoid(o) for o in outs]).mean(0)
        got = ens(x)
        assert torch.allclose(torch.sigmoid(got), want, atol=1e-5)
        assert not torch.allclose(torch.sigmoid(got), torch.sigmoid(torch.stack(outs).mean(0)), atol=1e-3)
    one = LesionNet(member_config({**cfg, "members": 3}))
    ens.members[1].load_state_dict(one.state_dict())
    assert all(torch.equal(ens.state_dict()[f"members.1.{k}"], v) for k, v in one.state_dict().items())
    with pytest.raises(ValueError, match="members"):
        LesionNet({**cfg, "members": 2})
    with pytest.raises(ValueError, match="members"):
        build_lesion_net({**cfg, "members": 0})
    # an attention grader's lesion branch of an ensemble profile is the ensemble
    att = LesionAttentionGrader({"channels": [8, 16], "strides": [2, 1], "cam_channels": 16}, {**cfg, "members": 2}, 64)
    assert isinstance(att.lesion_net, LesionEnsemble) and att.lesion_channels == 4


def test_lesion_net_paper_schedule_plateau_drop_switch_and_early_stop():
    """The paper's schedule: lr / 10 after `plateau_patience` validations without a better mean Dice,
    the dual Dice from the first drop on, early stop after `early_stop_patience` validations."""
    from types import SimpleNamespace

    from ignite.engine import Engine, Events

    from monailabel_dr.lib.trainers.lesion_seg import LesionSegTrainer, _SwitchToDualOnLrDrop
    from monailabel_dr.lib.trainers.settings import LesionSegTrain
    from monailabel_dr.networks.lesion_net import LesionLoss

    task = LesionSegTrainer.__new__(LesionSegTrainer)  # only the schedule wiring is exercised
    task.model = SimpleNamespace(train=LesionSegTrain.from_dict(
        {"loss_schedule": "paper", "plateau_patience": 2, "early_stop_patience": 4}))
    task._loss = LesionLoss("dual_dice")
    task._loss.use_dual = False
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    scores = iter([0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])
    evaluator = Engine(lambda e, b: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _metric(engine):  # registered first, so the handlers below see this validation's score
        engine.state.metrics["val_mean_dice"] = next(scores)

    trainer = Engine(lambda e, b: None)
    trainer.optimizer = opt
    lrs, dual = [], []
    task._attach_paper_schedule(SimpleNamespace(evaluator=evaluator, trainer=trainer, optimizer=opt))
    _SwitchToDualOnLrDrop(task).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):
        evaluator.run([0])
        lrs.append(opt.param_groups[0]["lr"])
        dual.append(task._loss.use_dual)

    trainer.run([0], max_epochs=9)
    # best at validation 2; validations 3, 4 do not improve (patience 2) -> drop after validation 5
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(1e-4)
    assert dual[:5] == [False] * 5 and dual[5]  # switched at the start of the epoch after the drop
    assert trainer.state.epoch == 6  # 4 validations without improvement after the best (2) -> stop
    assert len(lrs) == 6


def test_lesion_targets_align_with_the_image_at_working_resolution(tmp_path):
    """A dot painted into the photograph and the same dot in the mask land on the same
    working-resolution centroid (a sub-pixel shift would be enough to lose microaneurysms)."""
    from scipy import ndimage

    from monailabel_dr.transforms import LoadFundusd, LoadLesionTargetsd

    h, w = 1424, 2144
    yy, xx = np.mgrid[0:h, 0:w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.6 * h) ** 2
    img = np.zeros((h, w, 3), np.uint8)
    img[fov] = 60
    mask = np.zeros((h, w), np.uint8)
    for y, x in [(300, 800), (700, 1050), (1100, 1500), (500, 1750)]:
        img[y - 3:y + 4, x - 3:x + 4] = 255
        mask[y - 3:y + 4, x - 3:x + 4] = 255
    Image.fromarray(mask).save(tmp_path / "ma.png")
    d = LoadFundusd("image", 512)({"image": img, "masks": {"MA": str(tmp_path / "ma.png")}})
    d = LoadLesionTargetsd("label")(d)
    target = d["label"][0].numpy()
    bright = np.clip(d["image"][0].numpy() - 60 / 255, 0, None)
    labels, n = ndimage.label(target > 0)
    assert n == 4
    for i in range(1, n + 1):
        zone = ndimage.binary_dilation(labels == i, iterations=3)
        np.testing.assert_allclose(ndimage.center_of_mass(target * (labels == i)),
                                   ndimage.center_of_mass(bright * zone), atol=0.02)


def test_profile_overrides_from_conf():
    from monailabel_dr.config import ConfError, parse_conf

    s = parse_conf({"models": "lesion_sam", "lesion_sam_set": "network.text_mode=name,network.injector=false,"
                    "network.sam.checkpoint=/data/sam.pth,train.learning_rate=1e-4"}, "/app")
    m = s.models["lesion_sam"]
    assert m.network["text_mode"] == "name" and m.network["injector"] is False
    assert m.network["sam"]["checkpoint"] == "/data/sam.pth" and m.network["sam"]["embed_dim"] == 128  # rest kept
    assert m.train.learning_rate == 1e-4
    for bad in ("network.text_mode", "weights=1", "network.sam.embed_dim.x=3", "train.x=[1,2", "train.x=1]"):
        with pytest.raises(ConfError):
            parse_conf({"models": "lesion_sam", "lesion_sam_set": bad}, "/app")
    # commas inside YAML brackets belong to the value: lists and mappings can be overridden
    s = parse_conf({"models": "lesion_seg", "lesion_seg_set": "train.pos_weight=[10, 3,1,1],train.learning_rate=0.01"},
                   "/app")
    t = s.models["lesion_seg"].train
    assert t.pos_weight == (10, 3, 1, 1) and t.learning_rate == 0.01
    s = parse_conf({"models": "twlr", "twlr_set": "train.crop={size: 96, samples_per_image: 2}"}, "/app")
    assert s.models["twlr"].train.crop.size == 96 and s.models["twlr"].train.crop.samples_per_image == 2


@pytest.mark.parametrize("model,key,value,match", [
    ("lesion_seg", "train.learnig_rate", "0.01", r"unknown key\(s\) \['learnig_rate'\]; accepted: .*'learning_rate'"),
    ("lesion_seg", "train.crop", "{size: 96}", r"unknown key\(s\) \['crop'\]"),      # TWLR's, not Lesion-Net's
    ("grading", "train.optimiser", "sgd", r"\['optimiser'\]; accepted: .*'optimizer'"),
    ("grading", "train.optimizer", "adam", r"optimizer='adam'; accepted: adamw, sgd"),
    ("grading", "train.max_epochs", "ten", r"max_epochs='ten' is not int"),
    ("grading", "train.batch_size", "0", r"batch_size must be > 0"),
    ("lesion_seg", "train.pos_weight", "[1, 2]", r"pos_weight needs 4 values"),
    ("lesion_seg", "train.class_ratios", "[1, 1, 1]", r"class_ratios needs 5 values"),
    ("lesion_seg", "train.lambda", "high", r"lambda='high' is not float|lam='high' is not float"),
    ("twlr", "train.crop", "{size: 96, n: 2}", r"train.crop: unknown key\(s\) \['n'\]"),
    ("twlr", "train.counterfactual", "{radious: 3}", r"train.counterfactual: .*radious"),
    ("twlr_inpainter", "train.holes", "{stroke: 3}", r"train.holes: .*stroke"),
    ("lesion_sam", "train.negative_prob", "1.5", r"negative_prob must be in \[0, 1\]"),
    ("lesion_seg", "train.ema_decay", "1.0", r"ema_decay must be in \[0, 1\)"),
    ("lesion_seg", "train.cpu_precision", "fp16", r"cpu_precision='fp16'; accepted: fp32, bf16"),
])
def test_train_settings_typo_or_bad_value_refused(model, key, value, match):
    """A typo in a train key (YAML or --conf <model>_set) is refused naming the accepted keys; a bad value
    names the key and what is accepted, before any run."""
    from monailabel_dr.config import ConfError, parse_conf

    with pytest.raises(ConfError, match=match):
        parse_conf({"models": model, f"{model}_set": f"{key}={value}"}, "/app")


def test_ema_weights_validate_on_the_average_and_train_on_the_raw_weights():
    """EMAWeights: the evaluator sees the exponential moving average (buffers too), the trainer goes on
    with its own weights afterwards, and an evaluator that fails still puts them back."""
    from ignite.engine import Engine, Events

    from monailabel_dr.lib.trainers.common import EMAWeights

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    decay = 0.5
    ema = {k: None for k in net.state_dict()}

    def step(engine, batch):
        opt.zero_grad()
        net.train()
        net(batch).pow(2).sum().backward()
        opt.step()

    def track(engine):  # the reference average, by hand
        for k, v in net.state_dict().items():
            if not v.is_floating_point():
                continue
            ema[k] = v.detach().clone() if ema[k] is None else decay * ema[k] + (1 - decay) * v.detach()

    seen = {}
    trainer, evaluator = Engine(step), Engine(lambda e, b: seen.update(
        {k: v.detach().clone() for k, v in net.state_dict().items()}))
    EMAWeights(net, decay).attach(trainer, evaluator)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, track)
    data = [torch.randn(4, 3) for _ in range(5)]
    trainer.run(data, max_epochs=1)
    raw = {k: v.detach().clone() for k, v in net.state_dict().items()}
    evaluator.run([0], max_epochs=1)
    for k, ref in ema.items():
        if ref is not None:
            assert torch.allclose(seen[k], ref, atol=1e-6), k                 # validated on the average
            assert not torch.allclose(ref, raw[k]) or k.endswith("num_batches_tracked"), k
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k]), k                                       # training weights restored

    def boom(engine, batch):
        raise RuntimeError("validation failed")

    failing = Engine(boom)
    ema2 = EMAWeights(net, decay)
    ema2.attach(trainer, failing)
    ema2.update()
    opt.zero_grad()
    net(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError):
        failing.run([0], max_epochs=1)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_profile_of_every_model_types_cleanly(tmp_path):
    """Every shipped profile's train block parses into its trainer's typed settings (so a YAML typo fails
    this test), and the values reach the trainer's MONAI Label config unchanged."""
    import yaml

    from monailabel_dr.config import CONFIG_DIR, PROFILE_BLOCKS, import_object, load_model_table, parse_conf
    from monailabel_dr.lib.trainers.common import trainer_config

    table = load_model_table()
    for name, spec in table.items():
        profiles = spec.network_profiles()["profiles"]
        for profile, block in profiles.items():
            assert set(block) <= set(PROFILE_BLOCKS), (name, profile)
            s = parse_conf({"models": name, f"{name}_profile": profile, "model_dir": str(tmp_path)}, "/app")
            t = s.models[name].train
            assert isinstance(t, import_object(spec.trainer).settings_class), (name, profile)
            raw = (block.get("train") or {})
            for key, value in raw.items():
                field = {"lambda": "lam"}.get(key, key)
                got = getattr(t, field)
                if isinstance(value, list):
                    assert list(got) == value, (name, profile, key)
                elif not isinstance(value, dict):
                    assert got == value, (name, profile, key)
            cfg = trainer_config(s.models[name], s)
            assert cfg["max_epochs"] == t.max_epochs and cfg["learning_rate"] == t.learning_rate
    assert CONFIG_DIR.is_dir() and yaml   # the YAML files read above are the shipped ones


def test_unknown_profile_block_refused(tmp_path):
    """An unknown top-level key in a profile (e.g. ``trian:``) is an error naming the accepted blocks."""
    import dataclasses

    import yaml

    from monailabel_dr.config import CONFIG_DIR, ConfError, load_model_table, parse_conf

    doc = yaml.safe_load((CONFIG_DIR / "lesion_seg.yaml").read_text())
    doc["profiles"]["tiny"]["trian"] = {"max_epochs": 3}
    (tmp_path / "lesion_seg.yaml").write_text(yaml.safe_dump(doc))
    table = load_model_table()
    table["lesion_seg"] = dataclasses.replace(table["lesion_seg"], network_config=str(tmp_path / "lesion_seg.yaml"))
    with pytest.raises(ConfError, match=r"unknown key\(s\) \['trian'\]; accepted: .*'train'"):
        parse_conf({"models": "lesion_seg", "lesion_seg_profile": "tiny"}, "/app", table)


def test_rand_lesion_prompt_picks_present_lesions_and_some_negatives():
    from monailabel_dr.transforms import RandLesionPromptd

    lab = torch.zeros(5, 8, 8)
    lab[2, 1:3, 1:3] = 1.0       # EX present
    lab[3, 5, 5] = 0.4           # SE below half coverage: absent
    lab[4] = 1.0                 # FOV
    t = RandLesionPromptd(keys="label", negative_prob=0.0)
    t.set_random_state(0)
    picks = {int(t({"label": lab})["cls"]) for _ in range(20)}
    assert picks == {2}
    out = t({"label": lab})
    assert out["label"].shape == (2, 8, 8) and torch.equal(out["label"][0], lab[2]) and torch.equal(out["label"][1], lab[4])
    t = RandLesionPromptd(keys="label", negative_prob=1.0)
    t.set_random_state(0)
    assert len({int(t({"label": lab})["cls"]) for _ in range(40)}) == 4


def test_lower_priority_idle_and_nice_on_a_thread():
    """lib/priority.py: SCHED_IDLE / nice applied to one thread and read back from /proc (Linux)."""
    import os
    import threading

    from monailabel_dr.config import ConfError, parse_conf
    from monailabel_dr.lib.priority import lower_priority, task_priority

    if not os.path.isdir("/proc") or not hasattr(os, "SCHED_IDLE"):
        pytest.skip("needs Linux /proc and SCHED_IDLE")
    seen = {}

    def worker(setting, key):
        seen[key] = (lower_priority(setting), task_priority_of_thread())

    def task_priority_of_thread():
        return task_priority(threading.get_native_id())   # /proc/<tid> exists for every thread

    for setting, key in (("idle", "idle"), (5, "nice")):
        t = threading.Thread(target=worker, args=(setting, key))
        t.start()
        t.join()
    assert seen["idle"] == ("idle", "idle")
    assert seen["nice"][0] == "nice 5" and seen["nice"][1].startswith("nice")
    assert parse_conf({"models": "grading", "train_nice": "idle"}, "/tmp/x").train_nice == "idle"
    with pytest.raises(ConfError, match="train_nice"):
        parse_conf({"models": "grading", "train_nice": "lowest"}, "/tmp/x")


def test_lower_process_priority_reaches_threads_that_already_exist():
    """A background job lowers every thread it has, not only the calling one: a thread started before
    (as torch's intra-op thread is, while the job imports and builds the app) would otherwise compete with
    the server's requests at normal priority. Run in a child process so pytest keeps its own priority."""
    import os
    import subprocess
    import sys

    if not os.path.isdir("/proc") or not hasattr(os, "SCHED_IDLE"):
        pytest.skip("needs Linux /proc and SCHED_IDLE")
    code = """
import json, os, threading
from monailabel_dr.lib.priority import lower_process_priority, process_priorities
stop = threading.Event()
early = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in early:
    t.start()
before = process_priorities(os.getpid())
applied = lower_process_priority("idle")
late = threading.Thread(target=stop.wait)
late.start()
after = process_priorities(os.getpid())
stop.set()
print(json.dumps({"before": sorted(set(before.values())), "after": sorted(set(after.values())),
                  "n_before": len(before), "n_after": len(after), "applied": applied}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["before"] == ["normal"], res
    assert res["n_before"] >= 4 and res["n_after"] == res["n_before"] + 1, res   # main + 3 early, + the late one
    assert res["after"] == ["idle"], res
    assert res["applied"] == f"idle ({res['n_before']} threads)", res


def test_cpu_bf16_training_forward_autocasts_and_returns_float32(monkeypatch):
    """train.cpu_precision=bf16: the training forward runs in bfloat16 on a CPU with native bf16 and the loss
    sees float32; without native bf16, or on another device, or with fp32, training stays float32."""
    from monai.inferers import SimpleInferer

    from monailabel_dr.lib.trainers import common
    from monailabel_dr.lib.trainers.settings import LesionSegTrain

    seen = []

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            seen.append(y.dtype)
            return y

    bf16, fp32 = LesionSegTrain.from_dict({"cpu_precision": "bf16"}), LesionSegTrain.from_dict({})
    monkeypatch.setattr(common, "native_cpu_bf16", lambda: True)
    assert common.cpu_bf16(bf16, "cpu") and not common.cpu_bf16(fp32, "cpu") and not common.cpu_bf16(bf16, "cuda:0")
    monkeypatch.setattr(common, "native_cpu_bf16", lambda: False)
    assert not common.cpu_bf16(bf16, "cpu")

    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 16, 16)
    out = common.CPUAutocastInferer()(x, net)
    assert seen[-1] == torch.bfloat16 and out.dtype == torch.float32
    ref = SimpleInferer()(x, net)
    assert seen[-1] == torch.float32
    assert not torch.equal(out, ref) and torch.allclose(out, ref, atol=0.05)   # bf16 rounding, same function
    out.sum().backward()   # the backward of an autocast forward reaches the float32 weights
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.float32


def test_checkpoint_preprocessing_compares_what_it_computes(tmp_path):
    """A lesion checkpoint recorded as {method: local_contrast} fits a profile that writes Graham's defaults
    out (sigma radius / 30, gain 4) and no other gain; a record that is not a preprocessing is refused too."""
    from monailabel_dr.lib.checkpoints import check_preprocess

    ckpt = tmp_path / "c.pt"
    torch.save({"model": {}, "preprocess": {"method": "local_contrast"}}, ckpt)
    check_preprocess(str(ckpt), {"method": "local_contrast"}, "p")
    check_preprocess(str(ckpt), {"method": "local_contrast", "gain": 4.0, "sigma_fraction": 1.0 / 30.0}, "p")
    for other in ({"method": "local_contrast", "gain": 3.0}, {"method": "none"}, None):
        with pytest.raises(ValueError, match="trained with preprocess"):
            check_preprocess(str(ckpt), other, "the profile")
    torch.save({"model": {}, "preprocess": {"method": "sharpen"}}, ckpt)
    with pytest.raises(ValueError):
        check_preprocess(str(ckpt), {"method": "local_contrast"}, "p")
