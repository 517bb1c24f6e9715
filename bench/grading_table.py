"""Markdown tables of grading reports (``evaluate grading --json``, ``rationale --json``) side by side.

    .venv/bin/python bench/grading_table.py plain=runs/grading_real/val.json attention=runs/grading_attention/val.json
    .venv/bin/python bench/grading_table.py --rationale runs/grade_rationale_report.json

Prints, for each report: quadratic weighted kappa, accuracy, referable AUC, sensitivity and specificity at
the served operating point, each with its bootstrap 95 % CI, then the confusion matrices.
"""

from __future__ import annotations

import argparse
import json
import math

METRICS = [("quadratic_weighted_kappa", "kappa"), ("accuracy", "accuracy"), ("referable_auc", "referable AUC"),
           ("referable_sensitivity", "sensitivity"), ("referable_specificity", "specificity")]


def cell(rep: dict, key: str) -> str:
    v = rep.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    ci = (rep.get("ci95") or {}).get(key)
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{v:.3f}"


def table(named: list[tuple[str, dict]]) -> str:
    rows = ["| model | n | " + " | ".join(h for _, h in METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for name, rep in named:
        rows.append(f"| {name} | {rep['n']} | " + " | ".join(cell(rep, k) for k, _ in METRICS) + " |")
    out = ["\n".join(rows)]
    for name, rep in named:
        cm = rep["confusion_matrix"]
        lines = [f"{name} (rows true grade 0-4, columns predicted 0-4; referable threshold "
                 f"{rep.get('operating_point', {}).get('threshold', 0.5)}):", "```"]
        lines += [" ".join(f"{v:4d}" for v in row) for row in cm]
        lines.append("```")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="*", help="NAME=report.json")
    ap.add_argument("--rationale", help="a `monailabel-dr rationale --json` report (rule, learned, cnn, cnn_plus_learned)")
    args = ap.parse_args()
    named = []
    for item in args.reports:
        name, _, path = item.partition("=")
        with open(path) as f:
            named.append((name, json.load(f)))
    if args.rationale:
        with open(args.rationale) as f:
            rep = json.load(f)
        named += [(k, rep[k]) for k in ("rule", "learned", "cnn", "cnn_plus_learned") if k in rep]
    print(table(named))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
