"""Models: incremental decoding vs teacher forcing, padding, the Transformer's cache, the factory, gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from simple_nmt import precision
from simple_nmt.data import BOS, EOS, PAD
from simple_nmt.models import EncoderDecoder, Seq2Seq, Transformer, build_model, seq2seq
from simple_nmt.models.transformer import CACHE_ROOM, append_to_cache, attend_few, cache_room
from simple_nmt.search import repeat_state

SRC_V, TGT_V = 19, 15
MODELS = [Seq2Seq, Transformer]
ATOL = 1e-5


def make_model(cls, seed: int = 0) -> EncoderDecoder:
    return make_tiny_model(cls, SRC_V, TGT_V, seed)


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(seqs), max(map(len, seqs))), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out, torch.tensor([len(s) for s in seqs])


def random_seqs(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def teacher_forced_batch(src_lengths: list[int], tgt_lengths: list[int], seed: int) -> tuple[torch.Tensor, ...]:
    """Random padded sources, their lengths, target inputs (BOS + y) and target outputs (y + EOS)."""
    src, lengths = pad_batch(random_seqs(src_lengths, SRC_V, seed))
    tgts = random_seqs(tgt_lengths, TGT_V, seed + 1)
    return src, lengths, pad_batch([[BOS] + t for t in tgts])[0], pad_batch([t + [EOS] for t in tgts])[0]


def mle_loss(model: EncoderDecoder, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced log-probs of ``batch`` and their token-mean negative log-likelihood."""
    src, src_lengths, tgt_in, tgt_out = batch
    log_probs = model(src, src_lengths, tgt_in)  # |log_probs| = (batch_size, length, vocab_size)
    return log_probs, torch.nn.functional.nll_loss(log_probs.transpose(1, 2), tgt_out, ignore_index=PAD)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --------------------------------------------------------------------------- incremental == teacher forcing


@pytest.mark.parametrize("cls", MODELS)
def test_incremental_decoding_equals_forward(cls):
    model = make_model(cls)
    src, src_lengths = pad_batch(random_seqs([5, 2, 7, 3], SRC_V, seed=1))
    # targets of different lengths, padded (a padded target position is still a valid input)
    tgt, _ = pad_batch([[BOS] + s for s in random_seqs([6, 3, 4, 1], TGT_V, seed=2)])
    with torch.no_grad():
        full = model(src, src_lengths, tgt)  # |full| = (batch_size, length, vocab_size)
        assert full.shape == (4, tgt.size(1), TGT_V)
        state = model.encode(src, src_lengths)
        for t in range(tgt.size(1)):
            step, state = model.decode_step(tgt[:, t], state)
            assert step.shape == (4, TGT_V)
            close(step, full[:, t])
    # log-probabilities
    close(full.exp().sum(-1), torch.ones(4, tgt.size(1)))


@pytest.mark.parametrize("cls", MODELS)
def test_padding_invariance(cls):
    """A sentence's output is the same alone and inside a padded batch, wherever it sits."""
    model = make_model(cls)
    srcs = random_seqs([4, 8, 2, 6], SRC_V, seed=3)
    tgts = [[BOS] + s for s in random_seqs([3, 5, 7, 2], TGT_V, seed=4)]
    src, src_lengths = pad_batch(srcs)
    tgt, _ = pad_batch(tgts)
    with torch.no_grad():
        batch_out = model(src, src_lengths, tgt)
        for i, (s, t) in enumerate(zip(srcs, tgts)):
            alone = model(torch.tensor([s]), torch.tensor([len(s)]), torch.tensor([t]))
            close(alone[0], batch_out[i, : len(t)])
        # also when the batch is ordered differently (the LSTM packs with enforce_sorted=False)
        order = [2, 0, 3, 1]
        src2, len2 = pad_batch([srcs[i] for i in order])
        tgt2, _ = pad_batch([tgts[i] for i in order])
        out2 = model(src2, len2, tgt2)
        for j, i in enumerate(order):
            close(out2[j, : len(tgts[i])], batch_out[i, : len(tgts[i])])


