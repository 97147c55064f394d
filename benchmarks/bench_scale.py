"""Cost per case as a dataset grows: N synthetic BraTS-size cases (4 channels as a 4-D NIfTI, labels 0-3) in the
MSD layout, prepared, trained and segmented with the three commands as a user runs them.

    python benchmarks/bench_scale.py --cases 10 40 --cache-memory 1G --time-limit 3m --work WORK [--json F]

For each N: ``preprocess.py`` (seconds per case, peak resident memory), ``train.py --time-limit`` twice into fresh
output folders with the given ``--cache-memory`` (the second reads the disk cache the first wrote: the set-up
seconds of each, the probe's seconds per step, the peak resident memory against the budget), then once more for
each ``--ratios`` R with ``--cache-memory`` at 1/R of the cached volumes' size (without the post-training decision:
seconds per step and peak memory with all in memory, half, a quarter), and ``infer.py`` on
``imagesTs/`` (seconds per case). Each command is its own process, its peak memory read from the kernel when it
ends (the main process's: loader workers, where the plan starts any, are not counted). The prepared data's size
is printed beside the budget: where it is larger, training reads from disk. Not a
test: nothing here asserts; tests/test_benchmarks.py smoke-runs it on tiny volumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.data import cached_bytes  # noqa: E402

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


def write_case(path_image: Path, path_label: Path | None, shape: tuple[int, int, int], seed: int) -> None:
    """One case: a head-like ellipsoid with a three-part tumour, each of 4 channels weighting the parts differently."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    head = sum(g**2 for g in grid) < 0.8
    centre = rng.uniform(-0.3, 0.3, size=3)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    size = rng.uniform(0.12, 0.25)
    label = np.select([r < 0.4 * size, r < 0.7 * size, r < size], [3, 2, 1], 0).astype(np.uint8) * head
    channels = [head * (400 + 150 * k) + 120 * (label == (k % 3) + 1) * (k + 1) for k in range(4)]
    image = np.stack(channels, -1).astype(np.float32) + rng.normal(0, 20, (*shape, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), path_image)
    if path_label is not None:
        nib.save(nib.Nifti1Image(label, AFFINE), path_label)


