"""TP-DRSeg network (networks/tp_drseg.py) on its own: no MONAI Label, tiny configs from configs/lesion_sam.yaml."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from monailabel_dr.config import CONFIG_DIR
from monailabel_dr.networks.tp_drseg import (
    PriorAlignedInjector,
    TPDRSeg,
    TPDRSegConfig,
    TPDRSegLoss,
    WeightsUnavailable,
    build_sam,
    build_tp_drseg,
)


def profile(name: str) -> dict:
    with open(CONFIG_DIR / "lesion_sam.yaml") as f:
        return copy.deepcopy(yaml.safe_load(f)["profiles"][name]["network"])


@pytest.fixture(scope="module")
def tiny() -> TPDRSeg:
    torch.manual_seed(0)
    return build_tp_drseg(profile("tiny"), load_weights=False)


def test_descriptions_come_from_the_config_file_and_ablation_uses_names():
    cfg = TPDRSegConfig.from_dict(profile("tiny"))
    texts = cfg.lesion_texts()
    assert texts[0] == ["small red dots"]                       # MA, METHODS.md's default
    assert len(texts[3]) == 2                                     # SE: two descriptions, averaged
    names = TPDRSegConfig.from_dict({**profile("tiny"), "text_mode": "name"}).lesion_texts()
    assert names == [["microaneurysm"], ["haemorrhage"], ["hard exudate"], ["soft exudate"]]
    with pytest.raises(ValueError):
        TPDRSegConfig.from_dict({**profile("tiny"), "text_mode": "class"})


def test_explicit_prior_is_min_max_normalised_cosine_similarity():
    patches = torch.randn(2, 3, 4, 8)
    text = torch.randn(5, 8)
    p = TPDRSeg.explicit_prior(patches, text)
    assert p.shape == (2, 5, 3, 4)
    sim = torch.nn.functional.normalize(patches, dim=-1)[0, 1, 2] @ torch.nn.functional.normalize(text[3], dim=0)
    all_sim = torch.nn.functional.normalize(patches[0], dim=-1) @ torch.nn.functional.normalize(text[3], dim=0)
    expected = (sim - all_sim.min()) / (all_sim.max() - all_sim.min())
    torch.testing.assert_close(p[0, 3, 1, 2], expected)
    assert p.amin() == 0 and torch.isclose(p.amax(), torch.tensor(1.0))


def test_injector_starts_as_identity_and_learns_through_gamma():
    inj = PriorAlignedInjector(16, stride=4)
    tokens = torch.randn(1, 8, 8, 16)
    prior = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(inj(tokens, prior), tokens)        # gamma = 0: the frozen SAM is unchanged
    inj.gamma.data.fill_(0.5)
    out = inj(tokens, prior)
    assert not torch.allclose(out, tokens)
    out.sum().backward()
    assert inj.q.weight.grad is not None and inj.k.weight.grad.abs().sum() > 0
    # the prior gates k and v: a zero prior removes the value path's contribution from the image
    zero = inj(tokens, torch.zeros_like(prior))
    torch.testing.assert_close(zero - tokens, (0.5 * inj.v.bias).expand_as(tokens), atol=1e-5, rtol=1e-4)


def test_encoder_with_zero_gamma_injectors_equals_plain_sam(tiny):
    x = torch.rand(1, 3, 64, 64)
    prior = torch.rand(1, 1, 4, 4)
    with torch.no_grad():
        ours = tiny.encode_image(tiny.sam_input(x), prior)
        plain = tiny.sam.image_encoder(tiny.sam.preprocess(x * 255.0))
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-4)


def test_forward_modes_shapes_free_text_and_refinement(tiny):
    tiny.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for mode in ("faithful", "fast"):
            out = tiny(x, lesions=[0, 1, 2, 3], texts=["yellow spots"], mode=mode)
            assert out["logits"].shape == (5, 64, 64) and out["prior"].shape == (5, 4, 4)
            assert out["classes"][:4] == [0, 1, 2, 3] and 0 <= out["classes"][4] < 4
            assert out["texts"][3] == ["pale yellow or white areas with ill-defined edges", "cotton-wool spot"]
        one = tiny(x, lesions=[2], mode="faithful")["logits"]
        fast_one = tiny(x, lesions=[2], mode="fast")["logits"]
        torch.testing.assert_close(one, fast_one)                  # one lesion: the two modes are the same computation
        refined = tiny(x, lesions=[2], points=[[10, 12]], point_labels=[1], boxes=[4, 4, 40, 40])["logits"]
        assert refined.shape == (1, 64, 64) and not torch.allclose(refined, one)
    with pytest.raises(ValueError):
        tiny(x, mode="fast")
    with pytest.raises(ValueError):
        tiny(x, lesions=[0], mode="quick")


def test_training_step_reduces_bce_iou_loss():
    torch.manual_seed(1)
    net = build_tp_drseg(profile("tiny"), load_weights=False)
    net.train()
    x = torch.rand(2, 3, 64, 64)
    truth = torch.zeros(2, 1, 64, 64)
    truth[:, :, 20:36, 20:36] = 1
    cls = torch.tensor([2, 0])
    loss_fn = TPDRSegLoss()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(net.forward_train(x, cls), truth)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # from scratch every part trains, CLIP included (the prior is differentiable)
    assert all(p.requires_grad for p in net.clip.parameters())


def test_loss_ignores_outside_the_field_of_view():
    logits = torch.randn(1, 1, 8, 8)
    truth = (torch.rand(1, 1, 8, 8) > 0.5).float()
    fov = torch.ones(1, 1, 8, 8)
    fov[..., 4:] = 0
    l2 = logits.clone()
    l2[..., 4:] += 7
    loss = TPDRSegLoss()
    torch.testing.assert_close(loss(logits, truth, fov), loss(l2, truth, fov))


def test_official_format_sam_checkpoint_loads_and_freezes(tmp_path):
    """A state dict saved from a randomly initialised Sam (official key layout) loads; SAM's encoders are
    then frozen and left out of the trainable state dict, which names the frozen weights' source."""
    net_cfg = profile("tiny")
    sam = build_sam(TPDRSegConfig.from_dict(net_cfg).sam, load_weights=False)
    sd = sam.state_dict()
    assert {k.split(".")[0] for k in sd} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    path = tmp_path / "sam_tiny.pth"
    torch.save(sd, path)
    net_cfg["sam"]["checkpoint"] = str(path)
    net = build_tp_drseg(net_cfg)
    torch.testing.assert_close(net.sam.image_encoder.pos_embed, sd["image_encoder.pos_embed"])
    assert not any(p.requires_grad for p in net.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in net.sam.mask_decoder.parameters())
    trained = net.trainable_state_dict()
    assert not any(k.startswith(("sam.image_encoder.", "sam.prompt_encoder.")) for k in trained)
    assert any(k.startswith("sam.mask_decoder.") for k in trained) and any(k.startswith("injectors.") for k in trained)
    assert net.weights_source()["sam"] == str(path)
    # a wrong or missing file is a clear error, not random weights
    net_cfg["sam"]["checkpoint"] = str(tmp_path / "missing.pth")
    with pytest.raises(WeightsUnavailable, match="missing.pth"):
        build_tp_drseg(net_cfg)
    # a download that cannot happen (nothing listens on port 9) says so and how to work offline
    net_cfg["sam"]["checkpoint"] = "http://127.0.0.1:9/sam_vit_b_01ec64.pth"
    with pytest.raises(WeightsUnavailable, match="local file"):
        build_tp_drseg(net_cfg)
    # without load_weights nothing is fetched at all
    assert build_tp_drseg(net_cfg, load_weights=False).weights_source()["sam"] is None


