"""Inference speed: a plain MONAI sliding-window call against infer.py's path, same checkpoint and volumes.

    python benchmarks/bench_infer.py --prep data/prep --checkpoint output/best.pt [--split val] [--repeats 3]

(a) plain: ``monai.inferers.sliding_window_inference`` with the seed project's settings (the training crop as
    roi, (48, 96, 96) there; 75% overlap, gaussian, sw_batch_size 4), fp32, under ``torch.no_grad``;
(b) ours: ``infer.predict_logits`` as ``infer.py`` runs it (the checkpoint's inference window, shrunk to a
    smaller volume for batch norm, windows without tissue skipped, channels-last, the device's windows per
    pass, ``inference_mode``, AMP on CUDA).

Both start from the same prepared volume and end with a mask on the original grid (the same inversion), scored
against the true mask. Runs alternate (a, b, a, b …) so that machine load hits both alike. Prints per case and
overall: seconds (median of the repeats), the ratio, each Dice against the truth, the Dice between the masks.
Not a test: nothing here asserts; tests/test_fast_inference.py only smoke-runs it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import synchronize  # noqa: E402  (this folder)

from dataset import PrepParams, as_label_map, prepare_transforms, prepared_tissue, read_channels, read_volume  # noqa: E402
from dice import dice_binary  # noqa: E402
from infer import (  # noqa: E402
    cases_from_manifest,
    invert_to_original,
    predict_logits,
    probabilities,
    resolve_device,
    to_classes,
)
from model import load_checkpoint, model_from_checkpoint  # noqa: E402


def plain_logits(model: torch.nn.Module, image: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
    """The seed project's call: (1, C, D, H, W) → logits (1, K, D, H, W)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return sliding_window_inference(image.to(device), roi, 4, model, overlap=0.75, mode="gaussian")


def to_mask(logits: torch.Tensor, prepared, chain) -> np.ndarray:
    """Class indices on the input's grid (X, Y, Z)."""
    probs = probabilities(logits.float())[0]
    return to_classes(invert_to_original(probs.cpu(), prepared, chain)[None])[0, 0].numpy()


def foreground_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of the foreground (every label but 0) of two masks."""
    return float(dice_binary((a > 0)[None, None], (b > 0)[None, None]))


def bench(args: argparse.Namespace) -> dict:
    """Run the comparison; returns the summary printed at the end."""
    device = resolve_device(args.device)
    ckpt = load_checkpoint(Path(args.checkpoint))
    plain = model_from_checkpoint(ckpt, Path(args.checkpoint)).to(device).eval()
    ours = model_from_checkpoint(ckpt, Path(args.checkpoint)).to(device, memory_format=torch.channels_last_3d)
    ours.eval()
    params = PrepParams.from_dict(ckpt["prep_params"])
    window = tuple(args.window or ckpt["inference"]["roi"])
    plain_roi = tuple(args.plain_roi or ckpt["config"]["roi"])
    amp = device.type == "cuda"
    cases = [c for c in cases_from_manifest(Path(args.prep), args.split) if c.truth and not c.slices]
    cases = cases[: args.cases] if args.cases else cases
    if not cases:
        raise SystemExit(f"{args.prep}: no labelled {args.split} cases")
    rows = []
    print(f"device {device}; plain roi {plain_roi}, ours window {window} (a batch-norm one shrunk to smaller volumes); "
          f"{args.repeats} interleaved repeats per case")
    for case in cases:
        raw = read_channels(case.sources, params.channel)
        truth = as_label_map(read_volume(case.truth), case.truth)[0].numpy()
        chain = prepare_transforms(params, with_label=False)
        prepared = chain({"image": raw})["image"]
        times: dict[str, list[float]] = {"plain": [], "ours": []}
        logits: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name in ("plain", "ours"):
                synchronize(device)
                t0 = time.perf_counter()
                if name == "plain":
                    out = plain_logits(plain, prepared[None], plain_roi)
                else:
                    tissue = prepared_tissue(prepared, params)[None]
                    out = predict_logits(ours, prepared[None], window, 0.75, args.sw_batch_size, amp, tissue)
                synchronize(device)
                times[name].append(time.perf_counter() - t0)
                logits[name] = out
        masks = {name: to_mask(logits[name], prepared, chain) for name in logits}
        values = np.asarray(ckpt["label_values"])
        truth_classes = np.searchsorted(values, truth)
        row = {"case": case.name, "shape": list(prepared.shape[1:]),
               "plain_s": statistics.median(times["plain"]), "ours_s": statistics.median(times["ours"]),
               "plain_dice": foreground_dice(masks["plain"], truth_classes),
               "ours_dice": foreground_dice(masks["ours"], truth_classes),
               "agreement": foreground_dice(masks["plain"], masks["ours"])}
        rows.append(row)
        print(f"{row['case']:>24} {row['shape']}: plain {row['plain_s']:.2f} s, ours {row['ours_s']:.2f} s "
              f"({row['plain_s'] / row['ours_s']:.1f}×); Dice vs truth plain {row['plain_dice']:.4f}, ours "
              f"{row['ours_dice']:.4f}; masks agree {row['agreement']:.4f}")
    summary = {
        "cases": len(rows),
        "plain_s": sum(r["plain_s"] for r in rows), "ours_s": sum(r["ours_s"] for r in rows),
        "plain_dice": float(np.mean([r["plain_dice"] for r in rows])),
        "ours_dice": float(np.mean([r["ours_dice"] for r in rows])),
        "agreement": float(np.mean([r["agreement"] for r in rows])),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    summary["speedup"] = summary["plain_s"] / summary["ours_s"]
    print(f"total over {summary['cases']} cases: plain {summary['plain_s']:.2f} s, ours {summary['ours_s']:.2f} s, "
          f"{summary['speedup']:.1f}× faster; mean Dice vs truth plain {summary['plain_dice']:.4f}, ours "
          f"{summary['ours_dice']:.4f} (difference {summary['ours_dice'] - summary['plain_dice']:+.4f}); masks "
          f"agree {summary['agreement']:.4f}; peak RSS {summary['peak_rss_mb']:.0f} MB")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prep", default="data/prep", help="prepared dataset (its manifest names the original files)")
    p.add_argument("--checkpoint", default="output/best.pt")
    p.add_argument("--split", default="val")
    p.add_argument("--cases", type=int, default=None, help="at most this many cases")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--window", type=int, nargs=3, default=None, help="our window (default: the checkpoint's)")
    p.add_argument("--plain-roi", type=int, nargs=3, default=None,
                   help="plain call's window (default: the training crop, (48, 96, 96) in the seed project)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="ours (default: infer.py's for the device)")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    summary = bench(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
