"""Export to CTranslate2 (export_ctranslate2.py) and translation through it (translate.py --ctranslate2): the
folder plain CTranslate2 loads, outputs line for line as translate.py's, the length-penalty convention, the
tied, SentencePiece and Hugging Face models, and what is refused in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_SEQ2SEQ, TINY_TRANSFORMER, run_in_process, run_main
from hf_tiny import make_model, make_tokenizer

import simple_nmt
from simple_nmt import cli
from simple_nmt.checkpoint import load_checkpoint
from simple_nmt.ctranslate2 import SPM_FILES, load_ctranslate2, transformer_spec
from simple_nmt.data import BOS, EOS, PAD, collate
from simple_nmt.hf import HuggingFaceModel
from simple_nmt.search import length_penalty

ctranslate2 = pytest.importorskip("ctranslate2")


def train(toy_dir, model_fn, *extra):
    """A tiny model trained by train.py for two epochs on the toy corpus."""
    run_in_process("train.py", "--model_fn", str(model_fn), "--train", str(toy_dir / "train"), "--valid",
                   str(toy_dir / "valid"), "--max_length", "30", "--verbose", "0", "--optimizer", "adam",
                   "--lr", "3e-3", "--n_epochs", "2", *extra)
    return model_fn


def export(source, output_dir, *extra, flag="--model_fn"):
    run_main(cli.main_export, flag, str(source), "--output_dir", str(output_dir), *extra)
    return output_dir


def translate(flag, path, lines, *extra):
    """translate.py's output lines for ``lines`` (stdin)."""
    out = run_in_process("translate.py", flag, str(path), *extra, stdin="".join(line + "\n" for line in lines))
    return out.stdout.split("\n")[:-1]


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("ct2") / "tiny")


@pytest.fixture(scope="module")
def test_lines(toy_dir):
    lines = (toy_dir / "test.en").read_text().splitlines()
    return [lines[0], "", "   ", *lines[1:], "qwerty unknownword " + lines[2]]


def test_plain_ctranslate2_loads_the_folder_and_translates_as_the_model(exported, tiny_checkpoint, test_lines):
    loaded = simple_nmt.load(tiny_checkpoint)
    lines = [line for line in test_lines if line.strip()]
    translator = ctranslate2.Translator(str(exported))
    results = translator.translate_batch([line.split() for line in lines], beam_size=1, min_decoding_length=0)
    assert [" ".join(r.hypotheses[0]) for r in results] == loaded.translate(lines, beam_size=1)
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "model.bin", "simple_nmt.json", "source_vocabulary.json", "target_vocabulary.json"]


def test_greedy_output_equals_translate_py_line_for_line(exported, tiny_checkpoint, test_lines):
    by_checkpoint = translate("--model_fn", tiny_checkpoint, test_lines, "--beam_size", "1")
    assert translate("--ctranslate2", exported, test_lines, "--beam_size", "1") == by_checkpoint
    assert by_checkpoint[1] == by_checkpoint[2] == "" and all(by_checkpoint[3:])


@pytest.mark.parametrize("options", [["--beam_size", "5"], ["--beam_size", "4", "--length_penalty", "0"],
                                     ["--beam_size", "3", "--max_length_ratio", "0.5"],
                                     ["--beam_size", "3", "--max_length", "4"]],
                         ids=["beam 5", "no length penalty", "length ratio", "max length"])
def test_beam_output_equals_translate_py_line_for_line(exported, tiny_checkpoint, test_lines, options):
    assert translate("--ctranslate2", exported, test_lines, *options) == \
        translate("--model_fn", tiny_checkpoint, test_lines, *options)


