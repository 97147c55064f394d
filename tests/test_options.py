"""Renamed options: each old spelling still works for one release as a hidden alias of the new one, and --help shows
only the new one."""

from __future__ import annotations

import re

import pytest

import infer
import preprocess
import train

# (script, old spelling, new spelling)
RENAMED = [(train, "--roi", "--crop"), (train, "--channels", "--widths"), (infer, "--roi", "--window"),
           (infer, "--labels", "--truth"), (preprocess, "--window", "--ct-window"),
           (preprocess, "--channels", "--modalities")]


def _help(script, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _shows(text: str, option: str) -> bool:
    """Whether ``text`` names ``option`` itself (``--window`` is not named by ``--ct-window``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("script, old, new", RENAMED, ids=lambda v: getattr(v, "__name__", v))
def test_help_shows_the_new_spelling_only(script, old, new, capsys):
    text = _help(script, capsys)
    assert _shows(text, new), text
    assert not _shows(text, old), text


def test_train_old_spellings():
    old = train.parse_args(["--roi", "8", "32", "48", "--channels", "4", "8", "16"])
    assert old.crop == (8, 32, 48) and old.widths == (4, 8, 16)
    assert old == train.parse_args(["--crop", "8", "32", "48", "--widths", "4", "8", "16"])
    assert old.crop != train.parse_args([]).crop  # not the default by chance


def test_infer_old_spellings():
    old = infer.parse_args(["a.nii.gz", "b.nii.gz", "--roi", "8", "32", "48", "--labels", "a_seg.nii.gz",
                            "b_seg.nii.gz"])
    assert old.window == [8, 32, 48] and old.truth == ["a_seg.nii.gz", "b_seg.nii.gz"]
    assert old.inputs == ["a.nii.gz", "b.nii.gz"]
    assert old == infer.parse_args(["a.nii.gz", "b.nii.gz", "--window", "8", "32", "48", "--truth", "a_seg.nii.gz",
                                    "b_seg.nii.gz"])


def test_preprocess_old_spellings():
    old = preprocess.parse_args(["raw", "prep", "--window", "-100", "300", "--channels", "Flair,T1c"])
    assert old.ct_window == [-100.0, 300.0] and old.modalities == ["Flair", "T1c"]
    assert old == preprocess.parse_args(["raw", "prep", "--ct-window", "-100", "300", "--modalities", "Flair,T1c"])
    assert old.ct_window != preprocess.parse_args(["raw", "prep"]).ct_window  # not the default by chance