@pytest.mark.parametrize("cls", MODELS)
def test_encode_state_is_batch_first(cls):
    model = make_model(cls)
    src, src_lengths = pad_batch(random_seqs([3, 5, 1], SRC_V, seed=5))
    with torch.no_grad():
        state = model.encode(src, src_lengths)

    def check(x):
        if torch.is_tensor(x):
            assert x.size(0) == 3
        elif isinstance(x, dict):
            for v in x.values():
                check(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                check(v)

    check(state)


# --------------------------------------------------------------------------- the Transformer's cache


def test_transformer_cache_grows_and_cross_kv_is_reused():
    model = make_model(Transformer)
    n_layers, n_splits, head = len(model.decoder), model.decoder[0].self_attn.n_splits, 32 // 4
    src, src_lengths = pad_batch(random_seqs([5, 3], SRC_V, seed=6))
    tgt, _ = pad_batch([[BOS] + s for s in random_seqs([4, 4], TGT_V, seed=7)])

    calls = {"cross": 0, "self": []}
    hooks = []
    for block in model.decoder:
        hooks.append(block.cross_attn.kv.register_forward_hook(
            lambda m, i, o: calls.__setitem__("cross", calls["cross"] + 1)))
        hooks.append(block.self_attn.kv.register_forward_hook(lambda m, i, o: calls["self"].append(i[0].shape)))
    try:
        with torch.no_grad():
            state = model.encode(src, src_lengths)
            assert calls["cross"] == n_layers  # the encoder keys/values are projected once, in encode
            cross = state["cross_kv"]
            assert len(cross) == n_layers
            cross_values = [(k.clone(), v.clone()) for k, v in cross]
            assert state["step"] == 0
            assert all(k.shape == (2, n_splits, 0, head) and v.shape == (2, n_splits, 0, head)
                       for k, v in state["self_kv"])
            for t in range(1, tgt.size(1) + 1):
                calls["self"].clear()
                _, state = model.decode_step(tgt[:, t - 1], state)
                assert state["step"] == t
                assert len(state["self_kv"]) == n_layers
                for k, v in state["self_kv"]:
                    assert k.shape == v.shape == (2, n_splits, t, head)
                # only the new position is projected, once per layer
                assert calls["self"] == [torch.Size([2, 1, 32])] * n_layers
                # the cross-attention keys/values are neither recomputed nor changed
                assert calls["cross"] == n_layers
                for (k, v), (k0, v0), (k1, v1) in zip(state["cross_kv"], cross, cross_values):
                    assert k is k0 and v is v0
                    assert torch.equal(k, k1) and torch.equal(v, v1)
                    assert k.shape == (2, n_splits, src.size(1), head)
            # the cache holds the keys/values teacher forcing computes for the whole prefix
            _, full_cache = model._run_decoder(model._embed(model.tgt_emb, tgt), model.encode(src, src_lengths),
                                          causal=True)
            for (k, v), (fk, fv) in zip(state["self_kv"], full_cache["self_kv"]):
                close(k, fk)
                close(v, fv)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("queries, mask", [(1, None), (5, "source"), (4, "causal")])
def test_attention_of_few_queries_equals_torch_fused_attention(queries, mask):
    """The decoding step's attention (two products) is torch's scaled_dot_product_attention: float64 to
    rounding, and under bfloat16 autocast within bfloat16's precision."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 8, generator=g, dtype=torch.float64) for n in (queries, 6, 6))
    if mask == "source":  # padded sources: the first keeps 6 positions, the others 4 and 1
        mask = (torch.arange(6) < torch.tensor([6, 4, 1])[:, None])[:, None, None, :]
    elif mask == "causal":  # the last 4 positions of a 6-position prefix
        mask = torch.ones(6, 6, dtype=torch.bool).tril()[2:]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attend_few(q, k, v, mask), expected, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attend_few(*(x.float().bfloat16() for x in (q, k, v)), mask)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), expected, rtol=0, atol=0.05)


@pytest.mark.parametrize("mask", [None, "source"])
def test_attention_reads_a_cache_prefix_with_its_room_masked(mask):
    """Keys and values that are the first 5 positions of a buffer with room for 16 attend as those 5 alone,
    whatever the room holds (here large values: another state's positions)."""
    g = torch.Generator().manual_seed(1)
    buffer = torch.randn(2, 3, 4, 16, 8, generator=g, dtype=torch.float64) * 1e3
    k, v = buffer[0, :, :, :5], buffer[1, :, :, :5]
    assert k.shape == (3, 4, 5, 8) and not k.is_contiguous()
    q = torch.randn(3, 4, 1, 8, generator=g, dtype=torch.float64)
    if mask == "source":
        mask = (torch.arange(5) < torch.tensor([5, 3, 1])[:, None])[:, None, None, :]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.contiguous(), v.contiguous(), attn_mask=mask)
    torch.testing.assert_close(attend_few(q, k, v, mask), expected, rtol=1e-12, atol=1e-9)


def test_a_new_cache_buffer_holds_the_positions_and_a_room_of_zeros(monkeypatch):
    """The room is read by attention (a weight of 0 times a NaN of fresh memory would be NaN): a new buffer
    zeroes it, whatever the memory held (here NaN everywhere)."""
    def nan_memory(self, *size, **kwargs):
        return torch.full(size[0] if len(size) == 1 else size, float("nan"), dtype=kwargs.get("dtype", self.dtype))

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_memory)
    k_cache, v_cache, k, v = (torch.randn(2, 3, n, 4) for n in (5, 5, 1, 1))
    k_all, v_all, _ = append_to_cache(k_cache, v_cache, k, v, None)
    assert cache_room(k_all) == cache_room(v_all) == 6 + CACHE_ROOM
    for cache, before, new in ((k_all, k_cache, k), (v_all, v_cache, v)):
        assert torch.equal(cache, torch.cat([before, new], dim=2))
        room = cache.as_strided((2, 3, 6 + CACHE_ROOM, 4), cache.stride(), cache.storage_offset())[:, :, 6:]
        assert bool((room == 0).all())


