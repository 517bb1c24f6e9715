"""Seconds per Lesion-Net training step, float32 against bfloat16 autocast (prints numbers; asserts nothing).

    .venv/bin/python bench/train_step_speed.py [--profile cpu_negatives] [--set network.widths=[16,32,64,128,256,256]]
                                               [--crops 8] [--steps 6] [--rounds 2]

One training step as the `lesion_seg` trainer runs it: the profile's network and loss (dual Dice + weighted
BCE) on a batch of random crops of the profile's patch size (`batch_size` x `samples_per_image` crops unless
--crops), forward through the trainer's inferer (float32: MONAI's SimpleInferer; bf16: the trainer's
CPUAutocastInferer, `train.cpu_precision=bf16`), backward, AdamW step. The data pipeline is not timed: it is
about 5 % of a step here (py-spy on a running training). Rounds alternate float32 and bf16; the first step of
each round is a warm-up and not counted. The weights do not change the time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="cpu_negatives")
    p.add_argument("--set", help="profile overrides as --conf lesion_seg_set takes them")
    p.add_argument("--crops", type=int, default=0, help="crops per step (default: batch_size x samples_per_image)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()

    import torch
    from monai.inferers import SimpleInferer

    from monailabel_dr.config import parse_conf
    from monailabel_dr.lib.trainers.common import CPUAutocastInferer, native_cpu_bf16
    from monailabel_dr.networks.lesion_net import LesionLoss, build_lesion_net

    conf = {"models": "lesion_seg", "lesion_seg_profile": a.profile}
    if a.set:
        conf["lesion_seg_set"] = a.set
    model = parse_conf(conf, ROOT).models["lesion_seg"]
    t = model.train
    n = a.crops or t.batch_size * t.samples_per_image
    torch.manual_seed(0)
    net = build_lesion_net(model.network).train()
    loss_fn = LesionLoss(kind=t.loss, lam=t.lam, pos_weight=t.pos_weight, smooth=t.dice_smooth, bce_weight=t.bce_weight)
    opt = torch.optim.AdamW(net.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    x = torch.randn(n, 3, t.patch_size, t.patch_size)
    target = (torch.rand(n, 5, t.patch_size, t.patch_size) > 0.98).float()
    target[:, -1] = 1.0   # the field of view channel
    print(f"profile {a.profile}{' + ' + a.set if a.set else ''}: network {model.network}, {n} crops of "
          f"{t.patch_size} px per step; {sum(q.numel() for q in net.parameters())} parameters")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"native bf16: {native_cpu_bf16()}")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(a.rounds):
        for mode, inferer in (("fp32", SimpleInferer()), ("bf16", CPUAutocastInferer())):
            for i in range(a.steps + 1):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = loss_fn(inferer(x, net), target)
                loss.backward()
                opt.step()
                if i:
                    times[mode].append(time.perf_counter() - t0)
    for mode, v in times.items():
        print(f"{mode}: median {statistics.median(v):.3f} s per step, best {min(v):.3f} s ({len(v)} steps)")
    print(f"bf16 / fp32 (medians): {statistics.median(times['bf16']) / statistics.median(times['fp32']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