def test_injector_ablation_switch():
    net = build_tp_drseg({**profile("tiny"), "injector": False}, load_weights=False)
    assert net.injectors is None
    with torch.no_grad():
        assert net(torch.rand(1, 3, 64, 64), lesions=[1])["logits"].shape == (1, 64, 64)


def test_paper_profile_builds_real_architectures_without_weights():
    """SAM ViT-B (1024 px) and CLIP ViT-B/16 with QuickGELU, built without downloading anything."""
    net = build_tp_drseg(profile("paper"), load_weights=False)
    n_sam_enc = sum(p.numel() for p in net.sam.image_encoder.parameters())
    n_clip_visual = sum(p.numel() for p in net.clip.visual.parameters())
    assert n_sam_enc == 89_670_912                    # segment_anything's vit_b image encoder
    assert n_clip_visual == 86_192_640                # open_clip ViT-B-16 visual tower
    assert len(net.injectors) == 12 and net.sam.image_encoder.img_size == 1024
    assert net.weights_source()["sam"] is None and net.config.sam.checkpoint == "official"


@pytest.mark.slow
def test_paper_profile_runs_without_weights():
    net = build_tp_drseg(profile("paper"), load_weights=False).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 3, 1024, 1024), lesions=[0, 1, 2, 3], mode="fast")
    assert out["logits"].shape == (4, 1024, 1024) and out["prior"].shape == (4, 14, 14)


