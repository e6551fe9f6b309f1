"""The Multi30k recipe, end to end on a generated corpus laid out like Multi30k (smoke profile)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType

import sacrebleu
from conftest import run_script

from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.config import Config
from simple_nmt.models import build_model
from simple_nmt.options import train_parser
from simple_nmt.toy import make_corpus


def multi30k_like(folder: Path, langs: tuple[str, str] = ("en", "de")) -> Path:
    """SPLIT.SRC / SPLIT.TGT and tok/SPLIT.lc.norm.tok.{SRC,TGT} for train, val and test_2016_flickr."""
    (folder / "tok").mkdir(parents=True)
    for split, n, seed in (("train", 300, 0), ("val", 30, 1), ("test_2016_flickr", 30, 2)):
        src, tgt = make_corpus(n, seed=seed)
        for lang, lines in zip(langs, (src, tgt)):
            text = "\n".join(lines) + "\n"
            (folder / f"{split}.{lang}").write_text(text.capitalize(), encoding="utf-8")
            (folder / "tok" / f"{split}.lc.norm.tok.{lang}").write_text(text, encoding="utf-8")
    return folder


def recipe(*args: str) -> subprocess.CompletedProcess:
    return run_script("examples/multi30k/run.py", *args, check=False, timeout=600)


def recipe_module() -> ModuleType:
    """examples/multi30k/run.py imported as a module, to call its functions."""
    spec = importlib.util.spec_from_file_location("recipe", Path(__file__).parents[1] / "examples/multi30k/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_trains_fine_tunes_and_scores_both_models_and_names_a_failing_run(tmp_path: Path) -> None:
    data, work = multi30k_like(tmp_path / "data"), tmp_path / "work"
    for lang in ("en", "de"):  # the raw protocol's training data is missing: its runs fail, the others go on
        (data / f"train.{lang}").unlink()
    proc = recipe(str(data), "--profile", "smoke", "--workdir", str(work), "--jobs", "2",
                  "--mle_options", "--n_epochs 3")
    assert proc.returncode == 1
    failed = proc.stderr.strip().splitlines()[-1]
    model = failed.split(".")[0]
    log = work / f"{model}.raw" / "log.txt"
    assert failed == f"{model}.raw: train.py failed; its output is in {log}", proc.stderr
    assert "train.en" in log.read_text()
    results = json.loads((work / "results.json").read_text())
    assert sorted(results) == ["seq2seq.tok", "transformer.tok"]
    for row in results.values():
        for key in ("mle_test_2016_flickr", "rl_test_2016_flickr", "mle_val", "rl_val"):
            assert 0.0 <= row[key] <= 100.0
        assert len(row["mle_valid_bleu_per_epoch"]) == 3 and len(row["rl_valid_bleu_per_epoch"]) == 1
    # the scores are those of the files it wrote, under the tok protocol
    out = work / "transformer.tok"
    hyps = (out / "test_2016_flickr.rl.de").read_text(encoding="utf-8").splitlines()
    refs = (data / "tok" / "test_2016_flickr.lc.norm.tok.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs)
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score
    assert abs(results["transformer.tok"]["rl_test_2016_flickr"] - round(expected, 2)) < 1e-9
    table = (work / "results.md").read_text()
    assert "| transformer | tok |" in table and "| seq2seq | tok |" in table

    # --rl_only keeps the MLE checkpoint and its curve, and redoes RL (on the first 20 pairs, not the profile's 64);
    # with --average 2 from the mean of the last two epochs' weights, which the MLE columns then score
    mle_bytes = (out / "mle.pth").read_bytes()
    proc = recipe(str(data), "--profile", "smoke", "--protocols", "tok", "--models", "transformer",
                  "--workdir", str(work), "--rl_only", "--rl_options", "--rl_n_samples 3", "--rl_sentences", "20",
                  "--average", "2", "--mbr_options", "--mbr 4 --mbr_utility chrf", "--control", "1",
                  "--length_penalties", "0,1.5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "$ python train.py" not in proc.stdout
    rl_command = next(line for line in proc.stdout.splitlines() if line.startswith("$ python continue_train.py"))
    assert rl_command.endswith("--rl_n_samples 2 --rl_baseline loo --batch_size 32 --rl_n_samples 3")
    assert f"--train {out / 'rl_train'} " in rl_command and f"--load_fn {out / 'mle.avg.pth'} " in rl_command
    assert load_checkpoint(out / "mle.avg.pth")["meta"]["averaged_from"] == [
        str(out / "mle.epoch2.pth"), str(out / "mle.epoch3.pth")]
    assert f"--model_fn {out / 'mle.avg.pth'} --input" in proc.stdout
    assert "transformer.tok: the MLE checkpoint is the average of mle.epoch2.pth mle.epoch3.pth" in proc.stdout
    for lang in ("en", "de"):
        train = (data / "tok" / f"train.lc.norm.tok.{lang}").read_text(encoding="utf-8").splitlines()
        assert (out / f"rl_train.{lang}").read_text(encoding="utf-8").splitlines() == train[:20]
    assert (out / "mle.pth").read_bytes() == mle_bytes
    again = json.loads((work / "results.json").read_text())["transformer.tok"]
    for phase in ("mle", "rl"):  # and decoded with MBR too
        assert f"--output {out / f'val.{phase}.mbr.de'} --mbr 4 --mbr_utility chrf" in proc.stdout
        assert 0 <= again[f"{phase}_val_mbr"] <= 100 and 0 <= again[f"{phase}_test_2016_flickr_mbr"] <= 100
    assert again["mle_valid_bleu_per_epoch"] == results["transformer.tok"]["mle_valid_bleu_per_epoch"]
    # the MLE control: MLE alone on RL's pairs from the same checkpoint, at RL's rate and batch size
    control = next(line for line in proc.stdout.splitlines() if "--model_fn " + str(out / "control.pth") in line
                   and line.startswith("$ python continue_train.py"))
    assert f"--load_fn {out / 'mle.avg.pth'} " in control and f"--train {out / 'rl_train'} " in control
    assert control.endswith("--n_epochs 1 --early_stop 2 --warmup_steps 0 --lr_step 0 --lr 1e-4 --batch_size 32 "
                            "--max_tokens 0")
    assert len(again["control_valid_bleu_per_epoch"]) == 1
    # the length-penalty control: the best of the penalties on validation decodes test and validation
    assert again["mle_lp_alpha"] == max(again["mle_lp_val_bleu_by_alpha"], key=again["mle_lp_val_bleu_by_alpha"].get)
    assert f"--output {out / 'test_2016_flickr.mle_lp.de'} --beam_size 5 --length_penalty {again['mle_lp_alpha']}" \
        in proc.stdout
    # every decoding's chrF, brevity penalty and length ratio are sacrebleu's, and the p-values its paired bootstrap's
    hyps = (out / "val.control.de").read_text(encoding="utf-8").splitlines()
    refs = (data / "tok" / "val.lc.norm.tok.de").read_text(encoding="utf-8").splitlines()
    bleu = sacrebleu.BLEU(tokenize="none").corpus_score(hyps, [refs])
    assert again["control_val"] == round(bleu.score, 2) and again["control_val_bp"] == round(bleu.bp, 3)
    assert again["control_val_chrf"] == round(sacrebleu.CHRF().corpus_score(hyps, [refs]).score, 2)
    for phase in ("rl", "control", "mle_lp"):
        for split in ("test_2016_flickr", "val"):
            assert set(again[f"{phase}_{split}_p"]) == {"bleu", "chrf"}
            assert all(0 < p <= 1 for p in again[f"{phase}_{split}_p"].values())
    assert all(0 < p <= 1 for p in again["rl_val_p_control"].values())
    table = (work / "results.md").read_text()
    assert "| transformer.tok | control | val |" in table and "| transformer.tok | mle_lp | test_2016_flickr |" in table


def test_the_language_pair_is_an_option_and_nothing_assumes_english_german(tmp_path: Path) -> None:
    data, work = multi30k_like(tmp_path / "data", langs=("fr", "cs")), tmp_path / "work"
    proc = recipe(str(data), "--lang", "frcs", "--profile", "smoke", "--models", "transformer", "--protocols", "tok",
                  "--workdir", str(work), "--mle_options", "--n_epochs 1", "--rl_sentences", "20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ".en" not in proc.stdout and ".de" not in proc.stdout and "ende" not in proc.stdout
    out = work / "transformer.tok"
    assert load_checkpoint(out / "rl.pth")["meta"]["config"]["lang"] == "frcs"
    row = json.loads((work / "results.json").read_text())["transformer.tok"]
    refs = (data / "tok" / "val.lc.norm.tok.cs").read_text(encoding="utf-8").splitlines()
    hyps = (out / "val.rl.cs").read_text(encoding="utf-8").splitlines()
    assert row["rl_val"] == round(sacrebleu.corpus_bleu(hyps, [refs], tokenize="none").score, 2)
    assert (out / "rl_train.fr").is_file() and (out / "rl_train.cs").is_file()
    # --resume goes on from the last epoch checkpoint (an exact resume), and the curve keeps the epochs before it
    proc = recipe(str(data), "--lang", "frcs", "--profile", "smoke", "--models", "transformer", "--protocols", "tok",
                  "--workdir", str(work), "--mle_options", "--n_epochs 2", "--rl_sentences", "20", "--resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"$ python continue_train.py --load_fn {out / 'mle.epoch1.pth'} --model_fn {out / 'mle.pth'}" in proc.stdout
    resumed = json.loads((work / "results.json").read_text())["transformer.tok"]
    assert resumed["mle_resumed_from"] == "mle.epoch1.pth" and (out / "mle.epoch2.pth").is_file()
    assert resumed["mle_valid_bleu_per_epoch"][0] == row["mle_valid_bleu_per_epoch"][0]
    assert len(resumed["mle_valid_bleu_per_epoch"]) == 2
    trainer = load_checkpoint(out / "mle.epoch2.pth")["trainer"]
    assert trainer["iteration"] == 2 * trainer["epoch_length"]
    proc = recipe(str(data), "--lang", "french", "--workdir", str(work))
    assert proc.returncode == 2 and "--lang must be two 2-letter codes such as 'ende', got 'french'" in proc.stderr


def test_rl_only_without_an_mle_run_names_the_model(tmp_path: Path) -> None:
    data = multi30k_like(tmp_path / "data")
    proc = recipe(str(data), "--profile", "smoke", "--protocols", "tok", "--models", "seq2seq",
                  "--workdir", str(tmp_path / "empty"), "--rl_only")
    assert proc.returncode == 1
    assert "--rl_only: no MLE run of seq2seq.tok" in proc.stderr


def test_every_profile_sets_what_its_runs_read_and_a_model_without_settings_is_named(tmp_path: Path) -> None:
    module = recipe_module()
    for name, profile in module.PROFILES.items():
        assert {"common", "transformer", "seq2seq", "rl", "rl_sentences"} <= profile.keys(), name
        for model in ("transformer", "seq2seq"):  # what train.py is given makes a config (sizes that fit included)
            given = vars(train_parser().parse_args(["--model_fn", "m.pth", *profile["common"], *profile[model],
                                                    *profile["rl"], *profile.get(f"rl_{model}", [])]))
            config = Config.from_dict(given)
            build_model(config.replace(spm_vocab_size=0), 100, 100 if config.joint_vocab else 90)
    # the strong profile: the published Transformer-tiny's shape, a joint vocabulary, every embedding shared
    strong = module.PROFILES["strong"]
    config = Config.from_dict(vars(train_parser().parse_args(["--model_fn", "m.pth", *strong["common"],
                                                              *strong["transformer"]])))
    sizes = config.n_layers, config.hidden_size, config.n_splits, config.ffn_size, config.dropout
    assert sizes == (4, 128, 4, 256, 0.3)
    assert config.joint_vocab and config.tie_embeddings and strong["average"] > 1
    # the converged profile's RL is the setting for converged checkpoints: a KL penalty, over all pairs
    converged = module.PROFILES["converged"]
    assert converged["rl_sentences"] == 0
    assert "--rl_kl_weight" in converged["rl_transformer"] and "--rl_kl_weight" in converged["rl_seq2seq"]
    # the cpu profile runs in bf16 on a GPU and on a CPU with bf16 products, in fp32 on a CPU without
    native = module.cpu_has_native("bf16")
    assert module.profile_precision(module.PROFILES["cpu"], "-1") == ("bf16" if native else "fp32")
    assert module.profile_precision(module.PROFILES["cpu"], "0") == "bf16"
    module.cpu_has_native = lambda name: False
    assert module.profile_precision(module.PROFILES["cpu"], "-1") == "fp32"
    assert module.profile_precision(module.PROFILES["smoke"], "-1") == "auto"
    proc = recipe(str(multi30k_like(tmp_path / "data")), "--profile", "converged", "--models", "marian",
                  "--workdir", str(tmp_path / "work"))
    assert proc.returncode == 2
    assert "--models: the converged profile has no settings for marian" in proc.stderr


def test_paired_p_values_are_sacrebleus_and_an_output_identical_to_the_baseline_gets_p_1(tmp_path: Path) -> None:
    from sacrebleu.significance import PairedTest

    module = recipe_module()
    refs, base = make_corpus(40, seed=3)[1], make_corpus(40, seed=4)[1]
    other = [line if i % 3 else ref for i, (line, ref) in enumerate(zip(base, refs))]  # a third of them right
    files = {}
    for name, lines in (("ref", refs), ("base", base), ("same", base), ("other", other)):
        files[name] = tmp_path / name
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    p = module.paired_p_values(files["base"], {"same": files["same"], "other": files["other"]}, files["ref"], "tok")
    assert list(p) == ["same", "other"] and p["same"] == {"bleu": 1.0, "chrf": 1.0}
    # the other system's are sacrebleu's own (its bootstrap has a fixed seed)
    _, results = PairedTest([("baseline", base), ("other", other)], module.metrics("tok"), [refs], test_type="bs",
                            n_samples=1000)()
    theirs = [column[1].p_value for key, column in results.items() if key != "System"]
    assert [p["other"]["bleu"], p["other"]["chrf"]] == [round(v, 4) for v in theirs]
    assert p["other"]["bleu"] < 0.05  # a third of the lines made right is a real difference
    # sacrebleu alone gives the identical output its smallest p-value, which is what p = 1 replaces
    _, alone = PairedTest([("baseline", base), ("same", base)], module.metrics("tok"), [refs], test_type="bs",
                          n_samples=1000)()
    assert all(column[1].p_value < 0.01 for key, column in alone.items() if key != "System")