def test_transformer_cache_is_written_in_place_and_a_state_can_be_decoded_twice():
    model = make_model(Transformer).eval()
    src, src_lengths = pad_batch(random_seqs([5, 3], SRC_V, seed=4))
    tgt = torch.tensor([[BOS] + random_seqs([40], TGT_V, seed=5)[0]] * 2)
    with torch.no_grad():
        full = model(src, src_lengths, tgt)
        state, buffers = model.encode(src, src_lengths), {}
        for t in range(tgt.size(1)):
            # 41 steps: the first step's own keys, then buffers of 16, 2 x 17 and 2 x 35 positions
            step, state = model.decode_step(tgt[:, t], state)
            close(step, full[:, t])
            storage = state["self_kv"][0][0].untyped_storage()
            buffers[storage.data_ptr()] = storage  # held, so that no later buffer can take its address
        assert len(buffers) == 4
        # two steps from one state (branches of a search): each sees its own history
        branch_a, a = model.decode_step(torch.full((2,), 4), state)
        branch_b, b = model.decode_step(torch.full((2,), 5), state)
        _, a2 = model.decode_step(torch.full((2,), 6), a)
        again, _ = model.decode_step(torch.full((2,), 6), model.decode_step(torch.full((2,), 4), state)[1])
        close(model.decode_step(torch.full((2,), 6), a)[0], again)
        extended = torch.cat([tgt, torch.full((2, 1), 5), torch.full((2, 1), 6)], dim=1)
        close(model.decode_step(torch.full((2,), 6), b)[0], model(src, src_lengths, extended)[:, -1])
        close(branch_a, model(src, src_lengths, torch.cat([tgt, torch.full((2, 1), 4)], dim=1))[:, -1])
    # reordering a state before any step, and one whose cache is a compact copy, works as on any tensor
    with torch.no_grad():
        fresh = model.encode(src, src_lengths)
        index = torch.tensor([1, 0, 1])
        heads, head_size = state["self_kv"][0][0].size(1), state["self_kv"][0][0].size(3)
        assert model.reorder_state(fresh, index)["self_kv"][0][0].shape == (3, heads, 0, head_size)
        compact = dict(state, self_kv=[(k.contiguous(), v.contiguous()) for k, v in state["self_kv"]])
        for (k, v), (k0, v0) in zip(model.reorder_state(compact, index)["self_kv"], state["self_kv"]):
            assert torch.equal(k, k0[index]) and torch.equal(v, v0[index])
    # a reordered cache has room for the next step, which writes it in place (beam search reorders at every
    # step), and the step after that makes a buffer with room again
    with torch.no_grad():
        reordered = model.reorder_state(state, torch.tensor([1, 0]))
        k = reordered["self_kv"][0][0]
        assert cache_room(k) == k.size(2) + 1
        step, after = model.decode_step(torch.full((2,), 7), reordered)
        assert after["self_kv"][0][0].untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        step2, after2 = model.decode_step(torch.full((2,), 8), after)
        assert cache_room(after2["self_kv"][0][0]) > after2["self_kv"][0][0].size(2)
        swapped = torch.cat([tgt.flip(0), torch.full((2, 1), 7), torch.full((2, 1), 8)], dim=1)
        full = model(src.flip(0), src_lengths.flip(0), swapped)
        close(step, full[:, -2])
        close(step2, full[:, -1])
    # with gradients, the cache is copied, not written in place: backward through the steps works
    state = model.encode(src, src_lengths)
    total = 0
    for t in range(20):
        step, state = model.decode_step(tgt[:, t], state)
        total = total + step[:, tgt[0, t + 1]].sum()
    total.backward()
    assert model.decoder[0].self_attn.kv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", MODELS)
