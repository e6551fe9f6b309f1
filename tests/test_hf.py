"""Hugging Face encoder-decoders through the adapter, against transformers' own forward and generate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from hf_tiny import KINDS, TGT_LANG, make_model, make_tokenizer, vocabulary

from simple_nmt.config import default_config
from simple_nmt.data import collate
from simple_nmt.hf import HuggingFaceError, HuggingFaceModel
from simple_nmt.rl_trainer import MinimumRiskTrainingEngine, after_eos, sequence_log_probs, strip_eos

transformers = pytest.importorskip("transformers")


def adapter(kind: str, seed: int = 0) -> HuggingFaceModel:
    return HuggingFaceModel(make_model(kind, seed), make_tokenizer(kind)).eval()


def sources(model: HuggingFaceModel, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sources of different lengths, as the tokenizer makes them (ending in EOS), padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    field, _ = model.fields()
    words = [t for t in vocabulary_of(model) if t.startswith("w")]
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (length,), generator=g))
             for length in (5, 3, 4, 6)[:n]]
    batch = collate([(0, field.to_ids(line), []) for line in lines], model.special_ids)
    return batch["src"], batch["src_lengths"]


def vocabulary_of(model: HuggingFaceModel) -> list[str]:
    return model.tokenizer.convert_ids_to_tokens(list(range(len(model.tokenizer))))


def attention_mask(src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return (torch.arange(src.size(1))[None, :] < lengths[:, None]).long()


class Forbid(transformers.LogitsProcessor):
    """What the library's searches do: never emit ``ids`` (PAD, BOS), from the first free position on."""

    def __init__(self, ids: list[int], start: int):
        self.ids, self.start = ids, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.size(1) >= self.start:
            scores[:, self.ids] = float("-inf")
        return scores


def generate(model: HuggingFaceModel, src: torch.Tensor, lengths: torch.Tensor, max_length: int, **kwargs):
    """``model.generate`` under the library's conventions, and the offset of the first output token."""
    ids, start = model.special_ids, 1 + len(model.prefix)
    out = model.hf.generate(input_ids=src, attention_mask=attention_mask(src, lengths),
                            max_new_tokens=max_length + len(model.prefix),
                            logits_processor=transformers.LogitsProcessorList([Forbid([ids.pad, ids.bos], start)]),
                            **kwargs)
    return out, start


def cut(rows: list[list[int]], model: HuggingFaceModel) -> list[list[int]]:
    """Id lists up to their first EOS, without PAD."""
    eos, pad = model.special_ids.eos, model.special_ids.pad
    return [[i for i in (row[: row.index(eos)] if eos in row else row) if i != pad] for row in rows]


