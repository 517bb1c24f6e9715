"""Markdown tables from `monailabel-dr evaluate ... --json` files (the tables in docs/results.md).

    .venv/bin/python bench/eval_table.py runs/a/eval_val.json [runs/b/eval_val.json ...]

One table per file (pooled Dice with its bootstrap CI, per-image Dice, AUC-PR with CI, AUC-ROC,
lesion-level FROC); with several files, a last table of the per-lesion spread across them
(mean, and min-max) so repeated runs of one recipe can be compared at a glance.
"""
from __future__ import annotations

import argparse
import json

ROWS = ("MA", "HE", "EX", "SE", "mean")


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci) -> str:
    return "" if not ci or ci[0] is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def table(report: dict) -> str:
    seg, froc = report["segmentation"], report.get("froc", {})
    out = ["| lesion | Dice pooled [95 % CI] | Dice per-image mean | AUC-PR [95 % CI] | AUC-ROC | FROC |",
           "|---|---|---|---|---|---|"]
    for row in ROWS:
        m = seg[row]
        fr = froc[row].get("froc_score") if isinstance(froc.get(row), dict) else None
        out.append(f"| {row} | {_f(m['dice_pooled'])}{_ci(m['ci'].get('dice_pooled'))} | {_f(m['dice_per_image_mean'])} "
                   f"| {_f(m['auc_pr'])}{_ci(m['ci'].get('auc_pr'))} | {_f(m['auc_roc'])} | {_f(fr)} |")
    return "\n".join(out)


def spread(reports: list[dict]) -> str:
    out = ["| lesion | Dice pooled: mean (min-max) | AUC-PR: mean (min-max) |", "|---|---|---|"]
    for row in ROWS:
        cells = []
        for key in ("dice_pooled", "auc_pr"):
            vals = [r["segmentation"][row][key] for r in reports]
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        out.append(f"| {row} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="JSON files written by `monailabel-dr evaluate --json`")
    args = ap.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
        r = reports[-1]
        print(f"### {path}: {len(r['images'])} images (split {r.get('split')}), model {r.get('model', {}).get('checkpoint')}\n")
        print(table(r) + "\n")
    if len(reports) > 1:
        print(f"### spread over {len(reports)} runs\n")
        print(spread(reports))


if __name__ == "__main__":
    main()
