"""Tiny random Hugging Face encoder-decoders and word-level tokenizers, made from their configs: nothing downloaded.

Each kind keeps its model's id conventions: Marian (EOS 0, UNK 1, PAD last, decoding from PAD), T5
(PAD 0, EOS 1, UNK 2, decoding from PAD), mBART-50 (BOS 0, PAD 1, EOS 2, UNK 3, a source-language
token before the source and decoding from EOS followed by the forced target-language token) and
BART (the same ids, decoding from EOS followed by the forced <s>, id 0).
"""

from __future__ import annotations

import torch

KINDS = ("marian", "t5", "mbart", "bart")
WORDS = [f"w{i}" for i in range(24)]  # the tokenizers' ordinary tokens
SRC_LANG, TGT_LANG = "en_XX", "de_DE"


def vocabulary(kind: str, words: list[str] = WORDS) -> list[str]:
    """The tokens of ``kind``'s tokenizer, in id order."""
    if kind == "marian":
        return ["</s>", "<unk>", *words, "<pad>"]
    if kind == "t5":
        return ["<pad>", "</s>", "<unk>", *words]
    if kind == "bart":
        return ["<s>", "<pad>", "</s>", "<unk>", *words]
    return ["<s>", "<pad>", "</s>", "<unk>", *words, SRC_LANG, TGT_LANG]


def make_tokenizer(kind: str, words: list[str] = WORDS):
    """A word-level ``PreTrainedTokenizerFast`` that ends a source with </s> (mBART: after its language token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary(kind, words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = {"mbart": f"{SRC_LANG} $A </s>", "bart": "<s> $A </s>"}.get(kind, "$A </s>")
    specials = [(t, vocab[t]) for t in ("<s>", "</s>", SRC_LANG) if t in vocab]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    extra = {"additional_special_tokens": [SRC_LANG, TGT_LANG]} if kind == "mbart" else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   **extra)


def make_model(kind: str, seed: int = 0, std: float = 0.5, words: list[str] = WORDS) -> torch.nn.Module:
    """A 2-layer-encoder, 1-layer-decoder model of ``kind`` with d_model 16, in eval mode.

    Its trained matrices are drawn with standard deviation ``std`` (larger than the models' own
    initialisation), so that outputs vary from token to token.
    """
    import transformers as tf

    torch.manual_seed(seed)
    v = len(vocabulary(kind, words))
    sizes = {"d_model": 16, "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32,
             "max_position_embeddings": 64, "dropout": 0.0}
    if kind == "marian":
        model = tf.MarianMTModel(tf.MarianConfig(vocab_size=v, pad_token_id=v - 1, eos_token_id=0,
                                                 decoder_start_token_id=v - 1, **sizes))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0))
    elif kind == "bart":
        model = tf.BartForConditionalGeneration(tf.BartConfig(vocab_size=v, pad_token_id=1, eos_token_id=2,
                                                              bos_token_id=0, decoder_start_token_id=2, **sizes))
        model.generation_config.forced_bos_token_id = 0  # <s>, a token of id 0
    else:
        model = tf.MBartForConditionalGeneration(tf.MBartConfig(vocab_size=v, pad_token_id=1, eos_token_id=2,
                                                                bos_token_id=0, decoder_start_token_id=2,
                                                                **sizes))
        model.generation_config.forced_bos_token_id = v - 1  # de_DE
    model.generation_config.forced_eos_token_id = None  # outputs cut at the length limit, as the library's
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.requires_grad:  # not Marian's fixed sinusoidal positions
                p.normal_(0.0, std)
    return model.eval()
