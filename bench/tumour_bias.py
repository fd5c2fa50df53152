"""Is the default's tumour call too strict? A bias on stage 2's tumour logit, on the study's trained models.

Adding ``b`` to stage 2's tumour logit before the argmax multiplies the odds of tumour against each other
class by e^b: a lower tumour threshold for b > 0, a higher one for b < 0, with the trained network
unchanged. Scored on the validation set (the arm's final models of the tumour study, §5g), per seed:
per-case tumour Dice, global Dice, median volume ratio, lesion recall and precision, false tumour on the
tumour-free cases. If the lesions the default misses lay just under the threshold, recall would rise with b.

    cd bench && python tumour_bias.py      # about 12 s per model and bias; needs the study's trained models

Results: bench/results/tumour_bias.json; table in BENCHMARKS.md §5h.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
import tumour_study as ts
from common import ROOT, any_overlap, md_table, stamp, write_table
from recipe_study import load

ARM = "stage 2 on 64² patches, stage 1 a fifth"
STUDY = ROOT / "bench" / "results" / "tumour_study_96_600s_v2.json"  # the study run whose models are scored
RESULTS = ROOT / "bench" / "results" / "tumour_bias.json"
KEYS = ("dice_tumor", "dice_tumor_global", "median_tumor_volume_ratio", "lesion_recall", "lesion_precision",
        "fp_tumor_ml_tumor_free_cases")


class TumourBias(torch.nn.Module):
    """A network whose tumour logit (class 2) is raised by ``bias``."""

    def __init__(self, model: torch.nn.Module, bias: float):
        super().__init__()
        self.model, self.bias = model, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return logits + torch.tensor([0.0, 0.0, self.bias], device=logits.device).view(1, 3, 1, 1)


def study_row(study: Path, arm: str, seed: int) -> dict:
    """The study's validation row of ``arm`` × ``seed``, checked against the models on disk: they must be the ones
    that row trained (``tumour_study.check_trained``)."""
    rows = [r for r in load(study) if (r["arm"], r["seed"], r["set"]) == (arm, seed, "validation")]
    if not rows or not rows[0].get("roi_size"):
        raise ValueError(f"{study} holds no trained cascade row of {arm!r} seed {seed}")
    ts.check_trained(arm, rows[0], rows[0]["batch"])
    return rows[0]


def study_cases(study: Path, arm: str, seed: int, set_name: str = "validation") -> tuple[dict, list]:
    """The study's setup (from ``arm`` × ``seed``'s row) and the cached cases of one of its sets."""
    setup = study_row(study, arm, seed)["setup"]
    n = setup["val_cases"] if set_name == "validation" else setup["kept_cases"]
    return setup, ts.cached(ts.dataset(set_name, n, setup["shape"]), {**ts.BASE, **ts.ARMS[arm]}, None)


def trained_models(study: Path, arm: str, seed: int) -> tuple[int, dict]:
    """``arm`` × ``seed``'s liver-box size and final networks, checked against its row (:func:`study_row`)."""
    row = study_row(study, arm, seed)
    return row["roi_size"], ts.load_models(arm, seed, row["setup"]["base"])


def run(arm: str, seeds: list[int], biases: list[float], study: Path = STUDY) -> tuple[list[dict], dict]:
    """Score the arm's final models of each seed with each tumour-logit bias on the study's validation set.

    Returns:
        (one row per seed and bias, the study's setup).
    """
    setup, cases = study_cases(study, arm, seeds[0])
    rows = []
    for seed in seeds:
        roi, models = trained_models(study, arm, seed)
        for b in biases:
            ev = ts.evaluate_arm(arm, {**models, "stage2": TumourBias(models["stage2"], b)}, roi, cases)
            rows.append({"arm": arm, "seed": seed, "bias": b, **{k: any_overlap(ev["summary"], k) for k in KEYS}})
            print(json.dumps(rows[-1]), flush=True)
    return rows, setup


def table(rows: list[dict]) -> str:
    """Mean over seeds per bias."""
    body = []
    for b in sorted({r["bias"] for r in rows}):
        at = [r for r in rows if r["bias"] == b]
        body.append([f"{b:+g}", len(at)] + [f"{statistics.mean(r[k] for r in at):.3f}" for k in KEYS])
    return md_table(["tumour-logit bias", "seeds", "tumour Dice per case", "tumour Dice global",
                     "volume pred/true (median)", "lesion recall", "lesion precision", "FP tumour mL (tumour-free)"],
                    body)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", default=ARM, help="a cascade arm of the tumour study")
    ap.add_argument("--study", type=Path, default=STUDY, help="the study results file that trained its models")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--biases", type=float, nargs="+", default=[-0.5, 0.0, 0.5, 1.0, 2.0, 3.0])
    a = ap.parse_args()
    rows, setup = run(a.arm, a.seeds, a.biases, a.study)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    command = " ".join(["cd bench && python tumour_bias.py", shlex.join(sys.argv[1:])]).strip()
    write_table("tumour_bias", stamp(command) + f"\n\nArm "
                f"'{a.arm}', its final models of the tumour study in `{a.study.name}` ({setup['seconds']:.0f} s, "
                f"{setup['train_cases']} training cases), on its validation set; mean over seeds.\n\n" + table(rows))