def test_special_ids_are_the_models_own():
    marian, t5, mbart, bart = (adapter(kind).special_ids for kind in KINDS)
    assert (bart.pad, bart.bos, bart.eos) == (1, 0, 2)  # BART's forced <s> has id 0
    v = len(vocabulary("marian"))
    assert (marian.pad, marian.unk, marian.bos, marian.eos) == (v - 1, 1, v - 1, 0)
    assert (t5.pad, t5.unk, t5.bos, t5.eos) == (0, 2, 0, 1)
    mbart_model = adapter("mbart")
    assert (mbart.pad, mbart.unk, mbart.eos) == (1, 3, 2)
    assert mbart.bos == mbart_model.tokenizer.convert_tokens_to_ids(TGT_LANG)
    assert mbart_model.prefix.tolist() == [2]  # the decoder start (EOS) before the language token


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_decoding_equals_the_teacher_forced_forward(kind):
    model = adapter(kind)
    src, lengths = sources(model)
    tgt = torch.randint(3, 20, (src.size(0), 6))
    tgt[:, 0] = model.special_ids.bos
    full = model(src, lengths, tgt)  # |full| = (batch_size, 6, vocab_size)
    state, steps = model.encode(src, lengths), []
    for t in range(tgt.size(1)):
        log_probs, state = model.decode_step(tgt[:, t], state)
        steps.append(log_probs)
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # and the forward is transformers' own, fed the decoder start token(s) before BOS
    decoder_in = torch.cat([model.prefix.expand(len(tgt), -1), tgt], dim=1)
    own = model.hf(input_ids=src, attention_mask=attention_mask(src, lengths), decoder_input_ids=decoder_in).logits
    torch.testing.assert_close(full, own[:, len(model.prefix):].log_softmax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_state_decoded_twice_gives_the_same_step(kind):
    model = adapter(kind)
    src, lengths = sources(model)
    state = model.encode(src, lengths)
    _, state = model.decode_step(torch.full((len(src),), model.special_ids.bos), state)
    first, _ = model.decode_step(torch.full((len(src),), 5), state)
    again, _ = model.decode_step(torch.full((len(src),), 5), state)  # the state is not changed by a step
    other, _ = model.decode_step(torch.full((len(src),), 6), state)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_search_equals_generate(kind):
    model = adapter(kind)
    src, lengths = sources(model)
    ids, _ = model.search(src, lengths, is_greedy=True, max_length=10)
    out, start = generate(model, src, lengths, 10, do_sample=False, num_beams=1)
    assert cut(ids.tolist(), model) == cut(out[:, start:].tolist(), model)
    # beam size 1 is greedy decoding too
    hyps, _ = model.batch_beam_search(src, lengths, beam_size=1, max_length=10)
    assert [h[0] for h in hyps] == [[t for t in row if t != model.special_ids.pad] for row in ids.tolist()]


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_equals_generate_while_no_hypothesis_ends(kind):
    """The conventions differ once hypotheses end: transformers keeps ``num_beams`` open hypotheses beside
    its finished ones; the library's finished hypotheses stay in the beam (extended by PAD at no cost,
    so that beam size 1 is greedy). With EOS ruled out both keep the k best of k x V candidates at
    every step, and must agree on the hypotheses and their log-probabilities."""
    model = adapter(kind)
    eos = model.special_ids.eos
    model.hf.get_output_embeddings().register_forward_hook(lambda m, i, out: out.index_fill(-1, torch.tensor([eos]),
                                                                                             -1e4))
    src, lengths = sources(model)
    hyps, scores = model.batch_beam_search(src, lengths, beam_size=3, max_length=7, length_penalty=0.0, n_best=3)
    out, start = generate(model, src, lengths, 7, do_sample=False, num_beams=3, num_return_sequences=3,
                          length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    expected = out.sequences[:, start:].reshape(len(src), 3, -1).tolist()
    assert hyps == expected
    torch.testing.assert_close(scores, out.sequences_scores.view(len(src), 3), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_log_probs_equal_a_teacher_forced_pass(kind):
    model = adapter(kind)
    src, lengths = sources(model)
    torch.manual_seed(1)
    ids, log_probs = model.search(src, lengths, is_greedy=False, max_length=8, n_samples=4)
    assert ids.shape[0] == 4 * len(src)
    torch.testing.assert_close(log_probs.sum(dim=1), sequence_log_probs(model, src, lengths, ids),
                               atol=1e-4, rtol=1e-5)


def test_sampling_draws_from_the_models_distribution():
    """The first sampled token's frequencies match the model's probabilities (a chi-square-sized tolerance)."""
    model = adapter("marian")
    src, lengths = sources(model, n=1)
    torch.manual_seed(2)
    ids, _ = model.search(src, lengths, is_greedy=False, max_length=1, n_samples=4000)
    log_probs, _ = model.decode_step(torch.tensor([model.special_ids.bos]), model.encode(src, lengths))
    p = log_probs[0].detach().exp()
    p[[model.special_ids.pad]] = 0.0
    p /= p.sum()
    freq = torch.bincount(ids[:, 0], minlength=p.numel()).float() / ids.size(0)
    assert float((freq - p).abs().max()) < 4 * float((p * (1 - p) / ids.size(0)).sqrt().max()) + 1e-3


class Recording(MinimumRiskTrainingEngine):
    def sample(self, *args, **kwargs):
        self.samples = super().sample(*args, **kwargs)
        return self.samples


@pytest.mark.parametrize("kind", KINDS)
def test_an_rl_step_gradient_equals_the_reinforce_formula(kind):
    """The engine's loss gradient against -(r_0 - mean(r_1..K)) * log P(y_0), log P from transformers' own
    forward on the same samples."""
    torch.manual_seed(0)
    model = adapter(kind)
    w3 = model.tokenizer.convert_tokens_to_ids("w3")

    def count_w3(hyps: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        return (hyps == w3).sum(dim=1).float()

    src, lengths = sources(model)
    batch = collate([(0, row[: int(n)].tolist(), [5, 6]) for row, n in zip(src, lengths)], model.special_ids)
    config = default_config(max_length=6, rl_n_samples=3, max_grad_norm=0.0, dropout=0.0)
    engine = Recording(model, torch.optim.SGD(model.parameters(), lr=0.1), config, reward=count_w3)
    loss, _ = engine.compute_loss(batch)
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    ids = engine.samples  # |ids| = (batch_size * 4, length)
    rewards = count_w3(strip_eos(ids, model.special_ids), None).view(len(src), 4)
    advantage = rewards[:, 0] - rewards[:, 1:].mean(dim=1)
    actors = ids.view(len(src), 4, -1)[:, 0]
    specials = model.special_ids
    decoder_in = torch.cat([model.prefix.expand(len(actors), -1), torch.full_like(actors[:, :1], specials.bos),
                            actors[:, :-1]], dim=1)
    logits = model.hf(input_ids=src, attention_mask=attention_mask(src, lengths), decoder_input_ids=decoder_in).logits
    token_log_probs = logits[:, len(model.prefix):].log_softmax(-1).gather(2, actors[:, :, None]).squeeze(2)
    counted = ~after_eos(actors, specials.eos) & (actors != specials.pad)
    expected_loss = -(advantage * (token_log_probs * counted).sum(dim=1)).mean()
    expected_loss.backward()
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    assert got.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_loads_back_in_plain_transformers(kind, tmp_path):
    model = adapter(kind)
    with torch.no_grad():  # weights of its own, so that the saved ones are these
        next(model.parameters()).add_(0.1)
    model.save_pretrained(tmp_path / "m.hf")
    model.save_pretrained(tmp_path / "m.hf")  # writing over a complete folder
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m.hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "m.hf")
    src, lengths = sources(model)
    decoder_in = torch.full((len(src), 3), 5)
    kwargs = {"input_ids": src, "attention_mask": attention_mask(src, lengths), "decoder_input_ids": decoder_in}
    torch.testing.assert_close(loaded(**kwargs).logits, model.hf(**kwargs).logits)
    assert tokenizer("w1 w2")["input_ids"] == model.tokenizer("w1 w2")["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.hf"]  # no temporary folder left
    # what training changes is what the folder keeps (from_pretrained makes Marian's fixed positions trainable)
    again = HuggingFaceModel(loaded, tokenizer)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "m.hf" / "model.safetensors").keys()
    trainable = {name.removeprefix("hf.") for name, p in again.named_parameters() if p.requires_grad}
    assert trainable <= set(saved) | set(loaded._tied_weights_keys or {})


def test_checkpoint_meta_rebuilds_the_model_and_tokenizer():
    model = adapter("mbart")
    rebuilt = HuggingFaceModel.from_checkpoint_meta(model.checkpoint_meta()["hf"])
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    src, lengths = sources(model)
    assert rebuilt.special_ids == model.special_ids
    torch.testing.assert_close(rebuilt.search(src, lengths, max_length=6)[1], model.search(src, lengths,
                                                                                          max_length=6)[1])


def test_translate_raw_text():
    model = adapter("marian")
    lines = ["w1 w2 w3", "w4"]
    out = model.translate(lines, beam_size=1, max_length=5)
    src, lengths = sources(model, n=1)
    field_src, field_tgt = model.fields()
    batch = collate([(0, field_src.to_ids(line), []) for line in lines], model.special_ids)
    ids, _ = model.search(batch["src"], batch["src_lengths"], max_length=5)
    assert out == [field_tgt.to_text(row) for row in ids.tolist()]
    assert all(isinstance(line, str) for line in out)


def test_a_model_that_starts_from_eos_needs_its_target_language():
    hf = make_model("mbart")
    hf.generation_config.forced_bos_token_id = None
    with pytest.raises(HuggingFaceError, match="tgt_lang"):
        HuggingFaceModel(hf)
    model = HuggingFaceModel(hf, make_tokenizer("mbart"), tgt_lang=TGT_LANG)
    assert model.special_ids.bos == model.tokenizer.convert_tokens_to_ids(TGT_LANG)
    with pytest.raises(HuggingFaceError, match="not a token"):
        HuggingFaceModel(hf, make_tokenizer("mbart"), tgt_lang="xx_YY")


def test_nothing_is_downloaded(tmp_path):
    with pytest.raises(HuggingFaceError, match="not a local Hugging Face model folder"):
        HuggingFaceModel.from_pretrained("Helsinki-NLP/opus-mt-en-de-surely-not-cached")
    with pytest.raises(HuggingFaceError, match="not a local"):
        HuggingFaceModel.from_pretrained(tmp_path / "missing")


def test_the_library_does_not_import_transformers_unless_asked():
    code = ("import sys, simple_nmt.cli, simple_nmt.hf, simple_nmt.rl_trainer; "
            "assert 'transformers' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# The command line: continue_train.py --hf_model and translate.py --hf_model


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A tiny Marian model and tokenizer saved with save_pretrained, and a word-copying corpus in its words."""
    from conftest import run_in_process

    root = tmp_path_factory.mktemp("hf")
    model = HuggingFaceModel(make_model("marian", std=0.1), make_tokenizer("marian"))
    model.save_pretrained(root / "start")
    g = torch.Generator().manual_seed(0)
    words = [t for t in vocabulary("marian") if t.startswith("w")]
    for split, n in (("train", 120), ("valid", 12)):
        lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(torch.randint(2, 6, (1,),
                 generator=g)),), generator=g)) for _ in range(n)]
        (root / f"{split}.en").write_text("\n".join(lines) + "\n")
        (root / f"{split}.de").write_text("\n".join(lines) + "\n")
    common = ["--train", str(root / "train"), "--valid", str(root / "valid"), "--lang", "ende", "--batch_size", "16",
              "--optimizer", "adam", "--lr", "3e-3", "--rl_lr", "1e-4", "--rl_n_samples", "2", "--max_length", "12",
              "--verbose", "1"]
    out = run_in_process("continue_train.py", "--hf_model", str(root / "start"), "--model_fn",
                         str(root / "out" / "m.pth"), "--n_epochs", "2", "--rl_n_epochs", "1", *common)
    return root, common, out


def test_continue_train_fine_tunes_a_hugging_face_model_with_mle_then_rl(hf_run):
    root, _, out = hf_run
    names = sorted(p.name for p in (root / "out").iterdir())
    assert {"m.pth", "m.epoch1.pth", "m.epoch2.pth", "m.hf", "m.rl.pth", "m.rl.epoch1.pth", "m.rl.hf"} <= set(names)
    assert "m.hf: the best weights, with save_pretrained" in out.stdout
    from simple_nmt.checkpoint import load_checkpoint

    best = load_checkpoint(root / "out" / "m.pth")
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(root / "out" / "m.hf")
    weights = {k.removeprefix("hf."): v for k, v in best["model"].items()}
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, weights[name], msg=name)
    assert "config.json" in best["meta"]["hf"] and best["meta"]["config"]["phase"] == "mle"


def test_translate_hf_model_folder_and_checkpoint_agree_with_transformers(hf_run):
    from conftest import run_in_process

    root, _, _ = hf_run
    lines = "w1 w2 w3\nw4 w5\n\nw6\n"
    by_folder = run_in_process("translate.py", "--hf_model", str(root / "out" / "m.rl.hf"), "--beam_size", "1",
                               "--max_length", "12", stdin=lines).stdout
    by_checkpoint = run_in_process("translate.py", "--model_fn", str(root / "out" / "m.rl.pth"), "--beam_size", "1",
                                   "--max_length", "12", stdin=lines).stdout
    assert by_folder == by_checkpoint
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(root / "out" / "m.rl.hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "out" / "m.rl.hf")
    expected = []
    for line in lines.splitlines():
        if not line:
            expected.append("")
            continue
        ids = model.generate(**tokenizer([line], return_tensors="pt"), do_sample=False, num_beams=1,
                             max_new_tokens=12, bad_words_ids=[[tokenizer.pad_token_id]])
        expected.append(tokenizer.decode(ids[0], skip_special_tokens=True).strip())
    assert by_folder.splitlines() == expected


def test_an_hf_checkpoint_resumes_and_continues(hf_run):
    from conftest import run_in_process

    root, common, _ = hf_run
    out = run_in_process("continue_train.py", "--load_fn", str(root / "out" / "m.epoch1.pth"), "--model_fn",
                         str(root / "resumed" / "m.pth"), "--n_epochs", "2", "--verbose", "1")
    epochs = [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 2", "epoch 1"]  # the MLE phase's second epoch, then the checkpoint's RL epoch
    assert (root / "resumed" / "m.hf" / "config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--hf_model", "no/such/model"], "--hf_model no/such/model: not a local Hugging Face model folder"),
    ([], "give --n_epochs N (MLE) and/or --rl_n_epochs N (RL)"),
    (["--max_length", "80"], "--max_length 80: MarianMTModel decodes at most 64 tokens"),
])
def test_hf_command_line_errors_are_one_line(hf_run, args, message):
    from conftest import run_in_process

    root, common, _ = hf_run
    if "--hf_model" not in args:
        args = ["--hf_model", str(root / "start"), *args]
    if "--n_epochs" not in message:
        args += ["--n_epochs", "1"]
    out = run_in_process("continue_train.py", "--model_fn", str(root / "err" / "m.pth"), *common, *args, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr
    assert not (root / "err").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_under_cpu_autocast_gives_float32_log_probs_of_its_logits(kind):
    """Under CPU bf16 autocast a step's log-probs are the float32 log-softmax of the model's logits, as the
    library's models give them. T5's logits stay bf16 there (no bias, no cast in transformers), and a bf16
    log-softmax would round every log-prob to 8 bits."""
    model = adapter(kind)
    src, lengths = sources(model)
    bos = torch.full((len(src), 1), model.special_ids.bos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_probs, _ = model.decode_step(bos[:, 0], model.encode(src, lengths))
        logits = model.hf(input_ids=src, attention_mask=attention_mask(src, lengths),
                          decoder_input_ids=torch.cat([model.prefix.expand(len(src), -1), bos], dim=1)).logits[:, -1]
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs, logits.float().log_softmax(-1))
    if kind == "t5":
        assert logits.dtype == torch.bfloat16
