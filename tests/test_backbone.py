import json

import pytest
import torch

from person_retrieval.models import build_backbone, load_real_clip, stretch_positional_embedding, stretch_text_encoder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_backbone(None, "tiny").eval()


def test_outputs_pooled_and_tokens(tiny):
    h, w = tiny.image_size
    pooled, tokens = tiny.encode_image(torch.randn(2, 3, h, w))
    assert pooled.shape == (2, tiny.embed_dim) and tokens.shape == (2, (h // 16) * (w // 16), tiny.embed_dim)
    ids = tiny.tokenize(["a man in a red coat", "a woman"])
    tp, tt = tiny.encode_text(ids)
    assert tp.shape == (2, tiny.embed_dim) and tt.shape[0] == 2
    # pooled text = the token at end-of-text
    assert torch.allclose(tp[1], tt[1, ids[1].argmax()])


def test_trimming_padding_is_exact(tiny):
    ids = tiny.tokenize(["a man in a red coat and black shoes", "a woman"])
    assert torch.allclose(tiny.encode_text(ids, trim=True)[0], tiny.encode_text(ids, trim=False)[0], atol=1e-5)


def test_stretch_known_rows():
    pe = torch.arange(77.0).view(77, 1) * torch.tensor([[1.0, -2.0]])
    s = stretch_positional_embedding(pe, keep=20, length=248)
    assert s.shape == (248, 2)
    assert torch.equal(s[:20], pe[:20])
    for k in range(57):
        assert torch.allclose(s[20 + 4 * k], pe[20 + k])  # original rows stay at the start of their group
    assert torch.allclose(s[21, 0], torch.tensor(20.25)) and torch.allclose(s[23, 0], torch.tensor(20.75))
    assert torch.allclose(s[-1, 0], torch.tensor(76.75))  # the last row extended along the final step
    with pytest.raises(ValueError, match="multiple"):
        stretch_positional_embedding(pe, keep=20, length=250)
    with pytest.raises(ValueError, match="keep"):
        stretch_positional_embedding(pe, keep=80)


def test_stretched_encoder_takes_248_tokens_and_keeps_short_texts(tiny):
    bb = build_backbone(None, "tiny").eval()
    bb.load_state_dict(tiny.state_dict())
    short = bb.tokenize(["a man in a red coat"])
    before = bb.encode_text(short)[0]
    stretch_text_encoder(bb, keep=20, length=248)
    assert bb.context_length == 248
    assert torch.allclose(bb.encode_text(bb.tokenize(["a man in a red coat"]))[0], before, atol=1e-5)
    long_ids = bb.tokenize(["red " * 200])
    assert long_ids.shape[1] == 248 and bb.encode_text(long_ids)[1].shape[1] > 77


def test_real_weights_path_with_a_tiny_checkpoint(tmp_path, monkeypatch):
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "pr-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "pr-tiny-vit.json")
    src = open_clip.create_model("pr-tiny-vit")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "ckpt.safetensors")
    monkeypatch.setenv("PR_CLIP_ARCH", "pr-tiny-vit")
    bb = load_real_clip(str(tmp_path / "ckpt.safetensors"), image_size=(64, 32))
    assert bb.image_size == (64, 32)
    assert bb.clip.visual.positional_embedding.shape == (8 * 4 + 1, 32)  # 4x4 grid resized to 8x4 (+ class token)
    assert torch.equal(bb.clip.token_embedding.weight, src.token_embedding.weight)
    assert bb.encode_image(torch.randn(1, 3, 64, 32))[1].shape == (1, 32, 32)


def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"put the open_clip checkpoint at {tmp_path}/ViT-B-16.safetensors"):
        build_backbone("ViT-B-16")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone(str(tmp_path / "nope.safetensors"))


def test_pre_trimmed_batches_give_the_same_features(tiny):
    from person_retrieval.datasets.torch_data import trim_tokens

    ids = tiny.tokenize(["a man in a red coat and black shoes", "a woman"])
    cut = trim_tokens(ids)
    longest = int((ids != 0).sum(1).max())
    assert cut.shape[1] % 8 == 0 and longest <= cut.shape[1] < longest + 8
    assert torch.equal(cut, ids[:, : cut.shape[1]]) and (ids[:, cut.shape[1]:] == 0).all()
    assert torch.allclose(tiny.encode_text(cut, trim=False)[0], tiny.encode_text(ids, trim=False)[0], atol=1e-5)
    assert trim_tokens(ids, multiple=1000).shape == ids.shape  # never wider than the context


