"""DiaNA / ChatPedes (notebook 06): dialogue generation, true categories, the vote, Table 2, the model's
refiners, masking and the dialogue encoders."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from person_retrieval import losses
from person_retrieval.datasets import read_chatpedes
from person_retrieval.papers import diana

PERSON = {"gender": "man", "upper_type": "t-shirt", "upper_color": "blue", "upper_pattern": "plain", "hat": "none", "hat_color": "red",
          "bag": "backpack", "bag_color": "black", "held": "none", "accessory": "none", "shoes_type": "sneakers", "shoes_color": "white"}


def test_true_categories_known_answers():
    rounds = [("What does the person look like?", "A man is wearing a blue tee."),
              ("Is the person carrying a bag?", "Yes, he is carrying a black backpack."),
              ("Is the person wearing a hat?", "He is also wearing a red cap."),           # no hat: invented
              ("What shoes is the person wearing?", "He has black sneakers."),              # white: wrong colour
              ("Does the person have a backpack or a bag with them?", "Yes, he has a black backpack."),  # asked before
              ("Is the person holding anything?", "No, his hands are empty.")]
    assert diana.true_categories(PERSON, rounds) == ["Matched", "Matched", "Hallucinatory", "Contradictory", "Repeated", "Matched"]


def test_the_vote_keeps_a_round_when_a_majority_says_matched():
    m, c, h = "Matched", "Contradictory", "Hallucinatory"
    cats, keep = diana.vote([[m, c, h], [m, m, c], [c, m, h]])
    assert cats == [m, m, h] and keep == [True, True, False]
    cats, keep = diana.vote([[c], [h], None])  # one evaluator did not answer: it abstains; a tie goes to the earlier category
    assert cats == [c] and keep == [False]
    assert diana.vote([[m], None, None]) == ([m], [True])
    assert diana.vote([None, None, None], n_rounds=2) == ([None, None], [False, False])  # nobody judged: nothing kept
    with pytest.raises(ValueError, match="no evaluator"):
        diana.vote([None, None])


def test_a_careful_questioner_covers_new_ground_and_dialogues_are_reproducible(tiny_world):
    from person_retrieval.assistants import grammar, mini_vlm
    from person_retrieval.viz import load_image

    paths, _, _, _ = diana._records(tiny_world["cuhk_pedes"], "test")
    ims = [load_image(p) for p in paths[:4]]
    vlm = mini_vlm("tiny", 0, progress=False)
    a = diana.generate_dialogues(ims, ["a", "b", "c", "d"], diana.GENERATORS[0], vlm, rounds=6)
    assert a == diana.generate_dialogues(ims, ["a", "b", "c", "d"], diana.GENERATORS[0], vlm, rounds=6)
    assert [len(d) for d in a] == [6] * 4
    for d in a:
        asked = [grammar.question_groups(q) for q, _ in d[1:]]
        assert len({tuple(g) for g in asked}) == len(asked)  # never the same group twice in six rounds


def test_chatpedes_construction_writes_the_release_format_and_table_2(tiny_world):
    folder = diana.build_chatpedes("tiny", 0, progress=False)
    recs = diana.read_records(folder)
    assert {r["generator"] for r in recs} == {"A", "B"} and all(len(r["rounds"]) == 6 == len(r["truth"]) == len(r["vote"]) for r in recs)
    raw, clean = read_chatpedes(folder / "raw", "train"), read_chatpedes(folder / "clean", "train")
    n_raw = sum(len(c) for e in raw for c in e["chats"])
    n_clean = sum(len(c) for e in clean for c in e["chats"])
    kept = sum(sum(r["kept"]) for r in recs if r["split"] == "train")
    assert n_raw == 6 * sum(r["split"] == "train" for r in recs) and n_clean == kept < n_raw
    t2 = diana.cleaning_table(recs)
    assert len(t2) == 6 and (t2[list(diana.CATEGORIES)].sum(axis=1) == t2["total"]).all()
    q = diana.evaluator_quality(recs)
    assert set(q.judge) == {"Qwen 2.5", "Llama 3", "InternVL", "vote", "vote (kept)"}
    assert q.precision.dropna().between(0, 100).all() and q.recall.dropna().between(0, 100).all()
    never = q[(q.judge == "InternVL") & (q.category == "Repeated")]
    assert never.precision.isna().all() and (never.recall == 0).all()  # InternVL's reader never compares rounds


def test_a_tpr_dataset_reads_as_one_round_dialogues(tiny_world, tmp_path):
    from person_retrieval.datasets import load_split

    out = diana.tpr_as_chatpedes("rstpreid", tiny_world["rstpreid"], tmp_path / "chat")
    test = read_chatpedes(out, "test")
    split = load_split("rstpreid", tiny_world["rstpreid"], "test")
    assert len(test) == len(split.image_paths)
    answers = sorted(c[0][1]["value"] for e in test for c in e["chats"])
    assert answers == sorted(split.captions) and all(len(c) == 1 for e in test for c in e["chats"])


# ---------------------------------------------------------------------------------------------- model
def test_masking_is_bert_style_and_leaves_the_rest_alone():
    ids = torch.arange(1, 10001).view(100, 100)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    valid[:, 10:90] = True
    g = torch.Generator().manual_seed(0)
    assert torch.equal(diana.mask_tokens(ids, valid, 0.0, 0, (1, 5)), ids)
    out = diana.mask_tokens(ids, valid, 1.0, mask_id=-7, vocab=(20000, 20001), generator=g)
    assert torch.equal(out[~valid], ids[~valid])
    n = valid.sum().item()
    masked, rand, same = (out == -7).sum().item() / n, (out == 20000).sum().item() / n, (out == ids)[valid].float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(rand - 0.1) < 0.02 and abs(same - 0.1) < 0.02
    part = diana.mask_tokens(ids, valid, 0.15, -7, (20000, 20001), generator=g)
    assert abs((part != ids).sum().item() / n - 0.15 * 0.9) < 0.01


def test_the_refiner_ignores_padding_and_refined_scores_are_mean_cosines():
    torch.manual_seed(0)
    ref = diana.AttributeRefiner(16, k=4, heads=4).eval()
    x = torch.randn(2, 5, 16)
    valid = torch.tensor([[True, True, True, False, False], [True] * 5])
    y = x.clone()
    y[0, 3:] = 50.0
    torch.testing.assert_close(ref(x, valid), ref(y, valid))
    assert ref(x, valid).shape == (2, 4, 16)
    a = torch.randn(3, 4, 16)
    s = diana.DiaNAModel.refined_scores(a, a)
    torch.testing.assert_close(s.diagonal(), torch.ones(3))
    b = torch.randn(2, 4, 16)
    want = torch.stack([torch.stack([F.cosine_similarity(a[i], b[j], dim=-1).mean() for j in range(2)]) for i in range(3)])
    torch.testing.assert_close(diana.DiaNAModel.refined_scores(a, b), want)


def test_sdm_from_scores_is_sdm_on_a_dot_product():
    g = torch.Generator().manual_seed(0)
    i, t = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(2))
    pids = torch.tensor([0, 0, 1, 2, 3, 3])
    torch.testing.assert_close(losses.sdm_from_scores(i @ t.T, pids, 20.0), losses.sdm_loss(i, t, pids, 20.0))


def test_dialogue_text_follows_the_system_message_and_vicuna_roles():
    text = diana.dialogue_text([("What is he wearing?", "A red shirt."), ("Any bag?", "No.")])
    assert text.startswith("You are an intelligent system designed to retrieve pedestrian images from dialogues.")
    assert text.endswith("ASSISTANT: What is he wearing?\nUSER: A red shirt.\nASSISTANT: Any bag?\nUSER: No.")


def test_a_llama_dialogue_encoder_from_a_local_folder_trains_in_the_task(tiny_world, tmp_path):
    """The real path's encoder class: a tiny Llama saved to a folder and loaded back as a user's Llama-3.2-1B
    would be; the pooled feature is the last real token's state; one training step changes the projections."""
    from person_retrieval.assistants import tiny

    model, tok = tiny.llama_lm()
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    enc = diana.LlamaDialogueEncoder.load(tmp_path / "llama", dim=8, max_length=64)
    ids = enc.tokenize(["a man in a red shirt", "a woman"])
    pooled, tokens, valid = enc(ids)
    assert pooled.shape == (2, 8) and tokens.shape == (2, 64, 8) and valid.sum(1).tolist() == (ids >= 0).sum(1).tolist()
    longer = enc.tokenize(["a man in a red shirt and more words here", "a woman"])
    torch.testing.assert_close(enc(longer)[0][1], pooled[1])  # padding does not move the pooled feature
    folder = diana.build_chatpedes("tiny", 0, progress=False)
    task = diana.DiaNATask(chat_root=str(folder / "clean"), scale="tiny", llm=str(tmp_path / "llama"))
    m = task.build()
    data = task.train_data()
    batch = data.batch(torch.arange(4))
    from person_retrieval.datasets.torch_data import to_float

    loss, logs = task.loss(m, {**batch, "image": to_float(batch["image"])}, lambda x: x)
    loss.backward()
    assert set(logs) == {"itc", "itc_refined", "sdm", "sdm_refined"}
    assert m.dialogue_encoder.proj.weight.grad.abs().sum() > 0