def test_decoding_under_inference_mode_equals_no_grad(cls):
    model = make_model(cls).eval()
    src, src_lengths = pad_batch(random_seqs([5, 3, 4], SRC_V, seed=9))
    results = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.manual_seed(3)
            sampled = model.search(src, src_lengths, is_greedy=False, max_length=12, n_samples=4)
            greedy = model.search(src, src_lengths, max_length=12)
            beams = model.batch_beam_search(src, src_lengths, beam_size=3, n_best=3, max_length=12)
            state = model.encode(src, src_lengths)
            _, a = model.decode_step(torch.full((3,), 4), state)
            twice = [model.decode_step(torch.full((3,), 5), a)[0] for _ in range(2)]  # one state decoded twice
        results.append((sampled, greedy, beams, twice))
    (s0, g0, b0, t0), (s1, g1, b1, t1) = results
    assert all(torch.equal(x, y) for x, y in zip(s0 + g0, s1 + g1))
    assert b0[0] == b1[0] and torch.equal(b0[1], b1[1])
    assert torch.equal(t1[0], t1[1]) and torch.equal(t0[0], t1[0])


@pytest.mark.parametrize("cls", MODELS)
def test_repeated_state_keeps_one_copy_of_the_source_entries_per_source(cls):
    model = make_model(cls).eval()
    src, src_lengths = pad_batch(random_seqs([5, 3], SRC_V, seed=10))
    y = torch.tensor([4, 5, 6, 4, 5, 6])
    with torch.no_grad():
        state = model.encode(src, src_lengths)
        grouped = model.repeat_state(state, 3)
        assert grouped["group"] == 3
        assert all(grouped[key] is state[key] for key in cls.source_state_keys)
        every_row = repeat_state(state, 3)  # the encoder entries copied for each row
        for _ in range(3):  # the rows of a source attend to its one copy of the encoder entries
            step, grouped = model.decode_step(y, grouped)
            expected, every_row = model.decode_step(y, every_row)
            close(step, expected)
        # reordering across sources gives each kept row its source's entries
        index = torch.tensor([4, 0, 2])
        reordered = model.reorder_state(grouped, index)
        assert reordered["group"] == 1
        for key in cls.source_state_keys:
            for copy, original in zip(torch.utils._pytree.tree_leaves(reordered[key]),
                                      torch.utils._pytree.tree_leaves(state[key])):
                assert torch.equal(copy, original[index // 3])
        close(model.decode_step(y[index], reordered)[0],
              model.decode_step(y[index], model.reorder_state(every_row, index))[0])
        # within sources (beam search) the per-source entries are kept as they are
        within = model.reorder_state(grouped, torch.tensor([2, 0, 1, 5, 5, 3]), within_sources=True)
        assert within["group"] == 3 and all(within[key] is state[key] for key in cls.source_state_keys)


def test_seq2seq_state_carries_projected_keys():
    model = make_model(Seq2Seq)
    src, src_lengths = pad_batch(random_seqs([4, 2], SRC_V, seed=8))
    with torch.no_grad():
        state = model.encode(src, src_lengths)
        _, new_state = model.decode_step(torch.full((2,), BOS), state)
    assert state["h"].shape == state["c"].shape == (2, 2, 32)
    assert state["memory"].shape == state["keys"].shape == (2, 4, 32)
    assert state["pad_mask"].tolist() == [[False] * 4, [False, False, True, True]]
    assert new_state["keys"] is state["keys"] and new_state["memory"] is state["memory"]
    assert not torch.equal(new_state["h"], state["h"])


# --------------------------------------------------------------------------- factory


def test_build_model_transformer():
    config = {"use_transformer": True, "hidden_size": 48, "n_splits": 6, "n_layers": 3, "dropout": 0.25,
              "word_vec_size": 999}
    model = build_model(config, 21, 17)
    assert type(model) is Transformer and isinstance(model, EncoderDecoder)
    assert len(model.encoder) == len(model.decoder) == 3
    assert model.hidden_size == 48
    assert model.src_emb.weight.shape == (21, 48) and model.tgt_emb.weight.shape == (17, 48)
    assert model.generator.out_features == 17
    assert model.decoder[0].self_attn.n_splits == 6 and model.encoder[0].attn.n_splits == 6
    assert model.dropout.p == 0.25
    torch.manual_seed(0)
    direct = Transformer(21, 17, hidden_size=48, n_splits=6, n_layers=3, dropout=0.25)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in direct.parameters())


@pytest.mark.parametrize("flag", [{"use_transformer": False}, {}])
def test_build_model_seq2seq(flag):
    config = {"word_vec_size": 24, "hidden_size": 40, "n_splits": 8, "n_layers": 3, "dropout": 0.3, **flag}
    model = build_model(config, 21, 17)
    assert type(model) is Seq2Seq
    assert model.src_emb.weight.shape == (21, 24) and model.tgt_emb.weight.shape == (17, 24)
    assert model.hidden_size == 40 and model.n_layers == 3
    assert model.encoder.hidden_size == 20 and model.encoder.bidirectional and model.encoder.num_layers == 3
    assert model.decoder.hidden_size == 40 and model.decoder.num_layers == 3
    assert model.decoder.input_size == 24 + 40  # input feeding
    assert model.generator.out_features == 17
    assert model.dropout.p == 0.3 and model.encoder.dropout == 0.3


def test_build_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="even"):
        build_model({"word_vec_size": 8, "hidden_size": 31, "n_layers": 1, "dropout": 0.0}, 10, 10)
    with pytest.raises(ValueError, match="divisible"):
        build_model({"use_transformer": True, "hidden_size": 30, "n_splits": 4, "n_layers": 1, "dropout": 0.0},
                    10, 10)


