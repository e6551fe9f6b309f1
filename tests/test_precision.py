"""--precision: bf16 / fp16 autocast on CPU trains both models by MLE and RL; fp32 is the plain float32 step."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import TINY_TRANSFORMER, run_main
from test_trainer import tiny_setup

from simple_nmt import cli, loading, options, precision
from simple_nmt.config import Config, TranslateOptions, config_from_checkpoint
from simple_nmt.data import collate
from simple_nmt.precision import PrecisionWarning, compute_dtype, lstm_precision, resolve_precision
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine, build_optimizer, token_losses


@pytest.fixture(autouse=True)
def quiet_slow_cpu():
    """This test machine's CPU may lack native bf16: its warning is tested on its own below."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrecisionWarning)
        yield


def exact_translations(model, fields, batch, tgt, prec: str) -> int:
    model.eval()
    with resolve_precision(prec, "cpu").autocast():
        ids, _ = model.search(batch["src"], batch["src_lengths"], max_length=30)
    return sum(out == ref for out, ref in zip((fields[1].to_text(row) for row in ids.tolist()), tgt))


@pytest.mark.parametrize("kind", ["transformer", "seq2seq"])
def test_bf16_mle_then_bf16_rl_train_a_tiny_model_to_its_exact_translations(kind):
    config, model, fields, dataset, src, tgt = tiny_setup(kind, precision="bf16", rl_n_samples=7,
                                                          rl_baseline="loo", rl_temperature=0.5)
    batch = collate([dataset[i] for i in range(len(dataset))])
    output_dtypes = set()
    model.generator.register_forward_hook(lambda module, args, out: output_dtypes.add(out.dtype))
    optimizer = build_optimizer(model, config.replace(optimizer="adam"), lr=1e-2)
    mle = MaximumLikelihoodEstimationEngine(model, optimizer, config)
    assert not mle.scaler.is_enabled()  # bf16 needs no loss scaler
    mle.run([batch] * 20, max_epochs=1)
    assert output_dtypes == {torch.bfloat16}  # the products ran in bf16 ...
    assert all(p.dtype == torch.float32 for p in model.parameters())  # ... on float32 weights
    after_mle = exact_translations(model, fields, batch, tgt, "bf16")
    assert after_mle < len(tgt)
    torch.manual_seed(1)
    rl = MinimumRiskTrainingEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), config)
    rl.run([batch] * 60, max_epochs=1)
    assert exact_translations(model, fields, batch, tgt, "bf16") == len(tgt), after_mle
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(rl.state.output["loss"], float)


def test_fp16_keeps_the_loss_scaler_and_trains_to_exact_translations():
    config, model, fields, dataset, src, tgt = tiny_setup("transformer", precision="fp16")
    batch = collate([dataset[i] for i in range(len(dataset))])
    engine = MaximumLikelihoodEstimationEngine(model, build_optimizer(model, config.replace(optimizer="adam"),
                                                                      lr=1e-2), config)
    assert engine.scaler.is_enabled()
    engine.run([batch] * 60, max_epochs=1)
    assert engine.scaler.get_scale() > 0
    assert exact_translations(model, fields, batch, tgt, "fp16") == len(tgt)