class _Echo(torch.nn.Module):
    """embed_texts returns each row's token sum and length, and remembers each batch's width."""

    def __init__(self):
        super().__init__()
        self.w, self.widths = torch.nn.Parameter(torch.zeros(1)), []

    def embed_texts(self, ids):
        self.widths.append(ids.shape[1])
        real = ids > 0
        return {"global": torch.stack([(ids * real).sum(1).float(), real.sum(1).float()], 1)}


def test_dialogues_embed_in_length_order_and_come_back_in_input_order():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 30, (50,), generator=g)
    ids = torch.zeros(50, 32, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 100, (int(n),), generator=g)
    echo = _Echo()
    out = diana.embed_dialogues(echo, ids, batch=8)["global"]
    assert echo.widths == sorted(echo.widths) and echo.widths[0] < 32  # short dialogues are not padded to the longest
    torch.testing.assert_close(out[:, 0], ids.sum(1).float())
    torch.testing.assert_close(out[:, 1], lengths.float())
    llama_style = ids.masked_fill(ids == 0, -1)  # -1 marks padding there
    assert diana.trim_dialogue(llama_style).shape[1] == int(lengths.max())
    assert diana.trim_dialogue(ids).shape[1] == min(32, -(-int(lengths.max()) // 8) * 8)


def test_the_rounds_curve_at_chosen_rounds_equals_the_full_curve(tiny_world):
    folder = diana.build_chatpedes("tiny", 0, progress=False)
    task = diana.DiaNATask(chat_root=str(folder / "clean"), scale="tiny")
    torch.manual_seed(0)
    m = task.build()
    entries = read_chatpedes(folder / "clean", "test")
    full = diana.rounds_curve(m, entries, folder / "clean" / "imgs", task._tokenize, task.backbone.image_size, 3)
    some = diana.rounds_curve(m, entries, folder / "clean" / "imgs", task._tokenize, task.backbone.image_size, 3, at=[1, 3])
    assert full.rounds.tolist() == [1, 2, 3] and some.rounds.tolist() == [1, 3]
    one = diana.chat_retrieval_data(entries, folder / "clean" / "imgs", task._tokenize, task.backbone.image_size, n_rounds=1)
    from person_retrieval.models import evaluate_retrieval

    want = evaluate_retrieval(m, one)
    for k in ("R1", "R10"):
        assert abs(full.set_index("rounds").loc[1, k] - want[k]) < 1e-6
        assert abs(some.set_index("rounds").loc[3, k] - full.set_index("rounds").loc[3, k]) < 1e-6


def test_ablation_variants_start_from_the_one_stage_1(tiny_world, tmp_path):
    from safetensors.torch import save_model

    task = diana.DiaNATask(chat_root="unused", scale="tiny")
    torch.manual_seed(0)
    ref = diana.DiaNAModel(task.backbone, 16, True)
    save_model(ref, str(tmp_path / "stage1.safetensors"))
    same = diana.DiaNAModel(task.backbone, 16, True)
    assert diana.load_stage1(same, tmp_path / "stage1.safetensors") == []
    fewer = diana.DiaNAModel(task.backbone, 4, True)
    assert diana.load_stage1(fewer, tmp_path / "stage1.safetensors") == ["refiner_img.queries", "refiner_txt.queries"]
    torch.testing.assert_close(fewer.refiner_img.queries, ref.refiner_img.queries[:4])
    more = diana.DiaNAModel(task.backbone, 32, True)
    fresh = more.refiner_img.queries[16:].detach().clone()
    diana.load_stage1(more, tmp_path / "stage1.safetensors")
    torch.testing.assert_close(more.refiner_img.queries[:16], ref.refiner_img.queries)
    torch.testing.assert_close(more.refiner_img.queries[16:], fresh)
    two = diana.DiaNAModel(task.backbone, 16, False)
    adapted = diana.load_stage1(two, tmp_path / "stage1.safetensors")
    assert adapted and all(n.startswith("refiner_txt.") for n in adapted)
    assert two.refiner_txt is not two.refiner_img
    torch.testing.assert_close(two.refiner_txt.cross.in_proj_weight, ref.refiner_img.cross.in_proj_weight)
    with pytest.raises(FileNotFoundError, match="stage-1 weights"):
        diana.load_stage1(two, tmp_path / "missing.safetensors")
    other = diana.DiaNAModel(task.backbone, 16, True)
    other.logit_scale = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="'logit_scale' has shape"):
        diana.load_stage1(other, tmp_path / "stage1.safetensors")


def test_masking_never_touches_the_system_message(tiny_world):
    folder = diana.build_chatpedes("tiny", 0, progress=False)
    task = diana.DiaNATask(chat_root=str(folder / "clean"), scale="tiny", mask_prob=0.9)
    n = task._system_tokens
    sys_ids = task._tokenize([diana.dialogue_text([])])[0]
    assert n == int((sys_ids != 0).sum()) - 1  # the start token and the system message's words, not the end token
    data = task.train_data()
    torch.manual_seed(0)
    batch = data.batch(torch.arange(8))
    unmasked = data.prefix_tokens[torch.arange(8), 0].long()
    assert torch.equal(batch["ids"][:, :n], unmasked[:, :n])
    assert (batch["ids"][:, n:] != unmasked[:, n: batch["ids"].shape[1]]).any()  # the dialogue itself is masked


def test_image_links_are_relative_and_mended_after_a_move(tmp_path):
    (tmp_path / "a" / "world" / "imgs").mkdir(parents=True)
    (tmp_path / "a" / "world" / "imgs" / "x.jpg").write_bytes(b"jpg")
    (tmp_path / "a" / "chat").mkdir()
    diana.link_images(tmp_path / "a" / "world" / "imgs", tmp_path / "a" / "chat" / "imgs")
    assert not Path(os.readlink(tmp_path / "a" / "chat" / "imgs")).is_absolute()
    (tmp_path / "a").rename(tmp_path / "b")  # the whole cache moves: a relative link still resolves
    assert (tmp_path / "b" / "chat" / "imgs" / "x.jpg").read_bytes() == b"jpg"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "b" / "world" / "imgs").rename(tmp_path / "elsewhere" / "imgs")  # only the images move: mended
    diana.link_images(tmp_path / "elsewhere" / "imgs", tmp_path / "b" / "chat" / "imgs")
    assert (tmp_path / "b" / "chat" / "imgs" / "x.jpg").read_bytes() == b"jpg"