def write_dataset(root: Path, n: int, shape: tuple[int, int, int], n_test: int = 2) -> Path:
    """``root/imagesTr|labelsTr|imagesTs`` and ``dataset.json`` as the Decathlon ships BrainTumour (reused when
    already written)."""
    if (root / "dataset.json").is_file():
        return root
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k in range(n + n_test):
        name = f"BRATS_{k:03d}.nii.gz"
        if k < n:
            write_case(root / "imagesTr" / name, root / "labelsTr" / name, shape, k)
        else:
            write_case(root / "imagesTs" / name, None, shape, k)
    info = {"name": "synthetic BrainTumour", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": LABELS}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def run(script: str, *args: str) -> dict:
    """One command as a user runs it: its seconds, peak resident memory (MB, from the kernel at exit) and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "log": err}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def cached_mb(prep: Path) -> float:
    """What train.py's cache holds of this prepared data with its defaults: every training volume, and the
    validation volumes once more (they train too, and are cached in each chain)."""
    manifest = json.loads((prep / "dataset.json").read_text())
    cases = [c for c in manifest["cases"] if c.get("split") in ("train", "val")]
    cases += [c for c in cases if c["split"] == "val"]
    return cached_bytes(cases, int(manifest.get("in_channels", 1))) / 2**20


def step_seconds(out: Path, prep: Path, log: str) -> float | None:
    """Median seconds per training step of the run in ``out``: its epochs without a validation, or where every
    epoch validated, the training time of the one its log names ("validation: V s against E s an epoch"), over the
    steps an epoch takes (its training volumes, validation's too by default, over the batch)."""
    plan = json.loads((out / "plan.json").read_text())
    manifest = json.loads((prep / "dataset.json").read_text())
    cases = sum(c.get("split") in ("train", "val") for c in manifest["cases"])
    steps = math.ceil(cases / plan["settings"]["batch_size"])
    with (out / "metrics.csv").open() as f:
        epochs = sorted(float(r["seconds"]) for r in csv.DictReader(f) if not r["val_dice"])
    if not epochs:
        epochs = [float(e) for e in re.findall(r"validation: [\d.]+ s against ([\d.]+) s an epoch", log)]
    return round(epochs[len(epochs) // 2] / steps, 3) if epochs else None


def scale(n: int, args: argparse.Namespace) -> dict:
    work = Path(args.work) / f"n{n}"
    raw = write_dataset(work / "raw", n, tuple(args.shape))
    prep = work / "prep"
    row: dict = {"cases": n}
    if not (prep / "dataset.json").is_file():
        done = run("preprocess.py", str(raw), str(prep), "--workers", str(args.workers))
        row["preprocess_s_per_case"] = round(done["seconds"] / n, 2)
        row["preprocess_peak_rss_mb"] = done["peak_rss_mb"]
    row["prepared_mb"] = round(folder_mb(prep) - (folder_mb(prep / ".cache") if (prep / ".cache").is_dir() else 0))
    for attempt in ("first", "second"):
        out = work / f"out_{attempt}"
        done = run("train.py", "--data", str(prep), "--output", str(out), "--overwrite", "--device", args.device,
                   "--time-limit", args.time_limit, "--cache-memory", args.cache_memory)
        cache = re.search(r"cache: .*\(filled in ([\d.]+) s\)", done["log"])
        probe = re.search(r'"probe_step_s": ([\d.]+)', done["log"])
        row[f"train_{attempt}"] = {"seconds": done["seconds"], "peak_rss_mb": done["peak_rss_mb"],
                                   "cache_fill_s": float(cache[1]) if cache else None,
                                   "probe_step_s": float(probe[1]) if probe else None,
                                   "from_disk": cache is not None}
    need = cached_mb(prep)
    row["cached_mb"] = round(need, 1)
    for ratio in args.ratios:  # the same data against budgets of 1/ratio of its cached size (1×: all of it fits)
        budget = math.ceil(need * 2**20 / ratio) + (2**20 if ratio <= 1 else 0)  # a margin where all must fit
        out = work / f"out_ratio{ratio:g}"
        done = run("train.py", "--data", str(prep), "--output", str(out), "--overwrite", "--device", args.device,
                   "--time-limit", args.time_limit, "--cache-memory", str(budget), "--no-postprocess")
        row[f"train_ratio{ratio:g}"] = {"cache_memory_mb": round(budget / 2**20), "peak_rss_mb": done["peak_rss_mb"],
                                       "step_s": step_seconds(out, prep, done["log"]),
                                       "from_disk": "(filled in" in done["log"]}
    masks = work / "masks"
    done = run("infer.py", str(raw / "imagesTs"), "--checkpoint", str(work / "out_second"), "--out", str(masks),
               "--overwrite", "--device", args.device)
    row["infer_s_per_case"] = round(done["seconds"] / len(list((raw / "imagesTs").iterdir())), 2)
    row["infer_peak_rss_mb"] = done["peak_rss_mb"]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, nargs="+", default=[10, 40, 160])
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155], help="each case's X Y Z")
    p.add_argument("--cache-memory", default="1G", help="train.py's --cache-memory")
    p.add_argument("--time-limit", default="3m", help="train.py's --time-limit")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=2, help="preprocess.py's --workers")
    p.add_argument("--work", required=True, help="where the data, prepared data and outputs go")
    p.add_argument("--ratios", type=float, nargs="*", default=[1, 2, 4],
                   help="also train (without the decision) with --cache-memory at 1/R of the cached size, for each R")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    rows = []
    for n in args.cases:
        rows.append(scale(n, args))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cache_memory": args.cache_memory, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