TIED_CONFIGS = {
    Transformer: {"use_transformer": True, "hidden_size": 32, "n_splits": 4, "n_layers": 2, "dropout": 0.0},
    Seq2Seq: {"word_vec_size": 32, "hidden_size": 32, "n_layers": 2, "dropout": 0.0},
}


@pytest.mark.parametrize("cls", MODELS)
def test_tied_embeddings_are_one_matrix_whose_gradient_is_the_sum_of_both_uses(cls):
    torch.manual_seed(0)
    tied = build_model({**TIED_CONFIGS[cls], "tie_embeddings": True}, SRC_V, TGT_V)
    untied = build_model(TIED_CONFIGS[cls], SRC_V, TGT_V)
    assert tied.generator.weight is tied.tgt_emb.weight
    n_params = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_params - TGT_V * 32
    # the untied model with both matrices set to the tied one computes the same function
    untied.load_state_dict(tied.state_dict())
    assert untied.generator.weight is not untied.tgt_emb.weight
    batch = teacher_forced_batch([5, 2, 7], [4, 6, 2], seed=1)
    (tied_log_probs, tied_loss), (untied_log_probs, untied_loss) = mle_loss(tied, batch), mle_loss(untied, batch)
    close(tied_log_probs, untied_log_probs)
    tied_loss.backward()
    untied_loss.backward()
    close(tied.tgt_emb.weight.grad, untied.tgt_emb.weight.grad + untied.generator.weight.grad)
    assert untied.generator.weight.grad.abs().sum() > 0 and untied.tgt_emb.weight.grad.abs().sum() > 0