def test_every_round_count_from_one_pass_equals_a_pass_per_cut():
    """embed_rounds reads each dialogue once and gives, for every N, what the dialogue cut to N rounds gives
    alone, also for a dialogue longer than the 248 positions (cut by the tokenizer) and for a text format
    whose cuts are not token prefixes (those dialogues fall back to a pass per cut)."""
    from person_retrieval.models import build_backbone, stretch_text_encoder

    torch.manual_seed(0)
    bb = build_backbone(None, "tiny")
    stretch_text_encoder(bb, keep=20, length=248)
    m = diana.DiaNAModel(bb, 4).eval()
    qs = ["what is the person wearing on top?", "any bag?", "what shoes?", "a hat?"]
    ans = ["a red shirt and blue jeans", "a black backpack", "white sneakers", "no hat"]
    chats = [[(qs[(i + j) % 4], ans[(i * j) % 4]) for j in range(1 + i % 4)] for i in range(9)]
    chats.append([(q, "a long coat with many pockets and a scarf and gloves " * 4) for q in qs])  # over 248 tokens
    ns = [1, 2, 4]
    content, ends, one_pass = diana.round_prefixes(bb.tokenize, chats, ns)
    assert one_pass.all() and int(ends[-1, -1]) == 247  # the long one is cut where the tokenizer cuts it
    glued = lambda r: "".join(a for _, a in r)  # noqa: E731  (no separator: a cut splits a word)
    assert not diana.round_prefixes(bb.tokenize, chats, ns, glued)[2].all()
    for text in (diana.dialogue_text, glued):
        one = diana.embed_rounds(m, bb.tokenize, chats, ns, text, batch=4)
        for n, e in zip(ns, one):
            alone = diana.embed_dialogues(m, bb.tokenize([text(r[:n]) for r in chats]))
            for k in ("global", "refined"):
                torch.testing.assert_close(e[k], alone[k], atol=1e-5, rtol=1e-4)