def test_loss_positive_weight_and_two_argument_form():
    """BCE with lesion pixels weighted pos_weight times (hand-computed), plus the Jaccard term; the engine's
    two-argument call (truth and FOV stacked) equals the three-argument one."""
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    truth = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    fov = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    p = torch.sigmoid(logits)
    bce_px = -(truth * torch.log(p) + (1 - truth) * torch.log(1 - p))
    w = fov * (1 + 9 * truth)
    bce = float((bce_px * w).sum() / fov.sum())
    inter = float((p * fov * truth).sum())
    union = float((p * fov).sum() + truth.sum() - inter)
    expected = bce + 1 - (2 * inter + 1) / (2 * union + 1)   # MONAI Jaccard form: smooth 1 on 2I / 2U
    loss = TPDRSegLoss(pos_weight=10)
    assert abs(float(loss(logits, truth, fov)) - expected) < 1e-5
    assert abs(float(loss(logits, torch.cat([truth, fov], 1))) - expected) < 1e-5
    assert float(TPDRSegLoss()(logits, truth, fov)) < expected   # unweighted is smaller here


def test_tiles_when_the_working_image_is_larger_than_sams_input():
    """A 64 px SAM on a 128 px working image: 2x2 tiles without overlap reproduce the per-tile results
    exactly; the training-style forward keeps each image's class; points and the box reach only their tiles."""
    torch.manual_seed(0)
    net = build_tp_drseg({**profile("tiny"), "tile_overlap": 0.0}, load_weights=False, image_size=128).eval()
    assert net.tile == 64
    image = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = net(image, lesions=[2], texts=["yellow spots"], mode="fast")
        assert out["logits"].shape == (2, 128, 128) and out["prior"].shape == (2, 128, 128)
        assert out["classes"][0] == 2 and out["iou"].shape == (2,)
        corner = net(image[..., 64:, :64], lesions=[2], texts=["yellow spots"], mode="fast")
        torch.testing.assert_close(out["logits"][:, 64:, :64], corner["logits"], atol=1e-4, rtol=1e-4)
        # batch of two images with different classes, tiled: each tile answers its own image's class
        batch = torch.rand(2, 3, 128, 128)
        cls = torch.tensor([0, 3])
        tiled = net(batch, cls=cls)
        assert tiled.shape == (2, 1, 128, 128)
        torch.testing.assert_close(tiled[1:, :, :64, 64:], net.forward_train(batch[1:, :, :64, 64:], cls[1:]),
                                   atol=1e-4, rtol=1e-4)
        # a point in the bottom-right tile changes that tile only; a box makes the outside background
        pt = net(image, lesions=[2], points=[[100.0, 100.0]], point_labels=[1])
        plain = net(image, lesions=[2])
        torch.testing.assert_close(pt["logits"][:, :64, :], plain["logits"][:, :64, :])
        assert not torch.allclose(pt["logits"][:, 64:, 64:], plain["logits"][:, 64:, 64:])
        boxed = net(image, lesions=[2], boxes=[10.0, 10.0, 90.0, 50.0])
        assert float(boxed["logits"][0, 100, 100]) == -20.0 and float(boxed["logits"][0, 60, 120]) == -20.0
        assert float(boxed["logits"][0, 30, 50]) != -20.0
    with pytest.raises(ValueError):
        build_tp_drseg({**profile("tiny"), "tile_overlap": 1.0}, load_weights=False)
