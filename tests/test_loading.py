"""``simple_nmt.load`` and what a research script meets around it: a checkpoint's config that builds its
model, the settings an engine records, resumes that fit (or are refused in one line before the first step),
and mistakes refused when the engine, its handlers or validation are set up."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY, run_main, toy_data, with_handlers
from torch.utils.data import DataLoader

import simple_nmt
from simple_nmt import cli, trainer
from simple_nmt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from simple_nmt.config import default_config
from simple_nmt.data import ParallelDataset, SpecialIds, collate
from simple_nmt.models import build_model
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine
from simple_nmt.trainer import MaximumLikelihoodEstimationEngine, build_optimizer, build_scheduler


def train_one_epoch(toy_dir, model_fn, make_optimizer=None, freeze=(), engine_class=MaximumLikelihoodEstimationEngine,
                    **options):
    """A tiny Transformer trained for one epoch from Python, with the handlers' checkpoints."""
    fields, train, valid, references = toy_data(toy_dir)
    config = default_config(**TINY["transformer"], verbose=0, max_length=30, train=str(toy_dir / "train"),
                            valid=str(toy_dir / "valid"), **options)
    torch.manual_seed(0)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    for name, param in model.named_parameters():
        if name.startswith(freeze):
            param.requires_grad_(False)
    optimizer = (make_optimizer or (lambda params: torch.optim.Adam(params, lr=3e-3)))(
        [p for p in model.parameters() if p.requires_grad])
    engine = engine_class(model, optimizer, config, tgt_field=fields[1])
    with_handlers(engine, config, fields, valid, references, model_fn)
    engine.run(train, max_epochs=1)
    return engine


def test_load_translates_as_translate_py_does(tiny_checkpoint):
    loaded = simple_nmt.load(tiny_checkpoint)
    lines = ["a dog sees the cat", "", "the cat runs"]
    out = run_main(cli.main_translate, "--model_fn", str(tiny_checkpoint), "--beam_size", "3",
                   stdin="".join(line + "\n" for line in lines)).stdout
    assert loaded.translate(lines, beam_size=3) == out.split("\n")[:-1]
    assert loaded.translate(lines, beam_size=3)[1] == ""
    n_best = loaded.translate(lines, beam_size=3, n_best=2)
    assert [len(h) for h in n_best] == [2, 2, 2] and n_best[1] == ["", ""]
    assert [h[0] for h in n_best] == loaded.translate(lines, beam_size=3)
    assert loaded.config.use_transformer and loaded.config.hidden_size == 32 and loaded.checkpoint is not None
    with pytest.raises(ValueError, match="beam_size: must be >= 1"):
        loaded.translate(lines, beam_size=0)