def test_records_of_a_real_cuhk_pedes_folder_have_no_truth_and_released_ids(tiny_world, tmp_path):
    """Notebook 06 at paper builds ChatPedes (when asked) on the user's CUHK-PEDES, where no world_meta.json says what
    each image shows: the records read, with the released ids and no true person; ``limit`` keeps the first images."""
    import shutil

    from person_retrieval.datasets import load_split

    real = tmp_path / "CUHK-PEDES"
    shutil.copytree(tiny_world["cuhk_pedes"], real, ignore=shutil.ignore_patterns("world_meta.json", "world.json"))
    paths, caps, people, ids = diana._records(real, "test", limit=3)
    s = load_split("cuhk_pedes", real, "test")
    assert len(paths) == len(caps) == 3 and people == [None] * 3 and ids == [int(p) + 1 for p in s.image_pids[:3]]
    assert all(caps) and diana._records(tiny_world["cuhk_pedes"], "test", limit=3)[3] == ids  # the world's ids agree
    with pytest.raises(ValueError, match="needs vlm"):
        diana.build_chatpedes("paper", 0, root=real, limit=1)
    with pytest.raises(ValueError, match="true category"):
        diana.evaluator_quality([{"truth": None, "rounds": [], "labels": {}, "vote": [], "kept": []}])


