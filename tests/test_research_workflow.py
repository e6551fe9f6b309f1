"""A researcher's first real workflow with documented names only: load a checkpoint, define a
source-aware text reward, fine-tune with it, save, resume with continue_train.py under the same reward,
and translate; and a reward that cannot be stored by name makes continue_train.py ask for one."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from conftest import run_main, with_handlers
from torch.utils.data import DataLoader

import simple_nmt
from simple_nmt import cli
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.data import ParallelDataset, collate, read_parallel
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import build_optimizer

REWARD_MODULE = '''
import sacrebleu
import torch

calls = []


def chrf_near_source_length(hyps, refs, src_text, hyp_text, ref_text, index):
    """chrF against the raw reference, minus 10 per unit of length ratio away from the source's."""
    calls.append(list(index.tolist()))
    chrf = [sacrebleu.sentence_chrf(h, [r]).score for h, r in zip(hyp_text, ref_text)]
    ratio = [len(h.split()) / max(len(s.split()), 1) for h, s in zip(hyp_text, src_text)]
    return torch.tensor([c - 10 * abs(q - 1) for c, q in zip(chrf, ratio)])
'''


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(REWARD_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("my_rewards")
    sys.modules.pop("my_rewards", None)


def fine_tune(loaded, toy_dir, model_fn, reward):
    """One RL epoch over 60 training pairs, from Python, with the handlers' checkpoints."""
    src, tgt, _ = read_parallel(str(toy_dir / "train"), "ende")
    train = ParallelDataset([loaded.src_field.to_ids(x) for x in src[:60]],
                            [loaded.tgt_field.to_ids(y) for y in tgt[:60]], max_length=30)
    v_src, v_tgt, _ = read_parallel(str(toy_dir / "valid"), "ende")
    valid = ParallelDataset([loaded.src_field.to_ids(x) for x in v_src], [loaded.tgt_field.to_ids(y) for y in v_tgt])
    config = loaded.config.replace(rl_n_samples=2, rl_lr=1e-4, verbose=0)
    model = loaded.model.train()
    engine = MinimumRiskTrainingEngine(model, build_optimizer(model, config, config.rl_lr), config,
                                       tgt_field=loaded.tgt_field, reward=reward, src_lines=src, tgt_lines=tgt)
    with_handlers(engine, config, (loaded.src_field, loaded.tgt_field), DataLoader(valid, batch_size=20,
                  collate_fn=collate), v_tgt, model_fn)
    engine.run(DataLoader(train, batch_size=20, collate_fn=collate), max_epochs=1)
    return engine, src


def test_load_fine_tune_with_a_source_aware_reward_resume_and_translate(tiny_checkpoint, toy_dir, tmp_path,
                                                                         reward_module):
    loaded = simple_nmt.load(tiny_checkpoint)
    engine, src = fine_tune(loaded, toy_dir, tmp_path / "rl.pth", reward_module.chrf_near_source_length)
    # the reward saw the examples' line numbers, each source's K + 1 samples together
    assert reward_module.calls[0][:3] == [reward_module.calls[0][0]] * 3
    assert sorted({i for call in reward_module.calls for i in call}) == list(range(60))
    stored = load_checkpoint(tmp_path / "rl.epoch1.pth")["meta"]["config"]
    assert stored["rl_reward"] == "my_rewards:chrf_near_source_length" and stored["phase"] == "rl"
    assert stored["rl_lr"] == pytest.approx(1e-4) and stored["optimizer"] == loaded.config.optimizer

    reward_module.calls.clear()
    run_main(cli.main_continue, "--load_fn", str(tmp_path / "rl.epoch1.pth"), "--model_fn",
             str(tmp_path / "more.pth"), "--rl_n_epochs", "2", "--verbose", "0")
    assert reward_module.calls  # the resumed run optimised the same reward
    resumed = load_checkpoint(tmp_path / "more.epoch2.pth")
    assert resumed["meta"]["config"]["rl_reward"] == "my_rewards:chrf_near_source_length"
    assert resumed["trainer"]["iteration"] == 2 * resumed["trainer"]["epoch_length"]

    translated = simple_nmt.load(tmp_path / "more.epoch2.pth").translate(src[:3], beam_size=2)
    out = run_main(cli.main_translate, "--model_fn", str(tmp_path / "more.epoch2.pth"), "--beam_size", "2",
                   stdin="".join(line + "\n" for line in src[:3])).stdout
    assert translated == out.split("\n")[:-1]


def test_a_reward_without_an_importable_name_makes_continue_train_ask_for_one(tiny_checkpoint, toy_dir, tmp_path):
    def closure(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        return (hyps != 0).sum(dim=1).float()

    fine_tune(simple_nmt.load(tiny_checkpoint), toy_dir, tmp_path / "rl.pth", closure)
    checkpoint = tmp_path / "rl.epoch1.pth"
    assert load_checkpoint(checkpoint)["meta"]["config"]["rl_reward"] is None
    proc = run_main(cli.main_continue, "--load_fn", str(checkpoint), "--model_fn", str(tmp_path / "more.pth"),
                    "--rl_n_epochs", "2", check=False)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {checkpoint}: trained with a reward given in Python that has no importable name; give "
        "--rl_reward NAME or --rl_reward module:function\n")
    run_main(cli.main_continue, "--load_fn", str(checkpoint), "--model_fn", str(tmp_path / "more.pth"),
             "--rl_n_epochs", "2", "--rl_reward", "gleu", "--verbose", "0")
    assert load_checkpoint(tmp_path / "more.epoch2.pth")["meta"]["config"]["rl_reward"] == "gleu"


def test_a_reward_that_does_not_import_is_one_line(tiny_checkpoint, tmp_path, toy_dir):
    proc = run_main(cli.main_continue, "--load_fn", str(tiny_checkpoint), "--model_fn", str(tmp_path / "rl.pth"),
                    "--rl_n_epochs", "1", "--rl_reward", "no_such_module:reward", "--train",
                    str(toy_dir / "train"), "--valid", str(toy_dir / "valid"), check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "reward 'no_such_module:reward' does not import: ModuleNotFoundError" in proc.stderr
