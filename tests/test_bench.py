"""The benchmark scripts import and run one tiny case each, so they cannot rot (no timing asserted)."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import bench_infer  # noqa: E402
import bench_preprocess  # noqa: E402
import bench_train  # noqa: E402
import common  # noqa: E402
import recipe_study  # noqa: E402


@pytest.fixture()
def work(tmp_path, monkeypatch):
    for mod in (bench_preprocess, bench_train, recipe_study):
        monkeypatch.setattr(mod, "WORK", tmp_path)
    return tmp_path


def test_write_table_replaces_only_its_block(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# B\n<!-- a:start -->\nold\n<!-- a:end -->\n<!-- b:start -->\nkeep\n<!-- b:end -->\n")
    common.write_table("a", common.md_table(["x"], [[1]]), md)
    common.write_table("c", "new block", md)
    text = md.read_text()
    assert "old" not in text and "| 1 |" in text and "keep" in text and "<!-- c:start -->\nnew block" in text


def test_tiny_preprocess_train_infer(work):
    pre = bench_preprocess.run(n=2, shape=(48, 48, 8), image_size=24, repeats=1, write=False)
    assert pre["naive_s"] > 0 and pre["ours_s"] > 0 and pre["cached_s"] > 0
    tr = bench_train.run(image_size=32, base=4, depth=2, steps=2, repeats=1, n_cases=2, write=False)
    assert tr["ours"]["flops_per_step"] == tr["plain"]["flops_per_step"] > 0
    assert 0 <= tr["ours"]["data_wait"] < 1 and tr["peak_flops"] > 0
    inf = bench_infer.run(shape=(32, 32, 4), repeats=1, write=False)
    assert set(inf["quick"]) == {"batch_1_s", "batch_4_s", "batch_8_s", "batch_32_s"}
    assert all(t > 0 for t in inf["quick"].values())


def test_tiny_recipe_study(work, tmp_path, monkeypatch):
    out = tmp_path / "study.json"
    args = ["--seeds", "0", "--arms", "baseline", "baseline + liver-box cascade", "--steps", "4", "--batch", "2",
            "--train-cases", "2", "--val-cases", "2", "--shape", "48", "48", "12", "--base", "4",
            "--results", str(out), "--no-write"]
    rows = recipe_study.main(args)
    arms = {r["arm"] for r in rows}
    assert arms == {"baseline", "baseline + post-processing", "baseline + liver-box cascade"}
    assert json.loads(out.read_text())[0]["steps"] == 4
    before = out.read_text()
    monkeypatch.setattr(recipe_study, "run_arm", lambda *a, **k: pytest.fail("re-ran a finished arm"))
    recipe_study.main(args)  # resumes: nothing re-run, nothing changed
    assert out.read_text() == before
    table = recipe_study.table(rows, "cmd", "setup")
    assert "baseline + liver-box cascade" in table and "tumour Dice (per case)" in table


def test_paired_comparison_of_arms():
    def row(arm, seed, tumour, liver):
        cases = [{"case": f"c{i}", "has_tumor": i < 3, "dice_tumor": t if i < 3 else None, "dice_liver": liver,
                  "fp_tumor_ml": 0.0} for i, t in enumerate(tumour + [None])]
        return {"arm": arm, "seed": seed, "per_case": cases}

    rows = [row("A", s, [0.5, 0.6, 0.7], 0.95) for s in (0, 1)] + [row("B", s, [0.4, 0.5, 0.6], 0.96)
                                                                   for s in (0, 1)]
    t = recipe_study.paired(rows, "A", "B")
    assert t["cases"] == 3 and t["seeds"] == 2 and t["a_better"] == 3 and t["b_better"] == 0
    assert abs(t["mean"] - 0.1) < 1e-9 and abs(t["low"] - 0.1) < 1e-9 and abs(t["high"] - 0.1) < 1e-9
    liver = recipe_study.paired(rows, "A", "B", "dice_liver")
    assert liver["cases"] == 4 and abs(liver["mean"] + 0.01) < 1e-9  # liver uses every case
    assert recipe_study.paired(rows, "A", "missing") is None
    table = recipe_study.paired_table(rows, [("A", "B")])
    assert "+0.100" in table and "3 / 0" in table