def test_cleaning_table_counts_unparsed_answers():
    recs = [{"generator": "A", "rounds": [("q", "a")] * 2, "kept": [True, False], "labels": {"x": ["Matched", "Repeated"], "y": None}}]
    t = diana.cleaning_table(recs).set_index("evaluator")
    assert t.loc["x", "unparsed"] == 0 and t.loc["y", "unparsed"] == 2 and t.loc["y", "Matched"] == 0


def test_paper_checks_name_the_parameter():
    diana.check_paper_models("paper", "/data", "ViT-B-16", None)  # the release read, nothing built: fine
    with pytest.raises(ValueError, match="parameter 'weights'"):
        diana.check_paper_models("paper", "/data", None, "qwen")
    with pytest.raises(ValueError, match="parameter 'n_live'"):
        diana.check_paper_models("paper", "/data", "ViT-B-16", None, n_live=4)
    diana.check_paper_models("small", None, None, None, n_dialogues=4)  # the mini world: the mini MLLM writes


def test_training_images_are_flipped_cropped_and_erased_as_the_release_does(tiny_world):
    """The release's order and settings (train/main/train/dataset.py:99-108): flip, Pad(10) + RandomCrop at
    384 pixels high (scaled here to the image height), erasing p 0.5 of 2-40% of the area with its fill."""
    assert diana.crop_padding(384) == 10 and diana.crop_padding(128) == 3 and diana.crop_padding(64) == 2
    assert diana.crop_padding(128, 10) == 10 and diana.crop_padding(128, 0) == 0
    fill = torch.tensor(diana.erase_fill(), dtype=torch.uint8)
    from person_retrieval.datasets.torch_data import CLIP_MEAN, to_float

    # the release erases after Normalize(mean, std) with value=mean: the erased pixel *normalises to* the mean
    torch.testing.assert_close(to_float(fill.view(1, 3, 1, 1)).flatten(), CLIP_MEAN.flatten(), atol=1e-2, rtol=0)

    img = torch.full((64, 3, 32, 16), 50, dtype=torch.uint8)
    torch.manual_seed(0)
    out = diana.augment_images(img.clone(), 2, 1.0)
    assert out.shape == img.shape and out.dtype == torch.uint8
    black = (out == 0).all(1)  # the padding the crop shows: bands at most 2 pixels wide along the borders
    assert black.any() and not black[:, 2:-2, 2:-2].any()
    erased = (out == fill.view(1, 3, 1, 1)).all(1)
    assert erased.any((1, 2)).float().mean() > 0.9
    assert ((out == 50).all(1) | black | erased).all()  # nothing else: the image, the padding, the erased box

    folder = diana.build_chatpedes("tiny", 0, progress=False)
    task = diana.DiaNATask(chat_root=str(folder / "clean"), scale="tiny")
    data = task.train_data()
    assert (data.crop_pad, data.erase_prob) == (2, 0.5)
    idx = torch.arange(12)
    torch.manual_seed(3)
    a = data.batch(idx)
    torch.manual_seed(3)
    b = data.batch(idx)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["ids"], b["ids"])  # the global seed decides
    src = data.images[data.image_ids[idx]]
    assert not any(torch.equal(a["image"][i], src[i]) or torch.equal(a["image"][i], src[i].flip(-1)) for i in range(12))
    plain = diana.DiaNATask(chat_root=str(folder / "clean"), scale="tiny", crop_pad=0, erase_prob=0.0).train_data()
    c = plain.batch(idx)  # without crop and erasing: the flip alone, as before
    assert all(torch.equal(c["image"][i], src[i]) or torch.equal(c["image"][i], src[i].flip(-1)) for i in range(12))
    assert torch.equal(data.images[data.image_ids[idx]], src)  # the shared images are never written