def suppressed_log_probs(model, src, src_lengths, hyps):
    """log P(y | x) of EOS-ended id lists, the model's logits of PAD and BOS set to -inf before the softmax
    (as CTranslate2 suppresses them): |src| = (n, src_length), ``hyps[i]`` the outputs of source i -> (n, k)."""
    k = len(hyps[0])
    tgt = torch.nn.utils.rnn.pad_sequence([torch.tensor(h) for per_line in hyps for h in per_line],
                                          batch_first=True)  # |tgt| = (n * k, length), PAD 0 after EOS
    tgt_in = torch.cat([torch.full((tgt.size(0), 1), BOS), tgt[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(src.repeat_interleave(k, 0), src_lengths.repeat_interleave(k, 0), tgt_in, normalize=False)
    logits[..., [PAD, BOS]] = float("-inf")  # |logits| = (n * k, length, vocab_size)
    picked = logits.log_softmax(-1).gather(2, tgt[:, :, None]).squeeze(2).masked_fill(tgt == PAD, 0.0)
    return picked.sum(1).view(-1, k)


def test_n_best_lists_rank_by_the_gnmt_penalty_with_eos_counted(exported, tiny_checkpoint, test_lines):
    """CTranslate2 divides a log-prob by |y| ** alpha (EOS not counted); the n-best lists are ranked by the
    library's ((5 + |y|) / 6) ** alpha, EOS counted, and their scores are the model's log-probs (PAD and BOS
    suppressed before the softmax, where the library sets their log-probs to -inf after it) so divided."""
    model, ct2 = simple_nmt.load(tiny_checkpoint), load_ctranslate2(exported).model
    lines = [line for line in test_lines if line.strip()]
    batch = collate([(0, model.src_field.to_ids(line), []) for line in lines])
    for alpha in (1.0, 0.0):
        hyps, scores = ct2.batch_beam_search(batch["src"], batch["src_lengths"], beam_size=5, n_best=5,
                                             length_penalty=alpha)
        assert all(len(per_line) == 5 and all(h[-1] == EOS for h in per_line) for per_line in hyps)
        assert torch.all(scores[:, :-1] >= scores[:, 1:])
        log_p = suppressed_log_probs(model.model, batch["src"], batch["src_lengths"], hyps)
        lengths = torch.tensor([[len(h) for h in per_line] for per_line in hyps])  # EOS counted
        torch.testing.assert_close(scores, log_p / length_penalty(lengths, alpha), atol=1e-4, rtol=1e-5)


def test_n_best_output_keeps_translate_py_layout(exported, test_lines):
    rows = translate("--ctranslate2", exported, test_lines, "--beam_size", "3", "--n_best", "2")
    assert len(rows) == len(test_lines) and all(len(row.split("\t")) == 2 for row in rows)
    assert rows[1] == rows[2] == "\t"


def test_tied_embeddings_are_exported_once(toy_dir, tmp_path, test_lines):
    model_fn = train(toy_dir, tmp_path / "tied.pth", *TINY_TRANSFORMER, "--tie_embeddings")
    loaded = simple_nmt.load(model_fn)
    spec = transformer_spec(loaded.model, (loaded.src_field, loaded.tgt_field), max_positions=64)
    spec.validate()
    spec.optimize()
    assert spec.decoder.projection.weight == "decoder/embeddings/weight"  # an alias of the target embeddings
    folder = export(model_fn, tmp_path / "tied")
    assert translate("--ctranslate2", folder, test_lines, "--beam_size", "2") == \
        translate("--model_fn", model_fn, test_lines, "--beam_size", "2")


def test_a_joint_vocabulary_model_with_a_narrow_feed_forward_translates_as_the_model(toy_dir, tmp_path, test_lines):
    model_fn = train(toy_dir, tmp_path / "joint.pth", *TINY_TRANSFORMER, "--tie_embeddings", "--joint_vocab",
                     "--ffn_size", "24", "--spm_vocab_size", "80")
    folder = export(model_fn, tmp_path / "joint")
    for beam in ("1", "3"):
        assert translate("--ctranslate2", folder, test_lines, "--beam_size", beam) == \
            translate("--model_fn", model_fn, test_lines, "--beam_size", beam)


def test_sentencepiece_checkpoint_keeps_its_models_beside(toy_dir, tmp_path):
    model_fn = train(toy_dir, tmp_path / "spm.pth", *TINY_TRANSFORMER, "--spm_vocab_size", "60")
    folder = export(model_fn, tmp_path / "spm")
    meta = load_checkpoint(model_fn)["meta"]
    assert (folder / SPM_FILES["src"]).read_bytes() == meta["src_spm"]
    assert (folder / SPM_FILES["tgt"]).read_bytes() == meta["tgt_spm"]
    lines = ["A big dog sees the cat.", "", *(toy_dir / "test.en").read_text().splitlines()[:10]]
    expected = translate("--model_fn", model_fn, lines, "--beam_size", "1")
    assert translate("--ctranslate2", folder, lines, "--beam_size", "1") == expected
    assert expected[1] == "" and all(expected[2:])


def test_an_int8_export_computes_in_int8_and_translates(exported, tiny_checkpoint, tmp_path, test_lines):
    folder = export(tiny_checkpoint, tmp_path / "int8", "--quantization", "int8")
    assert ctranslate2.Translator(str(exported)).compute_type == "float32"
    assert ctranslate2.Translator(str(folder)).compute_type == "int8_float32"  # int8 weights, float32 activations
    rows = translate("--ctranslate2", folder, test_lines)
    assert len(rows) == len(test_lines) and rows[1] == "" and all(rows[3:])


def hf_folder(path):
    """A tiny Marian model and tokenizer saved with save_pretrained; its PAD embedding (where its decoder starts)
    is zero, as a trained Marian model's is and as CTranslate2 starts it."""
    model = make_model("marian", std=0.5)
    with torch.no_grad():
        model.model.shared.weight[model.config.pad_token_id] = 0.0
    HuggingFaceModel(model, make_tokenizer("marian")).save_pretrained(path)
    return path


HF_LINES = ["w1 w2 w3", "w4 w5", "", "w6", "w7 w8 w9 w10 w11", "w3 w3 w0"]


def test_hugging_face_marian_folder(tmp_path):
    start = hf_folder(tmp_path / "start")
    folder = export(start, tmp_path / "marian", flag="--hf_model")
    assert (folder / "hf_tokenizer" / "tokenizer_config.json").is_file()
    ctranslate2.Translator(str(folder))
    for beam in ("1", "4"):
        assert translate("--ctranslate2", folder, HF_LINES, "--beam_size", beam, "--max_length", "12") == \
            translate("--hf_model", start, HF_LINES, "--beam_size", beam, "--max_length", "12")


def test_hugging_face_checkpoint(tmp_path):
    start = hf_folder(tmp_path / "start")
    lines = [" ".join(f"w{(i * 7 + j) % 24}" for j in range(2 + i % 4)) for i in range(24)]
    for split in ("train", "valid"):
        (tmp_path / f"{split}.en").write_text("\n".join(lines) + "\n")
        (tmp_path / f"{split}.de").write_text("\n".join(lines) + "\n")
    run_in_process("continue_train.py", "--hf_model", str(start), "--model_fn", str(tmp_path / "m.pth"),
                   "--train", str(tmp_path / "train"), "--valid", str(tmp_path / "valid"), "--lang", "ende",
                   "--optimizer", "adam", "--lr", "1e-3", "--n_epochs", "1", "--max_length", "12", "--verbose", "0")
    folder = export(tmp_path / "m.pth", tmp_path / "marian")
    assert translate("--ctranslate2", folder, HF_LINES, "--beam_size", "1", "--max_length", "12") == \
        translate("--model_fn", tmp_path / "m.pth", HF_LINES, "--beam_size", "1", "--max_length", "12")


def one_line_error(proc, message):
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]


def test_a_seq2seq_is_refused_in_one_line(toy_dir, tmp_path):
    model_fn = train(toy_dir, tmp_path / "s2s.pth", *TINY_SEQ2SEQ)
    proc = run_main(cli.main_export, "--model_fn", str(model_fn), "--output_dir", str(tmp_path / "out"), check=False)
    one_line_error(proc, f"{model_fn}: a Seq2Seq (LSTM) model cannot be exported: CTranslate2 runs Transformers")
    assert not (tmp_path / "out").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_mistakes_are_one_line(exported, tiny_checkpoint, tmp_path):
    proc = run_main(cli.main_export, "--model_fn", str(tiny_checkpoint), "--output_dir", str(exported), check=False)
    one_line_error(proc, f"--output_dir {exported} exists: give --force to replace it")
    export(tiny_checkpoint, exported, "--force", "--max_positions", "8")
    proc = run_main(cli.main_translate, "--ctranslate2", str(exported), "--max_length", "9", stdin="a b\n", check=False)
    one_line_error(proc, "--max_length 9: the CTranslate2 model encodes 8 positions (export it with "
                         "--max_positions 9)")
    export(tiny_checkpoint, exported, "--force")
    proc = run_main(cli.main_translate, "--ctranslate2", str(tmp_path), stdin="a b\n", check=False)
    one_line_error(proc, f"--ctranslate2 {tmp_path}: not a folder written by export_ctranslate2.py "
                         "(no simple_nmt.json)")
    proc = run_main(cli.main_translate, "--ctranslate2", str(exported), "--mbr", "4", stdin="a b\n", check=False)
    one_line_error(proc, "--mbr 4 samples with the model's own search: give the checkpoint (--model_fn or "
                         "--hf_model) instead of --ctranslate2")
    if "bfloat16" not in ctranslate2.get_supported_compute_types("cpu"):
        proc = run_main(cli.main_translate, "--ctranslate2", str(exported), "--precision", "bf16", stdin="a\n",
                        check=False)
        assert proc.returncode == 1 and proc.stderr.startswith(f"error: --ctranslate2 {exported}: Requested bfloat16")
    proc = run_main(cli.main_translate, "--ctranslate2", str(exported), "--model_fn", str(tiny_checkpoint),
                    check=False)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_the_library_does_not_import_ctranslate2_unless_asked():
    code = "import sys, simple_nmt.cli; assert 'ctranslate2' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_without_ctranslate2_the_scripts_say_how_to_install_it(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 raises ImportError
    proc = run_main(cli.main_export, "--model_fn", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out"),
                    check=False)
    one_line_error(proc, "CTranslate2 models need ctranslate2: pip install -e .[ct2]")
    proc = run_main(cli.main_translate, "--ctranslate2", str(tmp_path), stdin="a\n", check=False)
    one_line_error(proc, "CTranslate2 models need ctranslate2: pip install -e .[ct2]")
