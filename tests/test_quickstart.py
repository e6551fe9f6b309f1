"""examples/quickstart.py: RL fine-tuning visibly improves the MLE model on the toy task."""

from __future__ import annotations

import importlib.util

from conftest import ROOT, run_in_process


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_mle_stays_below_the_ceiling_and_rl_adds_two_bleu(tmp_path, capsys):
    # the quickstart's own commands, run in this process (one thread) instead of four new Pythons
    scores = load_quickstart().quickstart(tmp_path, seed=1, runner=run_in_process)
    assert scores["mle"] < 90.0 and scores["rl"] - scores["mle"] >= 2.0, scores
    printed = capsys.readouterr().out
    assert "MLE + RL" in printed and "  source     " in printed and "  reference  " in printed