def test_the_runs_cache_keys_carry_the_augmentation(monkeypatch, tmp_path):
    import types

    from person_retrieval import train

    outs = []
    monkeypatch.setattr(train, "fit", lambda spec, cfg: outs.append((spec.kwargs, cfg.out_dir)) or types.SimpleNamespace(out_dir=cfg.out_dir))
    diana.fit_diana(tmp_path, "tiny")
    diana.fit_diana(tmp_path, "tiny", crop_pad=0)
    diana.fit_diana(tmp_path, "tiny", erase_prob=0.0)
    diana.pretrained_diana("tiny")
    diana.pretrained_diana("tiny", crop_pad=0, erase_prob=0.0)
    assert len({o for _, o in outs}) == 5
    assert outs[0][0]["crop_pad"] is None and outs[0][0]["erase_prob"] == 0.5 and outs[3][0]["erase_prob"] == 0.5
    assert (outs[1][0]["crop_pad"], outs[4][0]["erase_prob"]) == (0, 0.0)
    assert diana.DIANA_VERSION >= 5  # runs cached before the augmentation are not read back as runs with it


# ------------------------------------------------------------------ fidelity to the supplement and the release
def _refiner_by_hand(depth: int) -> "diana.AttributeRefiner":
    """A 2-d refiner, one head, one query [1, 0]; every projection the identity (attention) and biases 0."""
    ref = diana.AttributeRefiner(2, k=1, heads=1, depth=depth)
    with torch.no_grad():
        ref.queries.copy_(torch.tensor([[1.0, 0.0]]))
        for mha in [ref.cross] + [b.attn for b in ref.blocks]:
            mha.in_proj_weight.copy_(torch.eye(2).repeat(3, 1))
            mha.in_proj_bias.zero_()
            mha.out_proj.weight.copy_(torch.eye(2))
            mha.out_proj.bias.zero_()
    return ref.eval()


def test_the_refiner_is_the_releases_cross_attention_without_norm_or_residual():
    """modeling_refiner.Refiner.forward_train: x = CrossAttn(Q, X, X); no LayerNorm before it, no Q added after."""
    import math

    ref = _refiner_by_hand(depth=0)
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)  # softmax of q.k / sqrt(2) over the two tokens
    torch.testing.assert_close(ref(x), torch.tensor([[[a, 1 - a]]]))
    torch.testing.assert_close(ref(x, torch.tensor([[True, False]])), torch.tensor([[[1.0, 0.0]]]))  # padding masked


