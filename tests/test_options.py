"""One name per concept across the commands: the spellings that once meant something else in another command
(``--roi`` crop or window, ``--channels`` widths or modalities, ``--window`` sliding or HU window, ``--labels``
truth or allowed values) are refused where they would mean the other thing."""

from __future__ import annotations

import pytest
from conftest import one_error_line

import infer
import preprocess
import train

# (script, arguments with a spelling that means something else elsewhere)
REFUSED = [(train, ["--roi", "8", "32", "48"]), (train, ["--channels", "4", "8", "16"]),
           (infer, ["a.nii.gz", "--roi", "8", "32", "48"]), (infer, ["a.nii.gz", "--labels", "a_seg.nii.gz"]),
           (preprocess, ["raw", "prep", "--window", "-100", "300"]),
           (preprocess, ["raw", "prep", "--channels", "Flair,T1c"])]


@pytest.mark.parametrize("script, argv", REFUSED, ids=lambda v: getattr(v, "__name__", None) or " ".join(v[-2:]))
def test_a_spelling_with_another_meaning_elsewhere_is_refused(script, argv, capsys):
    assert script.main(argv) == 2
    assert "unrecognized arguments" in one_error_line(capsys)


def test_the_one_spelling_of_each_concept():
    got = train.parse_args(["--crop", "8", "32", "48", "--widths", "4", "8", "16", "--window", "8", "64", "64"])
    assert got.crop == (8, 32, 48) and got.widths == (4, 8, 16) and tuple(got.window) == (8, 64, 64)
    got = infer.parse_args(["a.nii.gz", "--window", "8", "32", "48", "--truth", "a_seg.nii.gz"])
    assert got.window == [8, 32, 48] and got.truth == ["a_seg.nii.gz"]
    got = preprocess.parse_args(["raw", "prep", "--ct-window", "-100", "300", "--modalities", "Flair,T1c",
                                 "--labels", "0", "1"])
    assert got.ct_window == [-100.0, 300.0] and got.modalities == ["Flair", "T1c"] and got.labels == [0, 1]
