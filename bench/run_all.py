"""Run the benchmarks and rewrite their tables in BENCHMARKS.md.

    python bench/run_all.py --quick   # speed benchmarks, small sizes: about 5 minutes on 2 CPU cores
    python bench/run_all.py           # full sizes (10 volumes of 512×512×100, full-preset inference)

The GPU benchmark (bench/bench_gpu.py) runs only where CUDA is available. The studies (tumour_study.py,
real_liver.py, lits_conventions.py) run on their own: see their docstrings and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import bench_infer
import bench_preprocess
import bench_train
import torch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    cmd = "python bench/run_all.py" + (" --quick" if a.quick else "")
    t0 = time.perf_counter()
    print("preprocess:", bench_preprocess.run(n=4 if a.quick else 10, repeats=3, command=cmd))
    print("train:", bench_train.run(steps=10 if a.quick else 20, repeats=3, command=cmd))
    print("infer:", bench_infer.run(repeats=3, presets=("quick",) if a.quick else ("quick", "full"), command=cmd))
    if torch.cuda.is_available():
        import bench_gpu
        print("gpu:", bench_gpu.run(write=True))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
