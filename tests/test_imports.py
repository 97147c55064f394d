"""The layout's import rules: no script imports another script (nor does any support module or benchmark); readers and
options sit at the bottom; a network is built, loaded and run without the readers (SimpleITK, Pillow) or the transform
chain."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import ROOT

SCRIPTS = {"preprocess", "train", "infer", "serve"}


def imported_modules(path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script():
    scripts = [ROOT / f"{name}.py" for name in sorted(SCRIPTS) if (ROOT / f"{name}.py").exists()]
    assert len(scripts) >= 3
    found = {p.stem: sorted(imported_modules(p) & (SCRIPTS - {p.stem})) for p in scripts}
    assert found == {p.stem: [] for p in scripts}
    # the library modules import no script either
    for path in ROOT.glob("*.py"):
        if path.stem not in SCRIPTS:
            assert not imported_modules(path) & SCRIPTS, path.name


def project_modules() -> set[str]:
    """Top-level names of the project's own modules and packages."""
    return {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}


def test_support_code_and_benchmarks_import_no_script():
    support = sorted((ROOT / "training").glob("*.py"))
    assert len(support) >= 5
    for path in support:
        assert not imported_modules(path) & SCRIPTS, path
    # serve_screenshot drives serve.py's app in a thread: the browser test's server
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        allowed = {"serve"} if path.stem == "serve_screenshot" else set()
        assert not (imported_modules(path) & SCRIPTS) - allowed, path


def test_readers_and_options_are_the_bottom_layer():
    """``common`` (the error type, options, atomic writes) imports nothing of the project; ``readers`` only
    ``common``; ``training`` is imported by train.py and benchmarks alone."""
    ours = project_modules()
    assert not imported_modules(ROOT / "common.py") & ours
    assert imported_modules(ROOT / "readers.py") & ours == {"common"}
    users = {p.stem for p in ROOT.glob("*.py") if "training" in imported_modules(p)}
    assert users == {"train"}


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
loaded = [m for m in ("readers", "dataset", "cases", "preprocess", "infer", "train") if sys.modules.get(m)]
assert not loaded, loaded
args = model.model_args(channels=[4, 8], strides=[2])
net = model.build_model(args)
path = pathlib.Path(tempfile.mkdtemp()) / "c.pt"
model.save_checkpoint({"model_state": net.state_dict(), "model_args": args, "prep_params": {}, "label_values": [0, 1],
                       "inference": {"roi": [4, 8, 8], "overlap": 0.5}, "epoch": 1, "best_dice": 0.5}, path)
ckpt = model.load_checkpoint(path)
loaded = model.model_from_checkpoint(ckpt, path).eval()
logits = model.predict_logits(loaded, torch.randn(1, 1, 4, 12, 12), (4, 8, 8), 0.5)
print(tuple(logits.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 1, 4, 12, 12)"
