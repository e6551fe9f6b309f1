"""The three scripts, run as a user runs them."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_SEQ2SEQ, TINY_TRANSFORMER, run_in_process, run_script

import simple_nmt
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.data import UNK


def train_args(toy_dir, model_fn, *extra):
    return ["--model_fn", str(model_fn), "--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"),
            "--lang", "ende", "--batch_size", "32", "--max_length", "30", "--verbose", "0",
            "--optimizer", "adam", "--lr", "3e-3", *extra]


@pytest.fixture(scope="module")
def trained(toy_dir, tmp_path_factory):
    """A tiny Transformer trained for one epoch."""
    model_fn = tmp_path_factory.mktemp("trained") / "tf.pth"
    run_in_process("train.py", *train_args(toy_dir, model_fn, "--n_epochs", "1", *TINY_TRANSFORMER))
    return model_fn


def params(path):
    return load_checkpoint(path)["model"]


def epochs_done(checkpoint) -> int:
    return checkpoint["trainer"]["iteration"] // checkpoint["trainer"]["epoch_length"]


@pytest.mark.parametrize("arch", [TINY_TRANSFORMER, TINY_SEQ2SEQ], ids=["transformer", "seq2seq"])
def test_train_then_translate(toy_dir, tmp_path, arch):
    model_fn = tmp_path / "m.pth"
    proc = run_script("train.py", *train_args(toy_dir, model_fn, "--n_epochs", "1", *arch))
    assert proc.returncode == 0
    assert model_fn.is_file() and (tmp_path / "m.epoch1.pth").is_file()
    checkpoint = load_checkpoint(model_fn)
    assert checkpoint["meta"]["config"]["use_transformer"] == ("--use_transformer" in arch)
    assert epochs_done(checkpoint) == 1
    lines = (toy_dir / "test.en").read_text().splitlines()[:5]
    stdin = "\n".join([lines[0], "", "   ", lines[1], "qwerty unknownword " + lines[2]]) + "\n"
    out = run_script("translate.py", "--model_fn", str(model_fn), "--beam_size", "2", stdin=stdin).stdout
    outputs = out.split("\n")[:-1]
    assert len(outputs) == 5 and outputs[1] == "" and outputs[2] == ""
    assert outputs[0] and outputs[3]


def test_translate_files_n_best_greedy_and_truncation(trained, toy_dir, tmp_path):
    source = toy_dir / "test.en"
    n_lines = len(source.read_text().splitlines())
    out = tmp_path / "out.de"
    run_in_process("translate.py", "--model_fn", str(trained), "--input", str(source), "--output", str(out),
               "--beam_size", "3", "--n_best", "2")
    rows = out.read_text().split("\n")[:-1]
    assert len(rows) == n_lines and all(len(r.split("\t")) == 2 for r in rows)
    greedy = run_in_process("translate.py", "--model_fn", str(trained), "--beam_size", "1", "--max_length", "4",
                        stdin=source.read_text())
    assert len(greedy.stdout.split("\n")[:-1]) == n_lines
    assert all(len(r.split()) <= 4 for r in greedy.stdout.split("\n"))
    assert "truncated" in greedy.stderr


def test_two_epochs_equal_one_plus_one_resumed(toy_dir, tmp_path):
    arch = [*TINY_TRANSFORMER[:-2], "--dropout", "0.2"]  # dropout: the random state must resume too
    run_in_process("train.py", *train_args(toy_dir, tmp_path / "straight.pth", "--n_epochs", "2", *arch))
    run_in_process("train.py", *train_args(toy_dir, tmp_path / "first.pth", "--n_epochs", "1", *arch))
    run_in_process("continue_train.py", "--load_fn", str(tmp_path / "first.epoch1.pth"),
               "--model_fn", str(tmp_path / "resumed.pth"), "--n_epochs", "2", "--verbose", "0")
    straight, resumed = params(tmp_path / "straight.epoch2.pth"), params(tmp_path / "resumed.epoch2.pth")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert epochs_done(load_checkpoint(tmp_path / "resumed.epoch2.pth")) == 2


def test_reset_optimizer_keeps_only_the_weights(trained, tmp_path):
    # without it the checkpoint's epoch count and optimizer resume: 1 epoch is already done
    proc = run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", str(tmp_path / "r.pth"),
                      "--n_epochs", "1", "--verbose", "1")
    assert "nothing to train" in proc.stdout and not (tmp_path / "r.epoch1.pth").exists()
    run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", str(tmp_path / "r.pth"),
               "--reset_optimizer", "--n_epochs", "1", "--lr", "1e-9", "--verbose", "0")
    checkpoint = load_checkpoint(tmp_path / "r.epoch1.pth")
    assert epochs_done(checkpoint) == 1
    assert [g["lr"] for g in checkpoint["optimizer"]["param_groups"]] == [1e-9]
    loaded = load_checkpoint(trained)
    assert loaded["optimizer"]["param_groups"][0]["lr"] != 1e-9
    # it started from the checkpoint's weights (a step of 1e-9 moves them by about that much)
    assert all(torch.allclose(v, loaded["model"][k], atol=1e-6) for k, v in checkpoint["model"].items())
    assert "reset_optimizer" not in checkpoint["meta"]["config"]


def test_continue_train_fine_tunes_with_rl(trained, toy_dir, tmp_path):
    rl_fn = tmp_path / "rl.pth"
    run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", str(rl_fn), "--rl_n_epochs", "1",
               "--rl_n_samples", "2", "--verbose", "1", "--rl_lr", "1e-4")
    checkpoint = load_checkpoint(rl_fn)
    assert checkpoint["meta"]["config"]["phase"] == "rl" and epochs_done(checkpoint) == 1
    start = params(trained)
    assert not all(torch.equal(v, start[k]) for k, v in checkpoint["model"].items())
    out = run_in_process("translate.py", "--model_fn", str(rl_fn), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2


def test_averaged_checkpoint_translates_and_starts_new_phases_but_resumes_nothing(toy_dir, tmp_path):
    run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "2", *TINY_TRANSFORMER))
    epochs = [str(tmp_path / f"m.epoch{i}.pth") for i in (1, 2)]
    avg = tmp_path / "avg.pth"
    run_in_process("average_checkpoints.py", *epochs, "--output", str(avg))
    first, second, average = params(epochs[0]), params(epochs[1]), params(avg)
    assert not torch.equal(first["src_emb.weight"], second["src_emb.weight"])
    assert all(torch.allclose(v, (first[k] + second[k]) / 2, atol=1e-6) for k, v in average.items())
    out = run_in_process("translate.py", "--model_fn", str(avg), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2
    run_in_process("continue_train.py", "--load_fn", str(avg), "--model_fn", str(tmp_path / "rl.pth"),
               "--rl_n_epochs", "1", "--rl_n_samples", "2", "--verbose", "0")
    assert load_checkpoint(tmp_path / "rl.pth")["meta"]["config"]["phase"] == "rl"
    proc = run_in_process("continue_train.py", "--load_fn", str(avg), "--model_fn", str(tmp_path / "more.pth"),
                      "--n_epochs", "3", "--verbose", "0", check=False)
    assert proc.returncode == 1 and not (tmp_path / "more.pth").exists()
    assert proc.stderr.strip() == (f"error: {avg}: holds weights only (averaged), nothing to resume; "
                                   "give --reset_optimizer to train them further")
    proc = run_in_process("average_checkpoints.py", *epochs, "--output", epochs[1], check=False)
    assert proc.returncode == 1 and "--output" in proc.stderr and "optimizer" in load_checkpoint(epochs[1])


def test_train_runs_mle_then_rl_in_one_go(toy_dir, tmp_path):
    proc = run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "1", "--rl_n_epochs", "1",
                                              "--rl_n_samples", "2", *TINY_SEQ2SEQ, "--verbose", "1"))
    assert "reward=" in proc.stdout
    assert load_checkpoint(tmp_path / "m.rl.pth")["meta"]["config"]["phase"] == "rl"
    assert (tmp_path / "m.pth").is_file() and (tmp_path / "m.rl.epoch1.pth").is_file()


def test_tied_embeddings_stay_tied_through_mle_rl_and_translation(toy_dir, tmp_path):
    run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "1", "--rl_n_epochs", "1",
                                       "--rl_n_samples", "2", *TINY_TRANSFORMER, "--tie_embeddings"))
    for name in ("m.pth", "m.rl.pth"):
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint["meta"]["config"]["tie_embeddings"]
        assert torch.equal(checkpoint["model"]["generator.weight"], checkpoint["model"]["tgt_emb.weight"])
    assert not torch.equal(params(tmp_path / "m.pth")["generator.weight"],
                           params(tmp_path / "m.rl.pth")["generator.weight"])
    out = run_in_process("translate.py", "--model_fn", str(tmp_path / "m.rl.pth"), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2


@pytest.mark.parametrize("subwords", [[], ["--spm_vocab_size", "80"]], ids=["words", "sentencepiece"])
def test_a_joint_vocabulary_is_built_from_both_sides_and_shares_every_embedding_through_rl_and_loading(
        toy_dir, tmp_path, subwords):
    run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "1", "--rl_n_epochs", "1",
                                       "--rl_n_samples", "2", *TINY_TRANSFORMER, "--tie_embeddings",
                                       "--joint_vocab", *subwords))
    for name in ("m.pth", "m.rl.pth"):
        weights = params(tmp_path / name)
        assert torch.equal(weights["src_emb.weight"], weights["tgt_emb.weight"])
        assert torch.equal(weights["generator.weight"], weights["tgt_emb.weight"])
    loaded = simple_nmt.load(tmp_path / "m.rl.pth")
    assert loaded.model.src_emb.weight is loaded.model.tgt_emb.weight is loaded.model.generator.weight
    assert loaded.src_field.vocab.itos == loaded.tgt_field.vocab.itos
    assert loaded.src_field.to_ids("the dog") == loaded.tgt_field.to_ids("the dog")
    # the one vocabulary holds both languages' text: no unknown tokens on either side of the training data
    for lang in ("en", "de"):
        for line in (toy_dir / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:50]:
            assert UNK not in loaded.src_field.to_ids(line), line
    assert len(loaded.translate(["the dog sees a cat"])) == 1


def test_tied_seq2seq_with_unequal_sizes_is_a_one_line_error(toy_dir, tmp_path):
    proc = run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth"), *TINY_SEQ2SEQ, "--tie_embeddings",
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "--tie_embeddings needs --word_vec_size (16) equal to --hidden_size (32)" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_sentencepiece_checkpoint_translates_raw_text(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    src = ["The dog, the cat.", "A bird!", "The dogs?"] * 30
    tgt = ["Der Hund, die Katze.", "Ein Vogel!", "Die Hunde?"] * 30
    for split, n in (("train", 90), ("valid", 3)):
        (data / f"{split}.en").write_text("\n".join(src[:n]) + "\n")
        (data / f"{split}.de").write_text("\n".join(tgt[:n]) + "\n")
    model_fn = tmp_path / "spm.pth"
    run_in_process("train.py", "--model_fn", str(model_fn), "--train", str(data / "train"), "--valid",
               str(data / "valid"), "--spm_vocab_size", "40", "--n_epochs", "30", "--optimizer", "adam",
               "--lr", "1e-2", "--verbose", "0", *TINY_TRANSFORMER)
    meta = load_checkpoint(model_fn)["meta"]
    assert meta["src_spm"] and meta["tgt_spm"]
    out = run_in_process("translate.py", "--model_fn", str(model_fn), "--beam_size", "2",
                     stdin="A bird!\nThe dog, the cat.\n").stdout
    assert out == "Ein Vogel!\nDer Hund, die Katze.\n"


@pytest.mark.parametrize("args,message", [
    (["--rl_n_samples", "0"], "argument --rl_n_samples: must be >= 1"),
    (["--lang", "english"], "argument --lang: --lang must be two 2-letter codes"),
    (["--hidden_size", "-4"], "argument --hidden_size: must be >= 1"),
    (["--rl_reward", "nonsense"], "argument --rl_reward: must be one of bleu"),
])
def test_invalid_options_fail_before_any_work(toy_dir, tmp_path, args, message):
    proc = run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth"), *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_bad_data_gives_one_line_error_naming_the_file(tmp_path):
    (tmp_path / "c.en").write_text("a\nb\n")
    (tmp_path / "c.de").write_text("x\n")
    proc = run_in_process("train.py", "--model_fn", str(tmp_path / "m.pth"), "--train", str(tmp_path / "c"),
                      "--valid", str(tmp_path / "c"), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "c.en has 2 lines" in proc.stderr


def test_translate_refuses_bad_checkpoints_and_options(tmp_path):
    # the classic toolkit pickled its argparse Namespace into checkpoints
    torch.save({"model": {}, "meta": {}, "config": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    proc = run_in_process("translate.py", "--model_fn", str(tmp_path / "pickled.pth"), stdin="a\n", check=False)
    assert proc.returncode == 1 and "refused" in proc.stderr and "Traceback" not in proc.stderr
    torch.save({"model": {}, "meta": {"config": {}}}, tmp_path / "foreign.pth")
    proc = run_in_process("translate.py", "--model_fn", str(tmp_path / "foreign.pth"), stdin="a\n", check=False)
    assert proc.returncode == 1 and "not a usable simple-nmt checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_in_process("translate.py", "--model_fn", "x.pth", "--beam_size", "0", stdin="a\n", check=False)
    assert proc.returncode == 2 and "--beam_size: must be >= 1" in proc.stderr


def test_continue_train_rejects_a_different_architecture(trained):
    proc = run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", "x.pth",
                      "--hidden_size", "64", check=False)
    assert proc.returncode == 1 and "--hidden_size 64 does not match" in proc.stderr
    proc = run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", "x.pth",
                      "--tie_embeddings", check=False)
    assert proc.returncode == 1 and "--tie_embeddings True does not match the checkpoint's False" in proc.stderr


def test_translate_into_a_closed_pipe_ends_quietly(trained, toy_dir):
    command = (f"{sys.executable} {ROOT / 'translate.py'} --model_fn {trained} --beam_size 1 "
               f"< {toy_dir / 'test.en'} | head -1")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_tensorboard_gets_training_and_validation_curves(toy_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "2", *TINY_SEQ2SEQ,
                                       "--tensorboard_dir", str(tmp_path / "tb")))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ppl", "valid/valid_bleu", "valid/valid_loss"} <= tags
    assert [e.step for e in events.Scalars("valid/valid_bleu")] == [1, 2]


def test_every_pair_dropped_is_an_error(toy_dir, tmp_path):
    proc = run_in_process("train.py", *train_args(toy_dir, tmp_path / "m.pth"), "--max_length", "2", check=False)
    assert proc.returncode == 1 and "every pair is longer than --max_length 2" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_ctrl_c_saves_a_resumable_checkpoint(toy_dir, tmp_path):
    import os
    import signal
    import time

    model_fn = tmp_path / "m.pth"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *train_args(toy_dir, model_fn, "--n_epochs", "50", *TINY_SEQ2SEQ, "--verbose", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # wait until the first epoch is done, then press Ctrl-C
        if line.startswith("epoch 1:"):
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    interrupted = tmp_path / "m.interrupted.pth"
    assert f"resumable checkpoint saved to {interrupted}" in stderr
    checkpoint = load_checkpoint(interrupted)
    assert checkpoint["trainer"]["iteration"] > checkpoint["trainer"]["epoch_length"]
    # the interrupt lands wherever the machine's speed puts it: resume two epochs past it
    target = epochs_done(checkpoint) + 2
    run_script("continue_train.py", "--load_fn", str(interrupted), "--model_fn", str(tmp_path / "r.pth"),
               "--n_epochs", str(target), "--verbose", "0")
    assert epochs_done(load_checkpoint(tmp_path / f"r.epoch{target}.pth")) == target


def test_rl_two_epochs_equal_one_plus_one_resumed(trained, tmp_path):
    rl = ["--rl_n_samples", "2", "--rl_lr", "1e-4", "--verbose", "0", "--batch_size", "64"]
    run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", str(tmp_path / "straight.pth"),
               "--rl_n_epochs", "2", *rl)
    run_in_process("continue_train.py", "--load_fn", str(trained), "--model_fn", str(tmp_path / "first.pth"),
               "--rl_n_epochs", "1", *rl)
    run_in_process("continue_train.py", "--load_fn", str(tmp_path / "first.epoch1.pth"),
               "--model_fn", str(tmp_path / "resumed.pth"), "--rl_n_epochs", "2", "--verbose", "0")
    straight, resumed = params(tmp_path / "straight.epoch2.pth"), params(tmp_path / "resumed.epoch2.pth")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    start = params(trained)
    assert not all(torch.equal(straight[k], start[k]) for k in straight)


def test_replaced_bytes_and_dropped_pairs_are_counted_not_silent(toy_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    src = (toy_dir / "train.en").read_text().splitlines()[:60]
    tgt = (toy_dir / "train.de").read_text().splitlines()[:60]
    (data / "c.en").write_bytes(("\n".join(src) + "\n").encode() + b"bad \xff line\n")
    (data / "c.de").write_text("\n".join(tgt) + "\nx\n")
    args = ["--model_fn", str(tmp_path / "m.pth"), "--train", str(data / "c"), "--valid", str(toy_dir / "valid"),
            "--n_epochs", "1", "--verbose", "1", "--max_length", "8", *TINY_SEQ2SEQ]
    strict = run_in_process("train.py", *args, check=False)
    assert strict.returncode == 1 and "c.en:61: not valid UTF-8" in strict.stderr
    assert not (tmp_path / "m.pth").exists()
    replaced = run_in_process("train.py", *args, "--encoding_errors", "replace")
    n_long = sum(len(s.split()) > 8 or len(t.split()) > 8 for s, t in zip(src, tgt))
    assert f"61 pairs, {61 - n_long} kept, {n_long} dropped" in replaced.stdout
    assert "1 lines with replaced bytes" in replaced.stdout


def test_the_kl_start_model_is_saved_with_the_rl_checkpoints_and_resumed(toy_dir, tmp_path):
    from conftest import run_main

    from simple_nmt import cli

    data = ["--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"), "--max_length", "12"]
    run_main(cli.main_train, *data, "--model_fn", str(tmp_path / "m.pth"), *TINY_TRANSFORMER, "--n_epochs", "1",
             "--rl_n_epochs", "1", "--rl_kl_weight", "0.5", "--verbose", "1", "--optimizer", "adam")
    start = load_checkpoint(tmp_path / "m.pth")["model"]
    first = load_checkpoint(tmp_path / "m.rl.epoch1.pth")
    assert first["reference"].keys() == start.keys()
    assert all(torch.equal(first["reference"][k], start[k]) for k in start)
    assert not all(torch.equal(first["model"][k], start[k]) for k in start)  # RL moved the model, not its start
    done = run_main(cli.main_continue, "--load_fn", str(tmp_path / "m.rl.epoch1.pth"), "--rl_n_epochs", "2",
                    "--model_fn", str(tmp_path / "r.pth"), "--verbose", "1")
    assert "kl=" in done.stdout + done.stderr
    second = load_checkpoint(tmp_path / "r.epoch2.pth")
    assert all(torch.equal(second["reference"][k], start[k]) for k in start)
