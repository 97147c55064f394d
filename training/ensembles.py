"""Runs of several networks: a seed ensemble (--members) and k-fold cross-validation (--folds), each network
trained by the train function given, then one decision on all of them."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluation.crossval import Deciding, Judged, assign_folds, decide_run, judge, report, write_decision
from imaging.cases import load_manifest
from imaging.common import InputError, write_json
from model import (
    resolve_device,
    write_models_record,
)
from training.clock import budget_share
from training.config import TrainConfig
from training.distributed import torchrun_rank, under_torchrun
from training.planning import plan_run, split_items

log = logging.getLogger("train")


def train_members(cfg: TrainConfig, train: Callable[[TrainConfig], dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """One network, or with ``--members N`` a seed ensemble: member K trained with seed ``seed + K`` on the same
    cases into ``OUTPUT/member_K/`` (sharing ``--time-limit`` equally among those left), then the flips and
    postprocessing decided on the members' averaged validation predictions, and ``ensemble.json`` (what infer.py
    takes from ``OUTPUT``). ``OUTPUT/plan.json`` is the whole run's plan (``--plan`` re-runs it)."""
    if cfg.members == 1:
        return {0: train(cfg)}
    if under_torchrun():
        raise InputError("--members under torchrun: one network per torchrun job (--seed to vary it)")
    start, device, out = time.perf_counter(), resolve_device(cfg.device), Path(cfg.output)
    run = plan_run(cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run.plan, out / "plan.json")
    log.info("a seed ensemble of %d networks, each in %s/member_K", cfg.members, out)
    results, checkpoints = {}, []
    for k in range(cfg.members):
        sub = out / f"member_{k}"
        results[k] = train(dataclasses.replace(run.cfg, seed=cfg.seed + k, output=str(sub),
                                               time_limit=budget_share(cfg.time_limit, start, cfg.members - k),
                                               resume=cfg.resume and (sub / "last.pt").is_file()))
        checkpoints.append(sub / "model.pt")
    record: dict[str, Any] = {}
    if cfg.postprocess:
        record = decide_run(out, run.manifest, run.train_items, run.val_items,
                            Deciding.as_inferred(device, cfg.amp, dict(cfg.regions)), checkpoints)
    write_json({"members": cfg.members, "seeds": [cfg.seed + k for k in range(cfg.members)],
                "checkpoints": [str(p.relative_to(out)) for p in checkpoints],
                "flips": record.get("flips", []), "rules": record.get("rules", [])}, out / "ensemble.json")
    write_models_record(out, checkpoints, "members")
    return results


def train_folds(cfg: TrainConfig, train: Callable[[TrainConfig], dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """k-fold cross-validation: fold ``cfg.fold`` (or every fold in turn, sharing ``--time-limit`` equally among
    those left) trained into ``OUTPUT/fold_K/``; once every fold holds a model, ``cross_validate``. The data's own
    train/validation folders, where it has them, win over folds: one run on them."""
    manifest = load_manifest(Path(cfg.data))
    if manifest.get("split", {}).get("from_folders"):
        log.warning("%s: the data comes with its own train/validation split (folders), which wins over --folds",
                    cfg.data)
        return {0: train(dataclasses.replace(cfg, folds=0, fold=None))}
    assign_folds(manifest, cfg.folds, cfg.seed)  # refuses an impossible fold count before any work
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise InputError(f"--fold {cfg.fold}: folds are numbered 0 to {cfg.folds - 1}")
    todo = list(range(cfg.folds)) if cfg.fold is None else [cfg.fold]
    if len(todo) > 1 and under_torchrun():  # known before the job is joined, unlike distributed()
        raise InputError("--fold all under torchrun: start one torchrun job per fold (--fold K)")
    start, results = time.perf_counter(), {}
    for i, k in enumerate(todo):
        out = Path(cfg.output) / f"fold_{k}"
        limit = budget_share(cfg.time_limit, start, len(todo) - i)
        results[k] = train(dataclasses.replace(cfg, fold=k, output=str(out), time_limit=limit,
                                               resume=cfg.resume and (out / "last.pt").is_file()))
    if torchrun_rank() == 0:  # each train() has left its job by now: the rank is the environment's
        cross_validate(cfg)
    return results


def cross_validate(cfg: TrainConfig) -> dict | None:
    """When every fold of ``OUTPUT`` holds its ``model.pt``: each predicts its validation cases, the flips and
    postprocessing are decided on all of them pooled and written into every fold's checkpoint; ``cv.csv``,
    ``cv.png``, ``postprocessing.json`` and ``cv.json`` (the folds that make the ensemble infer.py uses)."""
    out_dir, data_dir = Path(cfg.output), Path(cfg.data)
    checkpoints = [out_dir / f"fold_{k}" / "model.pt" for k in range(cfg.folds)]
    missing = [str(p) for p in checkpoints if not p.is_file()]
    if missing:
        log.info("cross-validation report when every fold is trained; missing %s", ", ".join(missing))
        return None
    manifest = load_manifest(data_dir)
    fold_of = assign_folds(manifest, cfg.folds, cfg.seed)
    train_items, val_items = split_items(manifest, data_dir, cfg.folds, 0, cfg.seed)
    items = train_items + val_items
    judged = [Judged((p,), [i for i in items if fold_of[i["name"]] == k], k) for k, p in enumerate(checkpoints)]
    how = Deciding.as_inferred(resolve_device(cfg.device), cfg.amp, dict(cfg.regions), cfg.postprocess)
    record = judge(judged, manifest, items, how, out_dir)
    write_decision(record, checkpoints, out_dir)
    write_json({"folds": cfg.folds, "seed": cfg.seed, "checkpoints": [str(p.relative_to(out_dir)) for p in checkpoints],
                "flips": record["flips"], "rules": record["rules"]}, out_dir / "cv.json")
    write_models_record(out_dir, checkpoints, "folds")
    report(record, out_dir)
    return record
