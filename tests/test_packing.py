"""Packed SFT rows: the same loss and gradients as padded rows, and no attention across conversations."""
import pytest
import torch
from torch.testing import assert_close

from nanoalign.data import pack, packed_batch, pad_right
from nanoalign.losses import sft_loss
from nanoalign.model import CausalLM, ModelConfig, document_positions

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # GQA, like Qwen2.5


def conversations(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        out.append({"ids": ids, "mask": [0] * prompt + [1] * (n - prompt)})
    return out


def test_pack_best_fit_decreasing_by_hand():
    # longest first: 6 -> new row A (2 left), 5 -> new row B (3 left), 4 -> new row C (4 left),
    # 3 -> the tightest fit is B (3 left), 2 -> the tightest fit is A (2 left)
    assert pack([5, 3, 4, 2, 6], 8, seed=0) == [[4, 3], [0, 1], [2]]
    rows = pack([7, 1, 3, 3, 2, 8, 4, 4, 5, 1], 8, seed=3)
    assert sorted(i for r in rows for i in r) == list(range(10))  # every example once
    assert len(rows) == 5  # 38 tokens need at least 5 rows of 8
    with pytest.raises(AssertionError, match="does not fit"):
        pack([9], 8, seed=0)


def test_packed_batch_masks_and_documents_by_hand():
    ex = [{"ids": [1, 2, 3], "mask": [1, 0, 1]}, {"ids": [4, 5], "mask": [1, 1]}]
    ids, mask, docs = packed_batch(ex, [[1, 0]], 7, pad_id=0)
    assert ids.tolist() == [[4, 5, 1, 2, 3, 0, 0]]
    assert mask.tolist() == [[0, 1, 0, 0, 1, 0, 0]]  # each first token untrained: it follows another document
    assert docs.tolist() == [[0, 0, 1, 1, 1, 2, 2]]  # the padding tail is a document of its own
    assert document_positions(docs).tolist() == [[0, 1, 0, 1, 2, 0, 1]]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("impl", ["sdpa", pytest.param("flex", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention has no backward on CPU (torch 2.13); its forward is "
                                          "tested on CPU below"))])
def test_packed_loss_and_gradients_equal_unpacked(impl):
    device = "cuda" if impl == "flex" else "cpu"
    model = CausalLM(CONFIG).init_weights(std=0.2).to(device)
    convs = conversations([9, 4, 13, 6, 7, 3, 11])
    num_tokens = sum(sum(c["mask"][1:]) for c in convs)

    ids, mask = pad_right([c["ids"] for c in convs], 0).to(device), pad_right([c["mask"] for c in convs], 0).to(device)
    sft_loss(model(ids, return_hidden=True), model.lm_head.weight, ids, mask, num_tokens).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss = sft_loss(model(ids, return_hidden=True), model.lm_head.weight, ids, mask, num_tokens).detach()
    model.zero_grad()

    model.model.packed_attention = impl
    rows = pack([len(c["ids"]) for c in convs], 16, seed=0)
    assert len(rows) == 4  # 53 tokens in 4 rows of 16, not 7 rows of 13
    ids, mask, docs = (x.to(device) for x in packed_batch(convs, rows, 16, pad_id=0))
    assert int(mask[:, 1:].sum()) == num_tokens
    loss = sft_loss(model(ids, document_ids=docs, return_hidden=True), model.lm_head.weight, ids, mask, num_tokens)
    loss.backward()
    assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_no_attention_across_conversations(impl):
    model = CausalLM(CONFIG).init_weights(std=0.2).eval()
    model.model.packed_attention = impl
    convs = conversations([5, 6, 4])
    ids, _, docs = packed_batch(convs, [[0, 1, 2]], 16, pad_id=0)
    changed = ids.clone()
    changed[0, 5:11] = (changed[0, 5:11] + 1) % 97  # a different middle conversation
    with torch.no_grad():
        a, b = (model(x, document_ids=docs) for x in (ids, changed))
    assert torch.equal(a[0, :5], b[0, :5])  # before it: nothing changed
    assert torch.equal(a[0, 11:], b[0, 11:])  # after it (and the pads): nothing changed either
    assert (a[0, 5:11] - b[0, 5:11]).abs().amax(-1).min() > 1e-3  # every token of the changed one moved
    # and each conversation's logits are those of the conversation alone (positions restart at 0)
    with torch.no_grad():
        alone = model(torch.tensor([convs[2]["ids"]]))
    assert_close(a[0, 11:15], alone[0], atol=1e-5, rtol=0)


@CUDA  # varlen attention is flash attention: CUDA only
def test_varlen_matches_sdpa_on_cuda():
    model = CausalLM(CONFIG).init_weights(std=0.2).cuda().eval()
    ids, _, docs = packed_batch(conversations([9, 4, 13, 6]), [[0, 1], [2], [3]], 16, pad_id=0)
    ids, docs = ids.cuda(), docs.cuda()
    out = {}
    for impl in ("sdpa", "varlen"):
        model.model.packed_attention = impl
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out[impl] = model(ids, document_ids=docs).float()
    assert_close(out["varlen"], out["sdpa"], atol=2e-2, rtol=2e-2)


def test_packed_preference_batch_gives_the_four_logp_sums_of_padded_rows():
    """DPO: the chosen and rejected sums of 3 pairs, packed into rows of 24 tokens (shared by pairs), equal those
    of preference_batch's padded [2b, t] rows; and so do their gradients."""
    from nanoalign.data import packed_preference_batch, preference_batch
    from nanoalign.losses import sequence_logps
    g = torch.Generator().manual_seed(3)
    tok = lambda n: torch.randint(0, 97, (n,), generator=g).tolist()  # noqa: E731
    pairs = [{"prompt": tok(p), "chosen": tok(c), "rejected": tok(r)} for p, c, r in [(5, 7, 3), (9, 2, 6), (4, 11, 8)]]
    model = CausalLM(CONFIG).init_weights(std=0.2)
    ids, mask = preference_batch(pairs, 0)
    padded = sequence_logps(model(ids, return_hidden=True), model.lm_head.weight, ids, mask, chunk_size=5)
    padded.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ids, mask, docs, seqs = packed_preference_batch(pairs, 24, 0)
    assert ids.shape == (4, 24) and ids.numel() < 6 * 19  # 4 rows of 24 instead of 6 of 19
    assert all(set(r[r.index(-1):]) == {-1} for r in seqs.tolist() if -1 in r)  # pads only at a row's end
    assert sorted(set(seqs.flatten().tolist()) - {-1}) == list(range(6))
    packed = sequence_logps(model(ids, document_ids=docs, return_hidden=True), model.lm_head.weight, ids, mask,
                            chunk_size=5, sequence_ids=seqs, num_sequences=6)
    packed.sum().backward()
    assert_close(packed.detach(), padded.detach(), atol=1e-5, rtol=1e-5)  # chosen 0..2, rejected 3..5
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f'{n}: {m}')
