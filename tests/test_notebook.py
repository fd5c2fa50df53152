"""Run the tutorial notebook headless in a tiny CPU configuration (papermill), check what it writes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT

papermill = pytest.importorskip("papermill", reason="papermill is in requirements.txt; install it to run the notebook")

TINY = {"SYNTHETIC_CASES": 5, "SYNTHETIC_SHAPE": [64, 64, 24], "IMAGE_SIZE": 32, "EPOCHS": 2, "BATCH_SIZE": 8,
        "BASE_CHANNELS": 4, "DEPTH": 2, "STEPS_PER_EPOCH": 3, "VAL_FRACTION": 0.4, "DEVICE": "cpu",
        "OUTPUT_DIR": "out"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Execute the notebook once in a fresh folder holding only the notebook and the helper module."""
    work = tmp_path_factory.mktemp("nb")
    for name in ("liver_segmentation.ipynb", "unet_helpers.py"):
        shutil.copy(ROOT / name, work / name)
    papermill.execute_notebook(str(work / "liver_segmentation.ipynb"), str(work / "executed.ipynb"),
                               parameters={**TINY, "RECIPE": "default"}, cwd=str(work), progress_bar=False,
                               kernel_name="python3")
    return work


def test_notebook_writes_metrics_figures_and_prediction(tiny_run):
    out = tiny_run / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice_liver", "dice_tumor", "dice_mean", "dice_liver_lits", "dice_liver_global", "dice_tumor_global"):
        v = metrics["summary"][key]
        assert v is None or 0.0 <= v <= 1.0, (key, v)  # None only where no validation case has tumour
    assert metrics["summary"]["dice_liver"] is not None and 0 <= metrics["summary"]["dice_liver"] <= 1
    for row in metrics["per_case"]:
        assert 0 <= row["dice_liver_lits"] <= 1
    assert metrics["data"]["synthetic"] is True
    for k, v in TINY.items():  # every -p setting is honoured and recorded
        assert metrics["config"][k] == v, k
    assert metrics["timing"]["train_seconds"] > 0 and metrics["env"]["torch"]
    for fig in ("training_curves.png", "per_case_dice.png", "overlays.png"):
        assert (out / fig).stat().st_size > 10_000, fig
    assert metrics["evaluated_checkpoint"] == "last"  # the final model, not the one chosen on these cases
    assert metrics["deterministic"] is True  # the CPU default, recorded
    preds = sorted((out / "predictions").glob("*_pred.nii.gz"))  # every validation case, saved by evaluate
    assert sorted(p.name.replace("_pred.nii.gz", "") for p in preds) == sorted(metrics["data"]["validation"])
    assert len(preds) == 2  # 5 cases, VAL_FRACTION 0.4
    assert len(list((out / "inference").glob("*_pred.nii.gz"))) == 1  # the predict_volume section
    for path in preds:
        src = nib.load(str(tiny_run / "data" / "synthetic" / "images" / path.name.replace("_pred", "")))
        pred = nib.load(str(path))
        assert pred.shape == src.shape and (pred.affine == src.affine).all()
    s = metrics["summary"]
    for key in ("dice_tumor_all_cases", "dice_tumor_lits", "lesion_recall", "lesion_precision", "lesion_f1",
                "lesion_recall_any_overlap", "lesion_dice", "lesion_recall_by_volume", "tumor_burden_rmse",
                "median_tumor_volume_ratio", "n_hd95_liver_lits_mm_undefined"):
        assert key in s, key
    lo, hi = s["ci95"]["dice_liver_lits"]
    assert lo <= s["dice_liver_lits"] <= hi
    assert sum(len(c["lesions"]) for c in metrics["lesions"]) == sum(r["n_lesions"] for r in metrics["per_case"])
    for name in ("last.pt", "best.pt", "history.csv", "lesions.png"):
        assert (out / name).exists()
    csv_rows = (out / "per_case.csv").read_text().splitlines()  # beside metrics.json, one row per case
    assert csv_rows[0].split(",")[0] == "case" and "dice_tumor_lits" in csv_rows[0].split(",")
    assert [r.split(",")[0] for r in csv_rows[1:]] == [r["case"] for r in metrics["per_case"]]


