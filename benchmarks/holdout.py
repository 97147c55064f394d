"""Patient-grouped cross-validation of the three commands (preprocess, train, infer), as the targets are judged:
train on some patients, segment patients it never saw (not even for validation), score them.

    python benchmarks/holdout.py ../shared/data/lgg/kaggle_3m --folds 3 --fold 0 --prep-args "--channel 1" \\
        --train-args "--time-limit 20m --device cpu" --work WORK

For fold K of N (the patients dealt as train.py --folds deals them, ``cases.deal_folds``: each held out once):
a raw folder of the other patients' folders (links to their files), ``preprocess.py`` on it, ``train.py``, then
``infer.py`` on the held-out patients' images as a user would give them: with the output folder as it is (what
infer.py uses by default: ``model.pt``, or the ensemble of the folds (``--folds`` in the training options) or of
a seed ensemble's members, with the test-time flips and postprocessing train.py decided on validation), with the
networks alone (``--no-tta --no-postprocess``), and with flips forced on (``--tta``), to show what each step
changes. Each held-out patient
is scored by its Dice over all its slices pooled (the LGG literature's figure; one case = one patient for volumes),
and by how many of its slices without tumour got a false positive. Prints one line per patient and the mean;
``--json`` writes them. ``--redecide`` keeps an earlier run's network and decides its flips and postprocessing
again with the current code before segmenting (what a change to the decision alone does). Not a test:
tests/test_benchmarks.py only smoke-runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dice import dice_binary  # noqa: E402
from imaging.cases import Case, deal_folds, find_cases, load_manifest, read_case  # noqa: E402
from imaging.readers import mask_suffix, read_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# infer.py runs scored, each on the output folder: as train.py left it (its decisions), the networks alone, flips forced
PASSES = ((), ("--no-tta", "--no-postprocess"), ("--tta",))


def patients(raw: Path) -> list[Path]:
    """The folders right below ``raw`` that hold its labelled cases (a patient's slices, a case folder)."""
    labelled, _ = find_cases(raw)
    parts = [c.image.relative_to(raw).parts for c in labelled]
    return sorted({raw / p[0] for p in parts if len(p) > 1})


def run(script: str, *args: str) -> float:
    """One of the three commands, as a user runs it; its seconds. A failure stops the benchmark."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def score_patient(cases: list[Case], masks: Path) -> dict:
    """Dice over the patient's cases pooled, and false positives on its cases without foreground."""
    pred, truth, empty, false_pos = [], [], 0, 0
    for case in cases:
        true = read_case(case)["label"][0].numpy() > 0
        mask = read_volume(masks / f"{case.name}_mask{mask_suffix(case.image)}")[0].numpy() > 0
        pred.append(mask.ravel())
        truth.append(true.ravel())
        if not true.any():
            empty += 1
            false_pos += bool(mask.any())
    p, t = np.concatenate(pred), np.concatenate(truth)
    return {"dice": float(dice_binary(p[None, None], t[None, None])), "cases": len(cases), "empty": empty,
            "false_positive": false_pos}


def redecide(work: Path) -> float:
    """Decide test-time flips and postprocessing again, with this code, for the network an earlier run left in
    ``work/output/model.pt`` (one model, not ``--folds``), on its own validation cases; its seconds."""
    import torch

    from evaluation.crossval import Deciding, decide_run
    from model import load_checkpoint
    from training.planning import split_items

    t0, out, cpu = time.perf_counter(), work / "output", torch.device("cpu")
    config = load_checkpoint(out / "model.pt")["config"]
    manifest = load_manifest(work / "prep")
    train_items, val_items = split_items(manifest, work / "prep")
    regions = {name: labels for name, labels in config.get("regions") or []}
    decide_run(out, manifest, train_items, val_items, Deciding.as_inferred(cpu, config.get("amp"), regions))
    return time.perf_counter() - t0


def fold(args: argparse.Namespace) -> dict:
    """Prepare, train and segment one fold; returns per-patient scores of each pass (``PASSES``) and the commands'
    seconds."""
    folders = patients(Path(args.raw))
    fold_of = deal_folds({f.name: f.name for f in folders}, args.folds, args.seed)
    held = [f for f in folders if fold_of[f.name] == args.fold]
    work = Path(args.work) / f"fold_{args.fold}"
    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if folder not in held and not (raw / folder.name).exists():
            # Real folders of links to the files: the case finder does not descend into linked folders
            # (PH2's images lie two levels down).
            shutil.copytree(folder.resolve(), raw / folder.name, copy_function=os.symlink)
    if args.redecide:
        seconds = {"redecide": redecide(work)}
    else:
        seconds = {"preprocess": run("preprocess.py", str(raw), str(work / "prep"), *shlex.split(args.prep_args)),
                   "train": run("train.py", "--data", str(work / "prep"), "--output", str(work / "output"),
                                *shlex.split(args.train_args))}
    result: dict = {"fold": args.fold, "folds": args.folds, "seconds": seconds}
    for extra in PASSES:
        key = " ".join(["output", *extra])
        masks = work / f"masks{''.join(extra).replace('--', '_')}"
        seconds[f"infer_{key}"] = run("infer.py", *map(str, held), "--checkpoint", str(work / "output"),
                                      "--out", str(masks), "--overwrite", *extra)
        scores = {folder.name: score_patient(find_cases(folder)[0], masks) for folder in held}
        mean = float(np.mean([s["dice"] for s in scores.values()]))
        for name, s in scores.items():
            print(f"{key} {name}: Dice {s['dice']:.4f} over {s['cases']} cases; false positives on "
                  f"{s['false_positive']} of {s['empty']} without foreground")
        print(f"{key}: fold {args.fold} of {args.folds}: mean per-patient Dice {mean:.4f} over "
              f"{len(scores)} held-out patients")
        result[key] = {"mean_dice": mean, "patients": scores}
    print(f"seconds {json.dumps({k: round(v, 1) for k, v in seconds.items()})}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", help="a dataset root of patient (or case) folders")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of the patients' order (cases.group_order, as --folds deals a manifest's groups)")
    p.add_argument("--work", default="/tmp/holdout", help="where each fold's links, prepared data and output go")
    p.add_argument("--prep-args", default="", help="preprocess.py's options, as one string")
    p.add_argument("--train-args", default="--time-limit 20m --device cpu", help="train.py's options, one string")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--redecide", action="store_true", help="no preparing or training: decide flips and "
                   "postprocessing again with this code for the network an earlier run left in the fold's output")
    args = p.parse_args(argv)
    result = fold(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