def test_token_table_can_be_frozen():
    from dataclasses import replace

    from person_retrieval.models import MINI_CONFIGS, mini_clip

    assert build_backbone(None, "tiny").clip.token_embedding.weight.requires_grad
    frozen = mini_clip(replace(MINI_CONFIGS["tiny"], freeze_token_embedding=True))
    assert not frozen.clip.token_embedding.weight.requires_grad


def test_conv_tower_tokens_are_its_map_cells(tiny):
    from person_retrieval.models.conv_tower import ConvTower

    visual = tiny.clip.visual
    assert isinstance(visual, ConvTower)
    h, w = tiny.image_size
    x = torch.randn(2, 3, h, w)
    pooled, tokens = tiny.encode_image(x)
    assert tokens.shape == (2, (h // 16) * (w // 16), tiny.embed_dim)
    fmap = visual.features(x)  # the tokens are the map's cells, row by row, projected
    assert torch.allclose(tokens[:, 1], visual.token_proj(fmap)[:, :, 0, 1], atol=1e-5)


def test_a_locked_tower_keeps_its_trunk_and_statistics():
    torch.manual_seed(0)
    bb = build_backbone(None, "tiny")
    tower = bb.clip.visual.lock()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    bb.train()
    assert not tower.features.training and not tower.trunk.training and tower.head.training
    h, w = bb.image_size
    pooled, tokens = bb.encode_image(torch.randn(4, 3, h, w))
    (pooled.sum() + tokens.sum()).backward()
    assert all(p.grad is None for p in tower.features.parameters()) and all(p.grad is None for p in tower.trunk.parameters())
    assert tower.head[0].weight.grad is not None and tower.token_proj.weight.grad is not None
    after = tower.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("features", "trunk")))  # BN stats too
    tower.lock(False)
    assert tower.features.training and all(p.requires_grad for p in tower.features.parameters())