def test_a_refiner_block_is_clips_pre_ln_block_with_a_4x_quickgelu_mlp():
    import math

    ref = _refiner_by_hand(depth=1)
    b = ref.blocks[0]
    assert (b.mlp.c_fc.in_features, b.mlp.c_fc.out_features) == (2, 8) and isinstance(b.mlp.gelu, diana.QuickGELU)
    with torch.no_grad():
        b.attn.out_proj.weight.zero_()  # the block's self-attention adds nothing: the MLP alone is checked
        b.mlp.c_fc.weight.zero_(), b.mlp.c_fc.bias.zero_(), b.mlp.c_proj.weight.zero_(), b.mlp.c_proj.bias.zero_()
        b.mlp.c_fc.weight[0, 0] = 1.0  # hidden unit 0 reads LN(x)[0]
        b.mlp.c_proj.weight[1, 0] = 1.0  # and adds QuickGELU of it to output 1
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    a = math.exp(1 / math.sqrt(2)) / (math.exp(1 / math.sqrt(2)) + 1)
    h = [a, 1 - a]
    m, v = sum(h) / 2, ((h[0] - sum(h) / 2) ** 2 + (h[1] - sum(h) / 2) ** 2) / 2
    ln0 = (h[0] - m) / math.sqrt(v + 1e-5)
    qg = ln0 / (1 + math.exp(-1.702 * ln0))
    torch.testing.assert_close(ref(x), torch.tensor([[[h[0], h[1] + qg]]]))


def test_the_refiner_starts_as_the_release_initialises_it():
    torch.manual_seed(0)
    ref = diana.AttributeRefiner(256, k=16)
    assert ref.cross.num_heads == 4 and ref.blocks[0].attn.num_heads == 4  # the release's hidden // 64
    assert abs(ref.queries.std().item() - 0.02) < 0.003
    assert abs(ref.cross.in_proj_weight.std().item() - 256 ** -0.5) < 0.004
    assert abs(ref.blocks[1].mlp.c_fc.weight.std().item() - 512 ** -0.5) < 0.003
    assert abs(ref.blocks[1].mlp.c_proj.weight.std().item() - 256 ** -0.5 / 2) < 0.003  # (2 layers * 2) ** -0.5
    assert diana.AttributeRefiner(32, k=2).cross.num_heads == 1


def test_sdm_has_the_releases_weight_the_mean_of_its_two_directions():
    """loss.compute_sdm per direction, (t2i + i2t) / 2, eps 1e-6: half of IRRA's summed SDM."""
    import math

    scores, pids = torch.eye(2), torch.tensor([0, 1])
    p = math.e / (math.e + 1)
    row = p * (math.log(p) - math.log(1 + 1e-6)) + (1 - p) * (math.log(1 - p) - math.log(1e-6))
    torch.testing.assert_close(diana.release_sdm(scores, pids, 1.0), torch.tensor(row))  # both directions alike: their mean
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 6, generator=g)
    pid = torch.tensor([0, 0, 1, 2, 3, 3])
    torch.testing.assert_close(diana.release_sdm(s, pid, 20.0), losses.sdm_from_scores(s, pid, 20.0, eps=1e-6) / 2)
    parts = diana.diana_losses(s, s.T, pid, 20.0)
    assert list(parts) == ["itc", "sdm", "itc_refined", "sdm_refined"]  # each with weight 1, as the release sums them
    torch.testing.assert_close(parts["sdm"], diana.release_sdm(s, pid, 20.0))
    torch.testing.assert_close(parts["itc"], losses.itc_from_scores(s, pid, 20.0))
    assert list(diana.diana_losses(s, s, pid, 20.0, sdm=False)) == ["itc", "itc_refined"]  # stage 1: no SDM