def test_tied_seq2seq_needs_equal_sizes():
    with pytest.raises(ValueError, match=r"--tie_embeddings needs --word_vec_size \(16\) equal to --hidden_size"):
        build_model({**TIED_CONFIGS[Seq2Seq], "word_vec_size": 16, "tie_embeddings": True}, SRC_V, TGT_V)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("cls", MODELS)
def test_a_joint_vocabulary_makes_source_target_and_output_embeddings_one_matrix(cls):
    torch.manual_seed(0)
    shared = build_model({**TIED_CONFIGS[cls], "tie_embeddings": True, "joint_vocab": True}, SRC_V, SRC_V)
    untied = build_model(TIED_CONFIGS[cls], SRC_V, SRC_V)
    assert shared.src_emb.weight is shared.tgt_emb.weight is shared.generator.weight
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in untied.parameters()) - 2 * SRC_V * 32
    # the untied model with its three matrices set to the shared one computes the same function, and the shared
    # matrix's gradient is the sum of the three uses'
    untied.load_state_dict(shared.state_dict())
    src, lengths, tgt_in, tgt_out = teacher_forced_batch([5, 2, 7], [4, 6, 2], seed=3)
    batch = src, lengths, tgt_in.clamp(max=SRC_V - 1), tgt_out.clamp(max=SRC_V - 1)
    (shared_log_probs, shared_loss), (untied_log_probs, untied_loss) = mle_loss(shared, batch), mle_loss(untied, batch)
    close(shared_log_probs, untied_log_probs)
    shared_loss.backward()
    untied_loss.backward()
    close(shared.tgt_emb.weight.grad,
          untied.src_emb.weight.grad + untied.tgt_emb.weight.grad + untied.generator.weight.grad)


def test_a_joint_vocabulary_needs_equal_vocabulary_sizes():
    with pytest.raises(ValueError,
                       match="shared source and target embeddings need one vocabulary, got sizes 19 and 15"):
        build_model({**TIED_CONFIGS[Transformer], "joint_vocab": True}, SRC_V, TGT_V)


def test_ffn_size_sets_the_width_of_every_feed_forward_block():
    default = build_model(TIED_CONFIGS[Transformer], SRC_V, TGT_V)
    narrow = build_model({**TIED_CONFIGS[Transformer], "ffn_size": 24}, SRC_V, TGT_V)
    for model, width in ((default, 4 * 32), (narrow, 24)):
        for block in [*model.encoder, *model.decoder]:
            assert block.ffn[0].weight.shape == (width, 32) and block.ffn[3].weight.shape == (32, width)


@pytest.mark.parametrize("cls", MODELS)
def test_gradients_reach_every_parameter(cls):
    model = make_model(cls).train()
    batch = teacher_forced_batch([5, 2, 7, 3], [4, 6, 2, 5], seed=9)
    src, _, tgt_in, _ = batch
    torch.manual_seed(11)
    _, loss = mle_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name in ("src_emb.weight", "tgt_emb.weight"):
            # the padding row gets no gradient (padding_idx), the rows of used tokens do
            assert torch.count_nonzero(p.grad[PAD]) == 0, name
            used = src.unique() if name == "src_emb.weight" else tgt_in.unique()
            used = used[used != PAD]
            assert (p.grad[used].abs().sum(-1) > 0).all(), name
        else:
            assert p.grad.abs().sum() > 0, name