def test_the_vit_tower_is_still_there():
    from dataclasses import replace

    from person_retrieval.models import MINI_CONFIGS, mini_clip

    vit = mini_clip(replace(MINI_CONFIGS["tiny"], vision="vit"))
    h, w = vit.image_size
    assert vit.encode_image(torch.randn(1, 3, h, w))[1].shape == (1, (h // 8) * (w // 8), vit.embed_dim)
    with pytest.raises(ValueError, match="'conv' or 'vit'"):
        mini_clip(replace(MINI_CONFIGS["tiny"], vision="resnet"))


def test_a_locked_trunk_remembers_its_output_exactly():
    from person_retrieval.models import conv_tower

    torch.manual_seed(0)
    bb = build_backbone(None, "tiny")
    h, w = bb.image_size
    x = torch.randn(5, 3, h, w)
    tower = bb.clip.visual.eval()
    want = tower(x)  # unlocked: computed
    tower.lock()
    conv_tower._TRUNK_MEMO.clear()
    first = tower(x[:3])
    assert len(conv_tower._TRUNK_MEMO) == 3
    again = tower(x[[4, 2, 0, 1, 3]])  # two new images, three remembered, in another order
    assert len(conv_tower._TRUNK_MEMO) == 5
    for got, ref in ((first, [0, 1, 2]), (again, [4, 2, 0, 1, 3])):
        assert all(torch.allclose(g, r[ref], atol=1e-5) for g, r in zip(got, want))
    z_first, z_again = tower._locked_trunk(x[:3])[0], tower._locked_trunk(x[[4, 2, 0, 1, 3]])[0]
    assert torch.equal(z_again[1:4], z_first[[2, 0, 1]])  # a remembered image: the very same trunk output
    other = build_backbone(None, "tiny").clip.visual.eval().lock()  # other weights: its own entries
    other(x[:1])
    assert len(conv_tower._TRUNK_MEMO) == 6


def test_a_shared_prefix_is_read_once_and_gives_the_same_features_and_gradients(tiny):
    from person_retrieval.models.backbone import common_prefix

    head = "you are a system that finds people from what a witness says about them and their clothes"
    texts = [f"{head} the man in a red shirt", f"{head} a woman", f"{head} one child with a blue bag and black shoes"]
    ids = tiny.tokenize(texts)
    assert common_prefix(ids) == len(tiny.tokenizer.encode(head)) + 1  # the start token and the head's words
    assert common_prefix(ids[:1]) == ids.shape[1]
    outs = []
    for shared in (False, True):
        tiny.zero_grad()
        pooled, tokens = tiny.encode_text(ids, shared_prefix=shared)
        (pooled.square().sum() + tokens.sum()).backward()
        grads = {n: p.grad.clone() for n, p in tiny.clip.transformer.named_parameters() if p.grad is not None}
        outs.append((pooled.detach(), tokens.detach(), grads))
    (p0, t0, g0), (p1, t1, g1) = outs
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(t1, t0, atol=1e-5, rtol=1e-4)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(tiny.encode_text(ids[1:2], shared_prefix=True)[0], p0[1:2], atol=1e-5, rtol=1e-4)  # one row: plain path


def test_a_remembered_trunk_output_does_not_depend_on_what_was_computed_with_it():
    """The memo computes missing images in fixed-size chunks: an image's stored output is the same bits
    whether it was missing alone or among many others, at any position (the runs' numbers must not depend
    on what the process did before)."""
    from person_retrieval.models import conv_tower

    torch.manual_seed(0)
    tower = build_backbone(None, "tiny").clip.visual.eval().lock()
    h, w = tower.image_size
    x = torch.randn(100, 3, h, w)
    conv_tower._TRUNK_MEMO.clear()
    alone = tower._locked_trunk(x[70:71])
    conv_tower._TRUNK_MEMO.clear()
    crowd = tower._locked_trunk(torch.cat([x[:70], x[70:71], x[70:71], x[71:]]))  # at position 70 (and 71: a repeat)
    assert len(conv_tower._TRUNK_MEMO) == 100
    for a, c in zip(alone, crowd):
        assert torch.equal(a[0], c[70]) and torch.equal(c[70], c[71])
    conv_tower._TRUNK_MEMO.clear()
    torch.testing.assert_close(tower._locked_trunk(x[:5])[0], tower.trunk_features(x[:5])[0])


@pytest.mark.parametrize("shared_head", [True, False])
def test_every_prefix_of_a_text_from_one_pass_equals_encoding_it_alone(tiny, shared_head):
    """encode_text_ends: the end-of-text token of each prefix, placed at the prefix's end and seen by nothing
    else, gives that prefix's features; the text's own tokens are those of any prefix that holds them."""
    head = "you are a system that finds people from what a witness says about them" if shared_head else ""
    parts = ["the man wears a red shirt", "and blue jeans", "he carries a black bag", "no hat"]
    texts = [[f"{head} {' '.join(parts[:n])}" for n in range(1, 5)], [f"{head} {' '.join(parts[1:n])}" for n in range(2, 6)]]
    cut = [tiny.tokenize(t) for t in texts]  # per row: its four prefixes, each encoded alone
    whole = torch.stack([c[-1] for c in cut])
    ends = torch.stack([c.argmax(-1) for c in cut])
    content = whole.masked_fill(torch.arange(whole.shape[1]) == whole.argmax(-1, keepdim=True), 0)[:, : int(ends.max())]
    tokens = tiny.encode_text_ends(content, ends)
    m = content.shape[1]
    for row in range(2):
        pooled, toks = tiny.encode_text(cut[row])
        torch.testing.assert_close(tokens[row, m:], pooled, atol=1e-5, rtol=1e-4)
        n = int(ends[row, 0])  # the shortest prefix's words
        torch.testing.assert_close(tokens[row, :n], toks[0, :n], atol=1e-5, rtol=1e-4)


def test_rde_token_selection_with_context_reads_the_tokens_it_leaves_out():
    """Without context, RDE's TSE sees only the tokens it selects; with a context layer, every real token
    shapes the selected ones, padding never does, and without it there are no extra weights (old
    checkpoints load)."""
    from person_retrieval.papers.tpr import TokenSelection

    torch.manual_seed(0)
    dim, T = 64, 10
    plain, ctx = TokenSelection(dim, 0.3), TokenSelection(dim, 0.3, context_layers=1)
    assert not any(k.startswith("context") for k in plain.state_dict())
    pooled = torch.randn(2, dim)
    tokens = torch.randn(2, T, dim)
    tokens[:, -1] = -pooled  # the lowest score: never among the 3 selected
    moved = tokens.clone()
    moved[:, -1] = -2 * pooled
    assert torch.equal(plain(tokens, pooled), plain(moved, pooled))
    out = ctx(tokens, pooled)
    assert out.shape == (2, dim)
    assert not torch.allclose(out, ctx(moved, pooled))
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[:, -1] = False  # padding: with context, changing it changes nothing
    assert torch.allclose(ctx(tokens, pooled, valid), ctx(moved, pooled, valid), atol=1e-6)


def test_irra_masking_chooses_words_only_in_irras_proportions():
    """IRRA's masking: only words are chosen (never start, end or padding), about 15% of them; of the chosen,
    80% become [MASK], 10% a random token, 10% stay; the labels hold the original ids there and 0 elsewhere;
    every caption has a masked word; the same generator state gives the same masks."""
    from person_retrieval.papers.tpr import MASK_ID, mask_words

    words = torch.randint(1, 40000, (400, 40))
    ids = torch.cat([torch.full((400, 1), 49406), words, torch.full((400, 1), 49407), torch.zeros(400, 6, dtype=torch.long)], 1)
    ids[0, 2:] = 0  # a one-word caption: its word is always masked
    ids[0, 2] = 49407
    torch.manual_seed(3)
    masked, labels = mask_words(ids)
    torch.manual_seed(3)
    again = mask_words(ids)
    assert torch.equal(masked, again[0]) and torch.equal(labels, again[1])
    chosen = labels != 0
    assert not chosen[:, 0].any() and not chosen[:, 41:].any() and chosen.any(1).all() and chosen[0, 1]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    assert abs(chosen[1:, 1:41].float().mean().item() - 0.15) < 0.01
    got = masked[chosen]
    is_mask, kept = got == MASK_ID, got == ids[chosen]
    assert abs(is_mask.float().mean().item() - 0.8) < 0.02 and abs(kept.float().mean().item() - 0.1) < 0.02
    other = got[~is_mask & ~kept]
    assert len(other) > 0 and other.min() >= 1 and other.max() < MASK_ID


def test_irr_reads_the_image_and_never_the_padding():
    """IRRA's relation reasoning: the masked words' logits span the vocabulary, change with the image, and a
    short caption's are the same alone as beside a longer one (its padding is never attended to); the loss of
    uniform logits is log |V|."""
    import math

    from person_retrieval import losses
    from person_retrieval.papers.tpr import IRRAModel, mask_words

    torch.manual_seed(0)
    bb = build_backbone(None, "tiny")
    model = IRRAModel(bb, num_ids=5, irr_layers=1).eval()
    ids = bb.tokenize(["a woman in a red coat and black trousers", "a man with a blue bag"])
    ids = ids[:, :16]
    masked, labels = mask_words(ids)
    images = torch.rand(2, 3, *bb.image_size)
    with torch.no_grad():
        _, txt = model(images, ids, masked, labels)
        _, other = model(torch.rand(2, 3, *bb.image_size), ids, masked, labels)
        n = int((ids[1] != 0).sum())  # the shorter caption, without the padding the longer one gives it
        _, alone = model(images[1:], ids[1:, :n], masked[1:, :n], labels[1:, :n])
    m = int((labels != 0).sum())
    assert n < ids.shape[1] and txt["mlm_logits"].shape == (m, 49408)
    assert not torch.allclose(txt["mlm_logits"], other["mlm_logits"], atol=1e-4)
    m1 = int((labels[1] != 0).sum())
    torch.testing.assert_close(txt["mlm_logits"][-m1:], alone["mlm_logits"], atol=1e-5, rtol=1e-4)
    uniform = losses.mlm_loss(torch.zeros(m, 49408), labels[labels != 0])
    assert abs(uniform.item() - math.log(49408)) < 1e-4