def test_a_checkpoints_stored_config_builds_its_model(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    loaded = simple_nmt.load(tiny_checkpoint)
    model = build_model(checkpoint["meta"]["config"], len(loaded.src_field), len(loaded.tgt_field))
    model.load_state_dict(checkpoint["model"])  # the same architecture: the weights fit
    assert type(model) is type(loaded.model)


def test_load_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path):
    (tmp_path / "x.pth").write_text("not a checkpoint")
    for path in (tmp_path / "x.pth", tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError) as error:
            simple_nmt.load(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_records_the_optimizer_and_rate_that_ran(toy_dir, tmp_path):
    # the config's default optimizer is SGD: an Adam given in Python is what the checkpoint must say
    train_one_epoch(toy_dir, tmp_path / "m.pth")
    stored = load_checkpoint(tmp_path / "m.epoch1.pth")["meta"]["config"]
    assert stored["optimizer"] == "adam" and stored["lr"] == pytest.approx(3e-3)
    proc = run_main(cli.main_continue, "--load_fn", str(tmp_path / "m.epoch1.pth"), "--model_fn",
                    str(tmp_path / "more.pth"), "--n_epochs", "2", "--verbose", "1")
    assert "epoch 2: loss=" in proc.stdout


@pytest.mark.parametrize("how", ["requires_grad", "left out of the optimizer"])
def test_an_optimizer_over_the_trainable_parameters_only_resumes(toy_dir, tmp_path, how):
    if how == "requires_grad":
        engine = train_one_epoch(toy_dir, tmp_path / "m.pth", freeze=("encoder",))
        frozen = {name for name, p in engine.raw_model.named_parameters() if not p.requires_grad}
    else:
        engine = train_one_epoch(toy_dir, tmp_path / "m.pth", make_optimizer=lambda params: torch.optim.Adam(
            [p for p in params if p.dim() > 1], lr=3e-3))  # biases and norms stay as they are
        frozen = {name for name, p in engine.raw_model.named_parameters() if p.dim() == 1}
    checkpoint = load_checkpoint(tmp_path / "m.epoch1.pth")
    assert frozen and set(checkpoint["meta"]["frozen"]) == frozen
    run_main(cli.main_continue, "--load_fn", str(tmp_path / "m.epoch1.pth"), "--model_fn",
             str(tmp_path / "more.pth"), "--n_epochs", "2", "--verbose", "0")
    resumed = load_checkpoint(tmp_path / "more.epoch2.pth")
    for name in frozen:  # still frozen: their weights did not move
        torch.testing.assert_close(resumed["model"][name], checkpoint["model"][name])
    assert set(resumed["meta"]["frozen"]) == frozen


def test_an_optimizer_state_of_another_kind_is_refused_before_the_first_step(toy_dir, tmp_path):
    train_one_epoch(toy_dir, tmp_path / "m.pth")
    checkpoint = load_checkpoint(tmp_path / "m.epoch1.pth")
    checkpoint["meta"]["config"]["optimizer"] = "sgd"  # as the checkpoints of earlier versions said
    save_checkpoint(checkpoint, tmp_path / "said_sgd.pth")
    proc = run_main(cli.main_continue, "--load_fn", str(tmp_path / "said_sgd.pth"), "--model_fn",
                    str(tmp_path / "x.pth"), "--n_epochs", "2", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {tmp_path / 'said_sgd.pth'}: its optimizer state is not sgd's")
    assert not (tmp_path / "x.epoch2.pth").exists()


def test_an_engine_refuses_to_resume_optimizer_state_of_another_kind_before_restoring_anything(toy_dir, tmp_path):
    train_one_epoch(toy_dir, tmp_path / "m.pth")  # Adam
    checkpoint = load_checkpoint(tmp_path / "m.epoch1.pth")
    fields, *_ = toy_data(toy_dir)
    model = build_model(checkpoint["meta"]["config"], len(fields[0].vocab), len(fields[1].vocab))
    engine = MaximumLikelihoodEstimationEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                               default_config(**TINY["transformer"]), tgt_field=fields[1])
    before = copy.deepcopy(engine.optimizer.state_dict())
    with pytest.raises(ValueError, match=r"its optimizer state is not sgd's \(it has no momentum, nesterov\)"):
        engine.resume(checkpoint)
    assert engine.optimizer.state_dict() == before and engine.state.epoch == 0


def tiny_engine(toy_dir, engine_class=MaximumLikelihoodEstimationEngine, scheduler=False, **options):
    fields, *_ = toy_data(toy_dir, n_train=10)
    config = default_config(**TINY["transformer"], **options)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = build_scheduler(optimizer, config, 10, phase=engine_class.phase) if scheduler else None
    return engine_class(model, optimizer, config, sched, tgt_field=fields[1])


@pytest.mark.parametrize("engine_class,options,message", [
    (MinimumRiskTrainingEngine, {"rl_lr": 1e-4}, "config rl_lr=0.0001 but the optimizer's learning rate is 0.001"),
    (MaximumLikelihoodEstimationEngine, {"lr": 0.5}, "config lr=0.5 but the optimizer's learning rate is 0.001"),
    (MaximumLikelihoodEstimationEngine, {"warmup_steps": 100}, "config warmup_steps=100 needs a scheduler"),
    (MinimumRiskTrainingEngine, {"rl_warmup_steps": 5}, "config rl_warmup_steps=5 needs a scheduler"),
])
def test_a_config_value_the_engine_would_not_apply_is_refused(toy_dir, engine_class, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_engine(toy_dir, engine_class, **options)


def test_a_config_value_the_engine_applies_is_recorded(toy_dir):
    engine = tiny_engine(toy_dir, MinimumRiskTrainingEngine, scheduler=True, rl_warmup_steps=5)
    assert engine.config.rl_lr == pytest.approx(1e-3) and engine.config.optimizer == "adam"


def test_handlers_and_validation_refuse_what_they_cannot_use(toy_dir, tmp_path):
    fields, train, valid, references = toy_data(toy_dir, n_train=10)
    config = default_config(**TINY["transformer"], verbose=0, max_length=30)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    optimizer = build_optimizer(model, config)

    def attach(engine, refs):
        with_handlers(engine, config, fields, valid, refs, tmp_path / "m.pth")

    with pytest.raises(ValueError, match="has no tgt_field.*tgt_field="):
        attach(MaximumLikelihoodEstimationEngine(model, optimizer, config), references)
    engine = MaximumLikelihoodEstimationEngine(model, optimizer, config, tgt_field=fields[1])
    with pytest.raises(ValueError, match=f"valid_references has {len(references) - 1} lines for "
                                         f"{len(references)} validation examples"):
        attach(engine, references[:-1])
    with pytest.raises(ValueError, match=f"validate: {len(references) - 1} references for the {len(references)}"):
        engine.validate(valid, references[:-1])
    shifted = DataLoader(ParallelDataset([[4]] * 3, [[4]] * 3), batch_size=3,
                         collate_fn=lambda examples: collate([(i + 5, s, t) for i, s, t in examples]))
    with pytest.raises(ValueError, match=r"3 references for the 3 examples whose index runs 5\.\.7"):
        engine.validate(shifted, ["a", "b", "c"])


def test_a_batch_collated_with_other_special_ids_is_refused_at_the_first_step(toy_dir):
    fields, train, *_ = toy_data(toy_dir, n_train=10)
    engine = tiny_engine(toy_dir)
    other = SpecialIds(pad=0, unk=1, bos=3, eos=2)
    batch = collate([train.dataset[i] for i in range(4)], other)
    with pytest.raises(ValueError, match="targets start with id 3, not the model's BOS 2"):
        engine.run([batch], max_epochs=1)


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(toy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "PROGRESS_INTERVAL_S", 0.0)
    lines = []
    fields, train, valid, references = toy_data(toy_dir, n_train=100)
    config = default_config(**TINY["transformer"], verbose=2, max_length=30)
    model = build_model(config, len(fields[0].vocab), len(fields[1].vocab))
    engine = MaximumLikelihoodEstimationEngine(model, build_optimizer(model, config), config, tgt_field=fields[1])
    with_handlers(engine, config, fields, valid, references, tmp_path / "m.pth", log=lines.append)
    engine.run(train, max_epochs=1)
    assert [line.split(":")[0] for line in lines[:2]] == ["epoch 1 [1/2]", "epoch 1 [2/2]"]
    assert "loss=" in lines[0] and lines[-1].startswith("epoch 1: loss=")


def test_load_reads_a_hugging_face_folder_and_an_empty_line_stays_empty(tmp_path):
    pytest.importorskip("transformers")
    from hf_tiny import make_model, make_tokenizer

    from simple_nmt.hf import HuggingFaceModel

    # a model that turns a source of EOS alone (what its tokenizer makes of "") into a full-length output
    HuggingFaceModel(make_model("marian", seed=1), make_tokenizer("marian")).save_pretrained(tmp_path / "marian")
    loaded = simple_nmt.load(tmp_path / "marian")
    assert isinstance(loaded.model, HuggingFaceModel) and loaded.checkpoint is None
    lines = ["w1 w2 w3", "", "  ", "w4"]
    outputs = loaded.translate(lines, beam_size=2, max_length=10)
    assert outputs[1:3] == ["", ""] and outputs[0] and outputs[3]
    eos = loaded.model.special_ids.eos
    only_eos = collate([(0, [eos], [])], loaded.model.special_ids)
    hyps, _ = loaded.model.batch_beam_search(only_eos["src"], only_eos["src_lengths"], beam_size=2, max_length=10)
    assert len(hyps[0][0]) == 10
    assert outputs[::3] == loaded.model.translate(lines[::3], beam_size=2, max_length=10)
    out = run_main(cli.main_translate, "--hf_model", str(tmp_path / "marian"), "--beam_size", "2", "--max_length",
                   "10", stdin="".join(line + "\n" for line in lines)).stdout
    assert out.split("\n")[:-1] == outputs
    mbr = loaded.translate(lines, mbr=4, max_length=10)  # a Hugging Face model's samples, too
    assert mbr[1:3] == ["", ""] and mbr[0] and mbr[3]


def test_a_hugging_face_model_trained_on_the_librarys_special_ids_is_refused(toy_dir):
    pytest.importorskip("transformers")
    from hf_tiny import make_model, make_tokenizer

    from simple_nmt.hf import HuggingFaceModel

    model = HuggingFaceModel(make_model("marian"), make_tokenizer("marian"))
    src_field, tgt_field = model.fields()
    assert tgt_field.special_ids == model.special_ids  # what collate must be given
    examples = [(0, src_field.to_ids("w1 w2"), tgt_field.to_ids("w2 w1"))]
    engine = MaximumLikelihoodEstimationEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                                               default_config(verbose=0), tgt_field=tgt_field)
    with pytest.raises(ValueError, match=f"not the model's BOS {model.special_ids.bos}"):
        engine.run([collate(examples)], max_epochs=1)
    engine.run([collate(examples, tgt_field.special_ids)], max_epochs=1)


# Minimum Bayes risk decoding (translate.py --mbr)


def test_mbr_outputs_the_candidates_of_the_highest_expected_utility(tiny_checkpoint):
    from simple_nmt.mbr import mbr_select

    loaded = simple_nmt.load(tiny_checkpoint)
    lines = ["a dog sees the cat", "the old man finds a bird in the park"]
    torch.manual_seed(3)
    out = loaded.translate(lines, mbr=16, n_best=3, epsilon=0.02)
    # the same samples, drawn again from the same seed: the lines are decoded in one batch, shortest first
    torch.manual_seed(3)
    batch = collate([(0, loaded.src_field.to_ids(line), []) for line in lines])
    ids, _ = loaded.model.search(batch["src"], batch["src_lengths"], is_greedy=False, max_length=255, n_samples=16,
                                 epsilon=0.02)
    texts = [loaded.tgt_field.to_text(row) for row in ids.tolist()]
    candidates = [texts[:16], texts[16:]]
    result = mbr_select(candidates)
    assert out == [[c[i] for i in order[:3]] for c, order in zip(candidates, result.ranking())]
    assert [o[0] for o in out] == [c[i] for c, i in zip(candidates, result.selected)]


def test_mbr_from_the_command_line(tiny_checkpoint, tmp_path):
    lines = "a dog sees the cat\n\nthe cat helps a boy\n"
    beam = run_main(cli.main_translate, "--model_fn", str(tiny_checkpoint), "--beam_size", "4", "--n_best", "4",
                    stdin=lines).stdout.split("\n")
    for args in (["--mbr_candidates", "beam"], ["--mbr_utility", "chrf", "--mbr_references", "8"]):
        out = run_main(cli.main_translate, "--model_fn", str(tiny_checkpoint), "--mbr", "4", "--n_best", "2",
                       *args, stdin=lines).stdout.split("\n")
        assert out[1] == "\t" and all(len(line.split("\t")) == 2 for line in out[:3])
        if args[1] == "beam":  # the beam's 4-best, in another order
            assert all(set(o.split("\t")) <= set(b.split("\t")) for o, b in zip(out[:3], beam))
    again = [run_main(cli.main_translate, "--model_fn", str(tiny_checkpoint), "--mbr", "8", "--seed", "4",
                      stdin=lines).stdout for _ in range(2)]
    assert again[0] == again[1]  # the samples follow --seed
    proc = run_main(cli.main_translate, "--model_fn", str(tiny_checkpoint), "--mbr", "2", "--n_best", "3",
                    stdin=lines, check=False)
    assert proc.returncode == 1 and proc.stderr == "error: --n_best 3: --mbr 2 gives 2 candidates per line\n"