@pytest.mark.parametrize("kind", ["transformer", "seq2seq"])
@pytest.mark.parametrize("name", ["fp32", "auto"])
def test_the_fp32_step_is_bit_for_bit_the_plain_float32_step(kind, name):
    config, model, fields, dataset, src, tgt = tiny_setup(kind, precision=name, max_grad_norm=1.0)
    reference = tiny_setup(kind)[1]  # the same initial weights
    batch = collate([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    MaximumLikelihoodEstimationEngine(model, optimizer, config).run([batch] * 3, max_epochs=1)
    plain = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _ in range(3):  # forward, loss, backward, clip, step: no autocast, no scaler
        log_probs = reference(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1])
        loss, _, n_tokens = token_losses(log_probs, batch["tgt"][:, 1:], 0.0)
        (loss / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        plain.step()
        plain.zero_grad(set_to_none=True)
    for (name_, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name_


def test_compute_dtype_is_the_autocast_type_of_its_device_only_where_autocast_is_on():
    assert compute_dtype("cpu", torch.float64) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype("cpu", torch.float32) == torch.bfloat16
        assert compute_dtype("cuda", torch.float32) == torch.float32  # CUDA's autocast is off
    with torch.autocast("cpu", enabled=False):
        assert compute_dtype("cpu", torch.float32) == torch.float32


def test_auto_is_fp32_on_cpu_and_off_autocast_is_fp32():
    assert resolve_precision("auto", "cpu").dtype is None
    assert not resolve_precision("fp32", "cpu").grad_scaler().is_enabled()
    assert Config.from_dict({}).precision == "auto"
    assert vars(options.train_parser().parse_args(["--model_fn", "m.pth", "--off_autocast"]))["precision"] == "fp32"
    assert vars(options.translate_parser().parse_args(["--model_fn", "m.pth", "--precision", "bf16"]))[
        "precision"] == "bf16"
    # a checkpoint of an earlier version stored off_autocast: it loads, and precision is this run's
    assert "off_autocast" not in config_from_checkpoint({"off_autocast": True, "hidden_size": 8})
    with pytest.raises(ValueError, match=r"off_autocast \(did you mean precision='fp32'\?\)"):
        Config.from_dict({"off_autocast": True})
    with pytest.raises(ValueError, match="precision: must be one of auto, fp32, bf16, fp16"):
        TranslateOptions.from_dict({"precision": "int8"})


@pytest.fixture(scope="module")
def bf16_run(toy_dir, tmp_path_factory):
    """train.py --precision bf16, MLE then RL, on a CPU taken to lack native bf16: the checkpoint and stderr."""
    model_fn = tmp_path_factory.mktemp("bf16") / "m.pth"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(precision, "cpu_has_native", lambda name: False)
        warnings.simplefilter("default", PrecisionWarning)
        precision.warn_slow_cpu.cache_clear()
        done = run_main(cli.main_train, "--train", str(toy_dir / "train"), "--valid", str(toy_dir / "valid"),
                        "--model_fn", str(model_fn), *TINY_TRANSFORMER, "--n_epochs", "1", "--rl_n_epochs", "1",
                        "--verbose", "0", "--precision", "bf16", "--max_length", "12")
        precision.warn_slow_cpu.cache_clear()
    return model_fn, done.stderr


def test_a_cpu_without_native_bf16_gets_a_one_line_warning_once_per_run(bf16_run, monkeypatch):
    model_fn, stderr = bf16_run
    assert model_fn.is_file() and model_fn.with_name("m.rl.pth").is_file()  # MLE and RL ran
    assert [line for line in stderr.splitlines() if "bf16" in line] == [
        "warning: --precision bf16: this CPU has no AVX-512 BF16 or AMX, so bf16 runs slower than fp32 here"]
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    precision.warn_slow_cpu.cache_clear()
    with pytest.warns(PrecisionWarning, match="--precision fp16: this CPU has no AMX-FP16"):
        resolve_precision("fp16", "cpu")
    precision.warn_slow_cpu.cache_clear()


def test_translate_decodes_under_the_precision_it_is_given(bf16_run, monkeypatch):
    seen = []
    translate_lines = loading.translate_lines

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return translate_lines(*args, **kwargs)

    monkeypatch.setattr(loading, "translate_lines", recording)
    outputs = [run_main(cli.main_translate, "--model_fn", str(bf16_run[0]), "--precision", name,
                        stdin="the dog sees a cat\n").stdout for name in ("bf16", "fp32", "auto")]
    assert seen == [torch.bfloat16, None, None] and all(len(out.splitlines()) == 1 for out in outputs)


def test_lstm_runs_in_float32_under_cpu_autocast_where_the_cpu_lacks_the_type(monkeypatch):
    lstm = torch.nn.LSTM(4, 6, batch_first=True)
    x = torch.randn(2, 3, 4)
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: False)
    with torch.autocast("cpu", dtype=torch.bfloat16), lstm_precision():
        out, _ = lstm(x)
    assert out.dtype == torch.float32 and torch.equal(out, lstm(x)[0])
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: True)
    with torch.autocast("cpu", dtype=torch.bfloat16), lstm_precision():
        assert torch.is_autocast_enabled("cpu")  # a CPU that has it runs the LSTM under autocast