def _outputs_of(executed: Path, marker: str) -> str:
    """The printed output of the executed notebook's code cell whose source contains ``marker``."""
    nb = json.loads(executed.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and marker in "".join(c["source"]))
    return "".join("".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream")


def test_notebook_scores_the_final_model(tiny_run):
    text = _outputs_of(tiny_run / "executed.ipynb", "uh.evaluate(")
    # 2 epochs of 3 steps cannot give stage 1 the steps it needs to find the liver: one stage trains both epochs
    assert "'last' checkpoint (epoch 2)" in text
    train = _outputs_of(tiny_run / "executed.ipynb", "uh.cascade_plan(")
    assert "CASCADE off" in train and "one stage trains all 2 epochs" in train
    assert "the final model" in text and "nnU-Net convention" in text


def test_notebook_outputs_are_short_and_labelled(tiny_run):
    nb = json.loads((tiny_run / "executed.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for c in code:
        for o in c.get("outputs", []):
            assert o["output_type"] != "error", o.get("evalue")
        text = "".join("".join(o.get("text", "")) for o in c.get("outputs", []) if o["output_type"] == "stream")
        lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
        assert len(lines) <= 60, (c["source"][:80], len(lines))
    all_text = json.dumps(nb)
    assert "SYNTHETIC DATA" in all_text


def test_baseline_recipe_from_parameters_alone(tmp_path):
    for name in ("liver_segmentation.ipynb", "unet_helpers.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    papermill.execute_notebook(str(tmp_path / "liver_segmentation.ipynb"), str(tmp_path / "executed.ipynb"),
                               parameters={**TINY, "EPOCHS": 1, "RECIPE": "baseline", "FOLD": 1}, cwd=str(tmp_path),
                               progress_bar=False, kernel_name="python3")
    assert not (tmp_path / "out" / "metrics.json").exists()  # a fold writes into its own subfolder
    metrics = json.loads((tmp_path / "out" / "fold_1" / "metrics.json").read_text())
    assert metrics["data"]["fold"] == 1 and len(metrics["data"]["validation"]) == 1  # 5 cases, 5 folds
    fold_cell = _outputs_of(tmp_path / "executed.ipynb", "uh.gather_folds(")
    assert fold_cell.splitlines()[0].split() == ["metric", "pooled", "fold", "mean", "std", "over", "folds", "folds"]
    assert fold_cell.splitlines()[1].split()[0] == "dice_liver_lits" and fold_cell.splitlines()[1].split()[-1] == "1"
    assert metrics["config"]["RECIPE"] == "baseline" and metrics["config"]["CONTEXT_SLICES"] == 1
    assert metrics["config"]["RECIPE_SETTINGS"]["postprocess"] is False
    assert all(math.isfinite(r["dice_liver"]) for r in metrics["per_case"])


def test_cascade_from_parameters_alone(tmp_path):
    for name in ("liver_segmentation.ipynb", "unet_helpers.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    papermill.execute_notebook(str(tmp_path / "liver_segmentation.ipynb"), str(tmp_path / "executed.ipynb"),
                               parameters={**TINY, "CASCADE": True, "EVAL_CHECKPOINT": "best"}, cwd=str(tmp_path),
                               progress_bar=False, kernel_name="python3")
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluated_checkpoint"] == "best"
    assert metrics["config"]["CASCADE"] is True
    assert (out / "stage2" / "best.pt").exists() and (out / "stage2" / "history.csv").exists()
    assert (out / "training_curves.png").exists() and (out / "montage.png").exists()  # both stages' curves in one
    assert (out / "cascade.png").stat().st_size > 10_000  # what stage 2 receives and returns
    assert metrics["config"]["ROI_SIZE"] == 64  # 0.6 x 64 voxels in-plane, rounded up to 32 (no larger than 64)
    assert len(metrics["history"]) == 1  # CASCADE = True (yours) keeps the split: EPOCHS 2 -> 1 epoch per stage
    assert "only 3 steps" in _outputs_of(tmp_path / "executed.ipynb", "uh.cascade_plan(")
    _check_predict_command(tmp_path, metrics["data"]["validation"][0])


def _check_predict_command(work: Path, case: str) -> None:
    """``python unet_helpers.py predict`` in a fresh process, from the run's files alone, labels the case the
    notebook's inference section labelled voxel for voxel, writes nothing beside the CT, and names a bad input."""
    image = work / "data" / "synthetic" / "images" / f"{case}.nii.gz"
    cli = [sys.executable, "unet_helpers.py", "predict", "out"]
    done = subprocess.run([*cli, str(image), "--out", "again", "--device", "cpu"], cwd=work, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    fresh = np.asanyarray(nib.load(str(work / "again" / f"{case}_pred.nii.gz")).dataobj)
    notebook = np.asanyarray(nib.load(str(work / "out" / "inference" / f"{case}_pred.nii.gz")).dataobj)
    assert fresh.shape == notebook.shape and np.array_equal(fresh, notebook)
    scored = np.asanyarray(nib.load(str(work / "out" / "predictions" / f"{case}_pred.nii.gz")).dataobj)
    assert np.array_equal(fresh, scored)  # and as the evaluation, with the notebook's models in memory, did
    # (this tiny run may predict no liver at all; test_load_run_rebuilds_both_stages checks non-empty labels)
    assert (work / "again" / "labels.ctbl").read_text().splitlines()[2].startswith("2 tumour ")
    before = sorted(p.name for p in image.parent.iterdir())
    beside = subprocess.run([*cli, str(image), "--out", str(image.parent)], cwd=work, capture_output=True, text=True)
    assert beside.returncode == 2 and "nothing is written beside" in beside.stderr
    assert sorted(p.name for p in image.parent.iterdir()) == before
    (work / "notes.nii.gz").write_text("not a CT volume")
    bad = subprocess.run([*cli, "notes.nii.gz", "--out", "again"], cwd=work, capture_output=True, text=True)
    assert bad.returncode == 2 and "notes.nii.gz: cannot be read as NIfTI" in bad.stderr
    gone = subprocess.run([*cli, "nowhere.nii.gz", "--out", "again"], cwd=work, capture_output=True, text=True)
    assert gone.returncode == 2 and "no such CT file: nowhere.nii.gz" in gone.stderr and "Traceback" not in gone.stderr


def test_committed_notebook_is_one_clean_run():
    nb = json.loads((ROOT / "liver_segmentation.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), "commit the notebook from one clean top-to-bottom run"
    assert not any(o["output_type"] == "error" for c in code for o in c.get("outputs", []))
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2  # its outputs are there to read


def test_coalesce_streams_renders_progress_bars_like_a_terminal():
    sys.path.insert(0, str(ROOT / "tools"))
    from coalesce_streams import coalesce, collapse

    # the sequence tqdm writes for an outer bar and a nested leave=False bar (captured from a real run)
    bars = ("\repochs: 0%" "\n" "\repoch 1: 0%" "\x1b[A" "\n" "\repoch 1: 50%" "\x1b[A" "\n" "\r          \r"
            "\x1b[A" "\repochs: 100%" "\n")
    assert collapse(bars) == "epochs: 100%\n"
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="\rbar 1"),
                    nbformat.v4.new_output("stream", name="stderr", text="\rbar 2\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="result\n\nkept blank line\n")]
    nb.cells = [cell]
    out = coalesce(nb).cells[0].outputs
    assert [o.text for o in out] == ["bar 2\n", "result\n\nkept blank line\n"]


def test_the_notebooks_train_step_is_the_modules():
    """The step the notebook defines on the page (and passes to ``uh.train``) trains exactly as ``uh.train_step``,
    the module's default: the same losses and weights after three steps from the same start."""
    import torch

    sys.path.insert(0, str(ROOT))
    import unet_helpers as uh

    nb = json.loads((ROOT / "liver_segmentation.ipynb").read_text())
    source = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
                  and "".join(c["source"]).startswith("def train_step("))
    scope = {"uh": uh, "torch": torch}
    exec(source, scope)  # noqa: S102 - the notebook's own cell
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (4, 16, 16), generator=torch.Generator().manual_seed(1))
    weights, losses = [], []
    for step in (scope["train_step"], uh.train_step):
        torch.manual_seed(0)
        state = uh.make_train_state(uh.UNet(1, 3, 4, 2), uh.TrainConfig(epochs=1, lr=1e-2), 3, torch.device("cpu"))
        losses.append([step(state, x, y)[0].item() for _ in range(3)])
        weights.append([p.detach().clone() for p in state.model.parameters()])
    assert losses[0] == losses[1] and losses[0][2] != losses[0][0]  # equal, and the steps changed the network
    assert all(torch.equal(a, b) for a, b in zip(*weights))
