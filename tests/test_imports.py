"""The layout's import rules: the top level holds the commands and the design card's modules; no script imports
another script (nor does any support module or benchmark); readers and options sit at the bottom; a network is built,
loaded and run without the readers (SimpleITK, Pillow) or the transform chain."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

SCRIPTS = {"preprocess", "train", "infer", "serve"}
TOP_LEVEL = SCRIPTS | {"dataset", "model", "dice"}  # the design card's modules
PACKAGES = {"imaging", "evaluation", "inference", "training"}


def imported_modules(path, dotted: bool = False) -> set[str]:
    """Every module ``path`` imports, at any depth of its code: top-level names, or with ``dotted`` the full ones."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names if dotted else {n.split(".")[0] for n in names}


def support_files() -> list:
    return sorted(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))


def test_the_top_level_holds_the_scripts_and_the_design_cards_modules():
    """Support code lives in a package named for what it does; the top level shows the commands."""
    assert {p.stem for p in ROOT.glob("*.py")} == TOP_LEVEL
    assert {p.parent.name for p in ROOT.glob("*/__init__.py")} == PACKAGES


def test_no_script_imports_another_script():
    found = {name: sorted(imported_modules(ROOT / f"{name}.py") & (SCRIPTS - {name})) for name in sorted(SCRIPTS)}
    assert found == {name: [] for name in sorted(SCRIPTS)}
    for path in [ROOT / f"{name}.py" for name in TOP_LEVEL - SCRIPTS] + support_files():
        assert not imported_modules(path) & SCRIPTS, path


def test_support_code_and_benchmarks_import_no_script():
    assert len(support_files()) >= 15
    # serve_screenshot drives serve.py's app in a thread: the browser test's server
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        allowed = {"serve"} if path.stem == "serve_screenshot" else set()
        assert not (imported_modules(path) & SCRIPTS) - allowed, path


def test_readers_and_options_are_the_bottom_layer():
    """``imaging.common`` (the error type, options, atomic writes) imports nothing of the project;
    ``imaging.readers`` only ``imaging.common``; the rest of ``imaging`` nothing above it; ``training`` is imported by
    train.py alone among the project's code (benchmarks may time its parts)."""
    ours = TOP_LEVEL | PACKAGES
    imaging = ROOT / "imaging"
    assert not imported_modules(imaging / "common.py") & ours
    below = {m for m in imported_modules(imaging / "readers.py", dotted=True) if m.split(".")[0] in ours}
    assert below and all(m.startswith("imaging.common") for m in below), below
    for path in imaging.glob("*.py"):
        assert imported_modules(path) & ours <= {"imaging"}, path
    users = {p.stem for p in ROOT.glob("*.py") if "training" in imported_modules(p)}
    users |= {p.parent.name for p in support_files() if "training" in imported_modules(p)}
    assert users == {"train", "training"}


def test_the_rule_is_checked_on_real_imports(tmp_path):
    """The checker sees an import inside a function too (a script importing another lazily is still an import)."""
    script = tmp_path / "infer.py"
    script.write_text(encoding="utf-8", data="def f():\n    from train import plan\n    import preprocess.x\n")
    assert imported_modules(script) == {"train", "preprocess"}


def test_model_needs_neither_readers_nor_pillow():
    """With SimpleITK and Pillow made unimportable, ``model`` still builds a network, writes and loads a checkpoint
    and predicts; a plain ``import model`` loads none of the project's readers or chains. (Pillow itself arrives
    with any ``import monai``, through MONAI's optional readers, so it is blocked here rather than looked for.)"""
    code = """
import sys, tempfile, pathlib
sys.modules["SimpleITK"] = None  # importing them now raises ImportError
sys.modules["PIL"] = None
import torch, model
ours = ("imaging.readers", "dataset", "imaging.cases", "preprocess", "infer", "train")
loaded = [m for m in ours if sys.modules.get(m)]
assert not loaded, loaded
args = model.model_args(channels=[4, 8], strides=[2])
net = model.build_model(args)
path = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
model.save_checkpoint({"model_state": net.state_dict(), "model_args": args, "prep_params": {}, "label_values": [0, 1],
                       "inference": {"window": [4, 8, 8], "overlap": 0.5}, "epoch": 1, "best_dice": 0.5}, path)
ckpt = model.load_checkpoint(path)
loaded = model.model_from_checkpoint(ckpt, path).eval()
logits = model.predict_logits(loaded, torch.randn(1, 1, 4, 12, 12), model.Sliding((4, 8, 8), 0.5))
print(tuple(logits.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 1, 4, 12, 12)"