def test_paper_scale_trains_with_table_1s_settings(monkeypatch, tmp_path):
    import types

    from person_retrieval import train

    cfgs = []
    monkeypatch.setattr(train, "fit", lambda spec, cfg: cfgs.append((spec.kwargs, cfg)) or types.SimpleNamespace(out_dir=cfg.out_dir))
    diana.pretrained_diana("small", weights="ViT-B-16")
    diana.fit_diana(tmp_path, "small", weights="ViT-B-16")
    diana.pretrained_diana("small", weights="ViT-B-16", seq_length=diana.RELEASE_PRETRAIN_SEQ, num_queries=diana.RELEASE_PRETRAIN_QUERIES)
    (kw1, pre), (kw2, fine), (kw3, rel) = cfgs
    assert (pre.epochs, pre.batch_size, pre.lr, pre.weight_decay, tuple(pre.betas), pre.warmup_steps) == (3, 512, 1e-4, 0.05, (0.9, 0.98), 1000)
    assert (fine.epochs, fine.batch_size, fine.lr, fine.weight_decay, tuple(fine.betas), fine.warmup_steps) == (10, 128, 1e-5, 0.05, (0.9, 0.999), 50)
    assert diana.SEQ_LENGTH == {"pretrain": 100, "finetune": 400} and (kw3["seq_length"], kw3["num_queries"]) == (56, 24)
    assert diana.DiaNATask(stage="pretrain").seq_length == 100 and diana.DiaNATask(chat_root="x").seq_length == 400
    assert rel.out_dir != pre.out_dir and diana.DIANA_VERSION >= 6
    opt = train.build_optimizer(torch.nn.Linear(2, 2), train.TrainConfig(betas=(0.9, 0.999), adam_eps=1e-8))
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_the_categorisation_prompt_is_fig_1a_as_printed():
    from person_retrieval.assistants import prompts

    t = prompts.DIANA_CATEGORIZE.template
    assert "- The User answers the question based on the captions.\n- ...\n- Make sure that each round of dialogue is checked." in t
    assert "User: The pedestrian is wearing a pair of blue shoes.\n...\n- Output:\nMatched, Contradictory, ...\n" in t
    assert "Now classify" not in t and prompts.DIANA_CATEGORIZE.source == "verbatim"
    assert t.endswith("- Captions: {captions}\n- Dialogue:\n{dialogue}\n- Output:")  # the example's own form, nothing added
    assert prompts.DIANA_CATEGORIZE_LAST.source == "ours" and prompts.DIANA_CATEGORIZE_LAST.template.startswith(prompts.DIANA_INSTRUCTION)


def test_the_three_evaluators_read_the_captions_and_the_image_reader_is_an_option():
    from person_retrieval.assistants import MiniLM
    from person_retrieval.assistants.base import categorize_dialogue

    evs = diana.default_evaluators(vlm=None)
    assert [e.role for e in evs] == ["Qwen 2.5", "Llama 3", "InternVL"] and all(isinstance(e, diana.CaptionEvaluator) for e in evs)
    assert isinstance(diana.default_evaluators(vlm=None, image_evaluator=True)[2], diana.ImageEvaluator)
    rounds = [("What is the person wearing?", "A man is wearing a red shirt."), ("What about the top?", "He wears a red shirt.")]
    caps = ["A man in a red shirt and blue jeans."]
    assert categorize_dialogue(MiniLM(0), caps, rounds) == ["Matched", "Repeated"]
    assert categorize_dialogue(MiniLM(0, repeats=False), caps, rounds) == ["Matched", "Matched"]  # InternVL's role: no round compared back


def test_the_paper_image_encoder_is_a_swinv2_folder_selectable_beside_clip(tiny_world, tmp_path):
    from person_retrieval import standins
    from person_retrieval.datasets.torch_data import to_float

    folder = standins.write_swin(tmp_path / diana.SWIN_NAME)
    enc = diana.SwinImageEncoder.load(folder, dim=8)
    pooled, tokens = enc(torch.zeros(2, 3, *diana.SWIN_IMAGE_SIZE))
    assert pooled.shape == (2, 8) and tokens.shape == (2, 48 * 24, 8)  # 384x192 in patches of 4, merged once (two stages)
    assert diana.resolve_vision("small", str(folder)) is None and diana.resolve_vision("paper", "clip") is None
    assert diana.resolve_vision("paper", str(folder)) == str(folder)
    with pytest.raises(ValueError, match="parameter 'vision'"):
        diana.resolve_vision("paper", str(tmp_path / "missing"))
    chat = diana.build_chatpedes("tiny", 0, progress=False)
    task = diana.DiaNATask(chat_root=str(chat / "clean"), scale="tiny", vision=str(folder))
    assert task.image_size == (384, 192)
    m = task.build()
    batch = task.train_data().batch(torch.arange(4))
    assert batch["image"].shape[-2:] == (384, 192)
    loss, _ = task.loss(m, {**batch, "image": to_float(batch["image"])}, lambda x: x)
    loss.backward()
    assert m.image_encoder.proj.weight.grad.abs().sum() > 0 and m.image_encoder.model.embeddings.patch_embeddings.projection.weight.grad is not None
    assert all(p.grad is None for p in m.backbone.clip.visual.parameters())  # CLIP's image tower is not used