def seq2seq_grads(model: Seq2Seq, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher-forced log-probs of ``batch`` and the gradients of their NLL, the model's gradients reset."""
    model.zero_grad(set_to_none=True)
    log_probs, loss = mle_loss(model, batch)
    loss.backward()
    return log_probs.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_seq2seq_unrolled_lstm_equals_one_nn_lstm_call_per_step(n_layers, monkeypatch):
    """The decoder's LSTM stepped by hand (UnrolledLSTM) gives the log-probs and every gradient of
    nn.LSTM called once per step, to float64's precision."""
    torch.manual_seed(n_layers)
    model = Seq2Seq(SRC_V, TGT_V, word_vec_size=6, hidden_size=8, n_layers=n_layers, dropout=0.1).double().eval()
    batch = teacher_forced_batch([5, 2, 7], [4, 6, 1], seed=3)
    monkeypatch.setattr(seq2seq, "unrolls", lambda lstm, emb: True)
    unrolled, unrolled_grads = seq2seq_grads(model, batch)
    monkeypatch.setattr(seq2seq, "unrolls", lambda lstm, emb: False)
    stepped, stepped_grads = seq2seq_grads(model, batch)
    torch.testing.assert_close(unrolled, stepped, rtol=1e-12, atol=1e-12)
    for name, grad in stepped_grads.items():
        torch.testing.assert_close(unrolled_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_seq2seq_unrolled_lstm_under_bf16_autocast_keeps_its_cell_in_float32(monkeypatch):
    """Under bf16 autocast the hand-stepped LSTM multiplies in bf16 and keeps its cell state in float32;
    log-probs and gradients are the float32 ones within bf16's precision. On a CPU without bf16 products
    it computes in float32, as nn.LSTM does there (lstm_precision)."""
    model = make_model(Seq2Seq)
    batch = teacher_forced_batch([5, 2, 7], [4, 6, 1], seed=3)
    reference, reference_grads = seq2seq_grads(model, batch)
    monkeypatch.setattr(precision, "cpu_has_native", lambda name: True)  # bf16 in software where it is not
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, low_grads = seq2seq_grads(model, batch)
    close(low.float(), reference, atol=0.05)
    for name, grad in reference_grads.items():
        close(low_grads[name], grad, atol=0.05 * float(grad.abs().max()) + 1e-6)
    emb, state = torch.randn(3, 4, 16), model.encode(*batch[:2])
    for native, dtype in [(True, torch.bfloat16), (False, torch.float32)]:
        monkeypatch.setattr(precision, "cpu_has_native", lambda name, native=native: native)
        with torch.autocast("cpu", dtype=torch.bfloat16), precision.lstm_precision():
            lstm = seq2seq.UnrolledLSTM(model.decoder, emb, state["h"], state["c"])
            out = lstm.step(0, state["h_tilde"])
        assert out.dtype == dtype and all(w.dtype == dtype for w in lstm.weights)
        assert all(c.dtype == torch.float32 for c in lstm.c)


def test_seq2seq_steps_its_lstm_by_hand_where_it_trains_in_a_native_low_precision_on_cpu(monkeypatch):
    """UnrolledLSTM where a graph is recorded under CPU autocast in a type the CPU multiplies natively;
    the decoder's own module, once per step, without a graph, in float32, where the CPU lacks the type,
    and for any decoder other than a plain nn.LSTM."""
    emb, lstm = torch.zeros(2, 3, 4), torch.nn.LSTM(4 + 5, 5, batch_first=True)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native", lambda name, native=native: native)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert seq2seq.unrolls(lstm, emb) == native
            with torch.no_grad():
                assert not seq2seq.unrolls(lstm, emb)
            # a research model's other recurrent decoder keeps its own module
            assert not seq2seq.unrolls(torch.nn.GRU(4 + 5, 5, batch_first=True), emb)
            assert not seq2seq.unrolls(torch.nn.LSTM(4 + 5, 5, batch_first=True, bias=False), emb)
        assert not seq2seq.unrolls(lstm, emb)


def test_seq2seq_unrolled_lstm_drops_out_between_layers_only():
    """In training, UnrolledLSTM drops out a layer's output on its way to the next layer, as nn.LSTM does,
    and neither the top layer's output nor the recurrent state."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6 + 8, 8, 2, batch_first=True, dropout=0.5)
    emb, h, c = torch.randn(4, 3, 6), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    fed = torch.randn(4, 8)
    outs = {}
    for train in (False, True):
        lstm.train(train)
        unrolled = seq2seq.UnrolledLSTM(lstm, emb, h, c)
        outs[train] = (unrolled.step(0, fed), unrolled.h[0], unrolled.c[0])
    torch.testing.assert_close(outs[True][1], outs[False][1])  # layer 0's state: no dropout before it
    torch.testing.assert_close(outs[True][2], outs[False][2])
    assert not torch.allclose(outs[True][0], outs[False][0])  # layer 1 read a dropped-out input
    lstm.dropout = 0.0
    lstm.train()
    torch.testing.assert_close(seq2seq.UnrolledLSTM(lstm, emb, h, c).step(0, fed), outs[False][0])
