"""torchrun: two CPU processes (gloo) train as one data-parallel job; rank 0 alone writes outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ROOT, TINY_NET

import train
from model import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], outputs: list[str], results: str) -> None:
    """One rank, set up as torchrun would (environment variables), with its own output folder so that the test
    can see which ranks wrote."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two processes on two cores
    result = train.train(train.parse_args([*argv, "--output", outputs[rank]]))
    torch.save({"state": result["model"].state_dict(), "cases": result["train_cases"],
                "best_dice": result["best_dice"]}, Path(results) / f"rank{rank}.pt")


def test_two_ranks_train_one_model_and_rank_0_writes(prep_dir, tmp_path):
    argv = ["--data", str(prep_dir), "--epochs", "2", *TINY_NET, "--norm", "batch"]
    outputs = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    mp.spawn(_rank, args=(2, _free_port(), argv, outputs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Each rank trained on its own share of the four cases: three training, one validation that trains too.
    manifest = json.loads((prep_dir / "dataset.json").read_text())
    train_names = {c["name"] for c in manifest["cases"] if c["split"] in ("train", "val")}
    assert [len(r["cases"]) for r in ranks] == [2, 2]
    assert set(ranks[0]["cases"]) | set(ranks[1]["cases"]) == train_names
    # Gradients were averaged and batch-norm statistics shared: one model, bit for bit.
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert any("running_mean" in k for k in ranks[0]["state"])
    # The validation Dice was reduced across ranks (rank 1 holds no validation case, yet agrees).
    assert ranks[0]["best_dice"] == ranks[1]["best_dice"]

    # Rank 0 wrote what a single-process run writes, with the same shapes; rank 1 wrote nothing.
    assert not Path(outputs[1]).exists()
    assert train.main([*argv, "--output", str(tmp_path / "single")]) == 0
    ddp, single = load_checkpoint(Path(outputs[0]) / "last.pt"), load_checkpoint(tmp_path / "single" / "last.pt")
    assert ddp["epoch"] == single["epoch"] == 2 and ddp["inference"] == single["inference"]
    assert {k: v.shape for k, v in ddp["model_state"].items()} == {k: v.shape for k, v in single["model_state"].items()}
    for key, value in ddp["model_state"].items():
        assert torch.equal(value, ranks[0]["state"][key]), key
    assert (Path(outputs[0]) / "metrics.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("ranks", [2, 1])
def test_torchrun_runs_train_py_unchanged(prep_dir, tmp_path, ranks):
    """Two ranks, or one: a one-process job joins too, so that its collectives run as several ranks' do (on a GPU:
    NCCL, which benchmarks/gpu.sh checks with one GPU)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "train.py",
           "--data", str(prep_dir), "--output", str(out), "--epochs", "1", *TINY_NET]
    # A rank that aborts prints where (Python and C++ stacks), so that a failure here can be told apart.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert all(f"rank {k} of {ranks} (gloo)" in proc.stderr for k in range(ranks))
    assert load_checkpoint(out / "best.pt")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "dice.png", "last.pt", "metrics.csv", "model.pt",
                                                     "models.json", "plan.json", "postprocessing.json", "tensorboard"]


def test_every_collective_tensor_lives_where_the_backend_moves_tensors(monkeypatch):
    """NCCL moves CUDA tensors only (a CPU tensor in ``agreed`` failed at the end of the first epoch): the tensors
    the rank-agreement helpers make come from ``collective_device``, the GPU under NCCL and the CPU under gloo."""
    from training import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert distributed.collective_device() == torch.device("cpu")
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    # agreed() broadcasts a tensor made on that device (the meta device stands in for a GPU here)
    sent = []
    monkeypatch.setattr(distributed, "distributed", lambda: True)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(distributed.dist, "broadcast", lambda tensor, src: sent.append(tensor.device))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: [1.0])
    assert distributed.agreed(True) is True and sent == [torch.device("meta")]
