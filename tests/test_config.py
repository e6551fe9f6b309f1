"""The options layer: one definition per option, validated alike from Python and the command line,
the RL phase's own schedule, and what continue_train.py takes from a checkpoint."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from conftest import TINY_TRANSFORMER, run_main, run_script

from simple_nmt import cli, options
from simple_nmt.checkpoint import load_checkpoint, save_checkpoint
from simple_nmt.config import (
    FIXED,
    INHERITED,
    LOCAL,
    Config,
    HuggingFaceOptions,
    TranslateOptions,
    as_config,
    default_config,
    value_type,
)
from simple_nmt.models import build_model
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine, build_scheduler


def train_args(toy_dir, model_fn, *extra):
    return ["--model_fn", str(model_fn), "--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"),
            "--batch_size", "64", "--max_length", "30", "--verbose", "0", "--optimizer", "adam", "--lr", "3e-3",
            *TINY_TRANSFORMER, *extra]


# One definition per option


@pytest.mark.parametrize("make_parser,option_class", [(options.train_parser, Config), (options.continue_parser, Config),
                                                      (options.translate_parser, TranslateOptions)])
def test_the_parsers_are_the_dataclasses(make_parser, option_class):
    parser = make_parser()
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "load_fn",
                                                                                      "reset_optimizer")}
    # train.py trains the library's models only: a Hugging Face model is fine-tuned by continue_train.py
    hf = {f.name for f in dataclasses.fields(HuggingFaceOptions)} if make_parser is options.train_parser else set()
    assert flags == {f.name for f in dataclasses.fields(option_class)} - hf
    # nothing given, nothing set: the defaults come from the dataclass alone
    required = {"--model_fn": "m.pth", "--load_fn": "c.pth"}
    argv = [x for flag, value in required.items() if any(flag in a.option_strings for a in parser._actions)
            for x in (flag, value)]
    assert set(vars(parser.parse_args(argv))) == {flag.lstrip("-") for flag in argv[::2]}


def test_defaults_are_the_same_for_the_cli_and_the_engines():
    model = build_model({"hidden_size": 8, "word_vec_size": 8, "n_layers": 1}, 10, 10)
    engine = MinimumRiskTrainingEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    from_cli = Config.from_dict(vars(options.train_parser().parse_args(["--model_fn", "m.pth"])))
    # the engine records the rate its optimizer runs at
    assert engine.config == dataclasses.replace(from_cli, model_fn=None, rl_lr=0.1)
    assert engine.config.max_grad_norm == 5.0 and engine.config.max_length == 100
    assert default_config() == Config()


@pytest.mark.parametrize("overrides,named", [
    ({"rl_objective": "ppo"}, "rl_objective"), ({"rl_temperature": 0}, "rl_temperature"),
    ({"rl_n_samples": 0}, "rl_n_samples"), ({"rl_top_p": 0}, "rl_top_p"), ({"rl_top_p": 1.5}, "rl_top_p"),
    ({"rl_top_k": -1}, "rl_top_k"), ({"lr": float("nan")}, "lr"), ({"rl_lr": math.inf}, "rl_lr"),
    ({"dropout": 1.5}, "dropout"), ({"hidden_size": 2.5}, "hidden_size"), ({"use_transformer": "yes"},
                                                                           "use_transformer"),
    ({"seed": 2**64}, "seed"), ({"lang": "english"}, "lang"), ({"rl_n_sample": 3}, "rl_n_samples?"),
])
def test_a_bad_config_in_python_is_a_value_error_naming_the_option(overrides, named):
    with pytest.raises(ValueError, match=named):
        default_config(**overrides)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=named):
        MaximumLikelihoodEstimationEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), overrides)


def test_a_config_is_frozen_and_replace_validates():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert config.replace(rl_lr=1e-4).rl_lr == 1e-4 and config.rl_lr is None
    with pytest.raises(ValueError, match="rl_lr"):
        config.replace(rl_lr=-1.0)
    assert as_config({"lr": 1}).lr == 1.0 and isinstance(as_config({"lr": 1}).lr, float)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "argument --lr: must be a finite number"),
    (["--rl_temperature", "0"], "argument --rl_temperature: must be > 0"),
    (["--rl_objective", "ppo"], "argument --rl_objective: must be one of reinforce, mrt"),
    (["--rl_top_p", "1.5"], "argument --rl_top_p: must be <= 1"),
    (["--seed", str(2**70)], "argument --seed: must be <="),
    (["--n_layers", "1.5"], "argument --n_layers: '1.5' is not an integer"),
])
def test_the_command_line_refuses_the_same_values(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        options.train_parser().parse_args(["--model_fn", "m.pth", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_every_option_says_where_continue_train_takes_it_from():
    sources = {f.name: f.metadata["source"] for f in dataclasses.fields(Config)}
    assert set(sources.values()) == {FIXED, INHERITED, LOCAL}
    assert {k for k, v in sources.items() if v == LOCAL} == {"gpu_id", "precision", "model_fn", "verbose",
                                                               "tensorboard_dir", "hf_model", "cache_dir"}
    assert {"use_transformer", "hidden_size", "n_layers", "tie_embeddings", "spm_vocab_size", "lang"} <= {
        k for k, v in sources.items() if v == FIXED}
    text = options.continue_parser().format_help()
    for title in options.CONTINUE_GROUPS.values():
        assert title in text


# The RL phase's own learning-rate schedule


def test_rl_schedule_ignores_the_mle_options():
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    mle_options = {"warmup_steps": 800, "lr_step": 1, "lr_gamma": 0.5}
    flat = build_scheduler(optimizer, mle_options, updates_per_epoch=10, phase="rl")
    assert [flat.lr_lambdas[0](n) for n in range(30)] == [1.0] * 30
    warm = build_scheduler(optimizer, {**mle_options, "rl_warmup_steps": 4}, updates_per_epoch=10, phase="rl")
    assert [warm.lr_lambdas[0](n) for n in range(7)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1])


@pytest.fixture(scope="module")
def warmed_up(toy_dir, tmp_path_factory):
    """A tiny Transformer trained for one epoch with an 800-update warm-up and step decay."""
    model_fn = tmp_path_factory.mktemp("warm") / "mle.pth"
    run_script("train.py", *train_args(toy_dir, model_fn, "--n_epochs", "1", "--warmup_steps", "800",
                                       "--lr_step", "1", "--lr_gamma", "0.5"))
    return model_fn


def record_rl_rates(monkeypatch) -> list[float]:
    """The learning rate of every RL update from now on."""
    rates = []
    update = MinimumRiskTrainingEngine._update

    def recording_update(engine):
        rates.append(engine.optimizer.param_groups[0]["lr"])
        return update(engine)

    monkeypatch.setattr(MinimumRiskTrainingEngine, "_update", recording_update)
    return rates


RL = ["--rl_n_samples", "2", "--rl_lr", "1e-4", "--batch_size", "100", "--verbose", "0"]


@pytest.mark.parametrize("rl_warmup_steps", [0, 3])
def test_every_rl_update_runs_at_the_rl_rate(warmed_up, tmp_path, monkeypatch, rl_warmup_steps):
    rates = record_rl_rates(monkeypatch)
    cli.main_continue(["--load_fn", str(warmed_up), "--model_fn", str(tmp_path / "rl.pth"), "--rl_n_epochs", "2",
                       "--rl_warmup_steps", str(rl_warmup_steps), *RL])
    assert len(rates) == 12  # 600 pairs in batches of 100, two epochs
    expected = [1e-4 * min(1.0, (n + 1) / rl_warmup_steps) if rl_warmup_steps else 1e-4 for n in range(12)]
    assert rates == pytest.approx(expected, rel=1e-12)
    # resumed, the RL phase goes on at its own rate (and at a new one when --rl_lr is given)
    del rates[:]
    cli.main_continue(["--load_fn", str(tmp_path / "rl.epoch1.pth"), "--model_fn", str(tmp_path / "more.pth"),
                       "--rl_n_epochs", "2", "--verbose", "0"])
    assert rates == pytest.approx(expected[6:], rel=1e-12)
    del rates[:]
    cli.main_continue(["--load_fn", str(tmp_path / "rl.epoch1.pth"), "--model_fn", str(tmp_path / "new.pth"),
                       "--rl_n_epochs", "2", "--rl_lr", "3e-5", "--verbose", "0"])
    assert rates == pytest.approx([r * 0.3 for r in expected[6:]], rel=1e-12)


def test_train_py_runs_rl_after_its_warmed_up_mle_at_the_rl_rate(toy_dir, tmp_path, monkeypatch):
    rates = record_rl_rates(monkeypatch)
    cli.main_train(train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "1", "--warmup_steps", "800",
                              "--rl_n_epochs", "1", *RL))
    assert rates == [1e-4] * 6


def test_an_exact_resume_takes_a_new_rate_but_not_a_new_optimizer(warmed_up, tmp_path):
    def last_rate(stem: str, *options: str) -> float:
        run_main(cli.main_continue, "--load_fn", str(warmed_up), "--model_fn", str(tmp_path / f"{stem}.pth"),
                 "--n_epochs", "2", "--verbose", "0", *options)
        return load_checkpoint(tmp_path / f"{stem}.epoch2.pth")["optimizer"]["param_groups"][0]["lr"]

    # the same schedule (warm-up and step decay) goes on, scaled from the peak rate 3e-3 to 1e-3
    assert last_rate("new", "--lr", "1e-3") == pytest.approx(last_rate("same") / 3, rel=1e-12)
    proc = run_main(cli.main_continue, "--load_fn", str(warmed_up), "--model_fn", str(tmp_path / "n.pth"),
                    "--n_epochs", "2", "--optimizer", "sgd", "--verbose", "0", check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: --optimizer sgd: the checkpoint resumes adam's state; give --reset_optimizer to start a fresh "
        "optimizer")


# continue_train.py: where to run and log come from its command line


def rewrite_config(path, out, **changes):
    checkpoint = load_checkpoint(path)
    checkpoint["meta"]["config"].update(changes)
    save_checkpoint(checkpoint, out)
    return out


def test_continue_train_does_not_inherit_where_to_run_and_log(warmed_up, tmp_path):
    tb = tmp_path / "tb_of_the_first_run"
    gpu_trained = rewrite_config(warmed_up, tmp_path / "gpu.pth", gpu_id=0, verbose=0, tensorboard_dir=str(tb))
    proc = run_main(cli.main_continue, "--load_fn", str(gpu_trained), "--model_fn", str(tmp_path / "rl.pth"),
                    "--rl_n_epochs", "1", "--rl_n_samples", "2", "--batch_size", "100")
    assert "epoch 1: loss=" in proc.stdout  # --verbose 2, the default, not the checkpoint's 0
    assert "\r" not in proc.stderr  # and its progress, as plain lines: stderr is not a terminal
    assert not tb.exists()
    stored = load_checkpoint(tmp_path / "rl.pth")["meta"]["config"]
    assert stored["gpu_id"] == -1 and stored["tensorboard_dir"] is None and stored["verbose"] == 2


def test_the_command_line_wins_over_the_checkpoint_for_the_optimizer(toy_dir, tmp_path):
    run_main(cli.main_train, *train_args(toy_dir, tmp_path / "m.pth", "--n_epochs", "1", "--use_adam"))
    assert load_checkpoint(tmp_path / "m.pth")["meta"]["config"]["optimizer"] == "adam"
    run_main(cli.main_continue, "--load_fn", str(tmp_path / "m.pth"), "--model_fn", str(tmp_path / "w.pth"),
             "--reset_optimizer", "--optimizer", "adamw", "--n_epochs", "1", "--verbose", "0")
    checkpoint = load_checkpoint(tmp_path / "w.pth")
    assert checkpoint["meta"]["config"]["optimizer"] == "adamw"
    assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == 0.01  # AdamW's; Adam's is 0


def test_a_checkpoint_of_the_earlier_config_layout_still_loads(warmed_up, tmp_path):
    # earlier versions stored --use_adam / --use_radam flags beside --optimizer, and load_fn
    old = load_checkpoint(warmed_up)
    config = {k: v for k, v in old["meta"]["config"].items() if k != "rl_warmup_steps"}
    config.update(optimizer="sgd", use_adam=True, use_radam=False, load_fn="earlier.pth")
    old["meta"]["config"] = config
    for counter in ("n_bad_steps", "n_skipped_steps"):
        del old["trainer"][counter]
    save_checkpoint(old, tmp_path / "old.pth")
    assert torch.load(tmp_path / "old.pth", weights_only=True)["meta"]["config"]["use_adam"]
    out = run_main(cli.main_translate, "--model_fn", str(tmp_path / "old.pth"), stdin="a dog sees the cat\n").stdout
    assert len(out.split("\n")) == 2
    run_main(cli.main_continue, "--load_fn", str(tmp_path / "old.pth"), "--model_fn", str(tmp_path / "r.pth"),
             "--n_epochs", "2", "--verbose", "0")  # an exact resume of its Adam
    resumed = load_checkpoint(tmp_path / "r.epoch2.pth")
    assert resumed["meta"]["config"]["optimizer"] == "adam" and "use_adam" not in resumed["meta"]["config"]
    assert resumed["trainer"]["n_skipped_steps"] == 0 and resumed["trainer"]["iteration"] == 20


def test_a_checkpoint_with_a_bad_config_value_is_a_one_line_error(warmed_up, tmp_path):
    def run(script, checkpoint):
        if script == "translate.py":
            return run_main(cli.main_translate, "--model_fn", str(checkpoint), stdin="a\n", check=False)
        return run_main(cli.main_continue, "--load_fn", str(checkpoint), "--model_fn", str(tmp_path / "x.pth"),
                        "--rl_n_epochs", "1", check=False)

    bad_model = rewrite_config(warmed_up, tmp_path / "bad_model.pth", dropout=7.0)
    bad_rl = rewrite_config(warmed_up, tmp_path / "bad_rl.pth", rl_top_p=7.0)
    for script, checkpoint, option in (("translate.py", bad_model, "dropout"),
                                       ("continue_train.py", bad_model, "dropout"),
                                       ("continue_train.py", bad_rl, "rl_top_p")):
        proc = run(script, checkpoint)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"error: {checkpoint}: not a usable simple-nmt checkpoint: its config: "
                                       f"{option}: must be <= 1.0, got 7.0")
    assert run("translate.py", bad_rl).returncode == 0  # translation reads the model's options only


def every_option():
    for group in (Config, TranslateOptions):
        hints = typing.get_type_hints(group)
        for f in dataclasses.fields(group):
            yield group, f, value_type(hints[f.name])[0]


@pytest.mark.parametrize("group,f,kind", list(every_option()), ids=lambda x: getattr(x, "name", ""))
def test_every_option_refuses_what_it_cannot_take(group, f, kind, capsys):
    make_parser = options.translate_parser if group is TranslateOptions else options.train_parser
    bad = []
    if kind is float:
        bad += [float("nan"), float("inf"), -float("inf"), "0.5"]
    if kind in (int, float) and f.metadata["minimum"] is not None:
        bad.append(f.metadata["minimum"] - 1)
    if kind in (int, float) and f.metadata["maximum"] is not None:
        bad.append(f.metadata["maximum"] + 1)
    if kind is int:
        bad += [1.5, True]
    if kind is bool:
        bad += [1, "yes"]
    if f.metadata["choices"]:
        bad.append("no such choice")
    for value in bad:
        with pytest.raises(ValueError, match=f"^{f.name}: "):
            group.from_dict({f.name: value})
        if kind is not bool and not isinstance(value, (bool, str)):  # the same value typed on the command line
            with pytest.raises(SystemExit):
                make_parser().parse_args(["--model_fn", "m.pth", f"--{f.name}", str(value)])
            assert f"argument --{f.name}: " in capsys.readouterr().err
