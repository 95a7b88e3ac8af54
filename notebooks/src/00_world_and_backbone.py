# %% [markdown]
# # 00 · The mini pedestrian world, the dataset formats and the metrics
#
# All five papers in this companion work on **text-based person retrieval** (TPR): given a description
# such as *"a woman in a red jacket carrying a black backpack"*, rank a gallery of pedestrian crops so
# that images of that person come first. Their data (CUHK-PEDES, ICFG-PEDES, RSTPReid, ITCPR,
# ChatPedes) and their models (CLIP, FLUX.1-dev, Qwen2.5-VL) are large downloads. This notebook
# introduces the stand-in that lets every notebook run on a laptop: a **procedural pedestrian world**.
#
# The world is not a toy replacement for the method: it writes its datasets **in the real on-disk
# formats**, and every later notebook reads them through the same readers a user's real
# CUHK-PEDES folder goes through. Point `data_root` at real data and the same code runs on it.
#
# What you will see:
# 1. people, their outfits and how images of them are taken;
# 2. captions in the styles of the three TPR datasets, which (like human annotators) mention only part of what is visible;
# 3. the six dataset formats on disk, and their statistics beside the real datasets';
# 4. a composed-retrieval triplet and a dialogue;
# 5. the retrieval metrics (Rank-k, mAP, mINP, and the dialogue metrics) on a case small enough to check by hand.

# %% tags=["parameters"]
from typing import Optional  # the types papermill --help-notebook shows

scale: str = "small"           # "tiny" (seconds, for tests), "small" (classroom), "paper" (real data and weights)
gpus: int = 0                  # 0: CPU; 1: one GPU (the mini CLIP's pretraining); N: DDP over N processes
seed: int = 0                  # an integer, 0 or more: the world, the mini CLIP and the mini MLLM recognizer
data_root: Optional[str] = None   # None: the mini world; a folder holding all six datasets (CUHK-PEDES/, ... ChatPedes/)
weights: Optional[str] = None     # None: the mini backbone (trained in section 6); "ViT-B-16" or a file: real CLIP (paper: required)
epochs: Optional[int] = None      # None: each schedule as set (here: the mini CLIP pretraining); N (1 or more): every training run trains N epochs
max_steps: Optional[int] = None   # None: no cap; N (1 or more): every training run stops after N optimizer steps
batch_size: Optional[int] = None  # None: the scale batch; N (1 or more): every training run takes batches of N

# %%
import json

import pandas as pd
import torch

from person_retrieval import config, datasets, metrics, params, reports, viz, world

# data_root: each dataset's annotation files are parsed and their fields checked here (a truncated file names itself)
P = params.check(dict(scale=scale, gpus=gpus, seed=seed, data_root=data_root, weights=weights, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size), needs=datasets.REAL_FOLDERS)
paper = scale == "paper"
if paper and weights is None:
    raise params.ParameterError("scale='paper' needs real CLIP weights: set parameter 'weights' (e.g. \"ViT-B-16\"); the mini CLIP is not trained at paper")
source = reports.run_source(scale, seed, "mini world" if P["data_root"] is None else f"real data at {P['data_root']}")
sc = config.get_scale(scale)
H = sc.image_height if not paper else 128
print(f"scale={scale}: images {H}x{H // 2}; results go to {config.results_dirs(scale)[0]}")

# %% [markdown]
# ## 1. People
#
# A person has **identity attributes** (gender, age, build, skin tone, hair) and an **outfit** of thirteen
# slots: upper garment type, colour and pattern; lower garment type and colour; shoe type and colour; hat,
# bag, held item and accessory. Values are drawn from skewed priors: black, white and grey dominate the
# palette while purple and orange are rare, and a few co-occurrence rules hold (skirts go with women,
# shorts with sneakers or sandals, coats with dark colours, grey hair with age). The result is what makes
# real galleries hard: **many people look alike**, and the telling detail is often small.

#
# Sections 1 and 2 show the mini world itself; at `scale="paper"` they are skipped (section 3 reads your data).

# %%
if paper:
    print("scale='paper': sections 1-2 (the mini world's people and captions) are skipped; section 3 reads your data")
else:
    rng = config.rng_for(seed, "notebook00", "people")
    people = world.sample_people(rng, 2000)
    counts = pd.Series([p.upper_color for p in people]).value_counts(normalize=True).mul(100).round(1)
    print("upper-garment colour, % of people:")
    print(counts.to_string())

# %%
if not paper:
    look = pd.Series([(p.gender, p.upper_type, p.upper_color, p.lower_type, p.lower_color) for p in people]).value_counts()
    print(f"{(look[look > 1].sum() / len(people)):.0%} of people share gender, top and bottom (type and colour) with someone else")

# %% [markdown]
# Each image adds a **state**: pose (standing or walking), viewpoint (front, back, side), scene, light, and
# camera resolution. A low-resolution camera is simulated as real low-resolution crops look: the image
# is downsampled and upsampled again. A back view hides the face (glasses, masks) and shows the backpack.

# %%
if not paper:
    states = [world.sample_state(rng) for _ in people[:24]]
    imgs = [world.render(p, s, H) for p, s in zip(people[:24], states)]
    fig = viz.image_grid(imgs, [f"{p.upper_color} {p.upper_type}" for p in people[:24]], cols=12,
                         title="24 people of the mini world (title: their top)")
    reports.save_figure(fig, "00_people_grid", scale)

# %% [markdown]
# For this figure we dress one sampled person in distinct colours (a red top, a yellow backpack, glasses)
# so each effect is easy to see.

# %%
if not paper:
    p = people[3].replace(upper_color="red", upper_type="jacket", bag="backpack", bag_color="yellow",
                          accessory="glasses", hat="none", lower_color="navy")
    views = [world.State(view=v, pose=pose, res_factor=r, brightness=b, scene=sc_)
             for v, pose, r, b, sc_ in [("front", "standing", 1, 1.0, "street"), ("side", "walking", 1, 1.0, "street"),
                                        ("back", "walking", 1, 1.0, "street"), ("front", "standing", 2, 0.8, "mall"),
                                        ("front", "standing", 4, 1.2, "park"), ("back", "standing", 2, 0.65, "station")]]
    labels = ["front", "side, walking", "back (backpack)", "res/2, dim", "res/4, bright", "back, res/2"]
    fig = viz.image_grid([world.render(p, s, H) for s in views], labels, cols=6, scale=1.4,
                         title="one identity across viewpoint, pose, light and camera resolution")
    reports.save_figure(fig, "00_identity_views", scale)

# %% [markdown]
# ## 2. Captions in three dataset styles
#
# The three TPR datasets were written by different annotators with different habits:
# **CUHK-PEDES** has two full sentences of about 23 words, **ICFG-PEDES** longer (about 37 words),
# age-prefixed, thorough text, and **RSTPReid** surveillance-style text that talks about the walking
# direction and the place. The world has a grammar for each, with synonyms ("grey"/"gray",
# "rucksack"/"backpack", "trainers"/"sneakers") and varied order.
#
# Crucially, each caption mentions only a **random subset** of what is visible, as human annotators do.
# That gap between what is in the image and what the query says is exactly what the papers' methods
# (multi-turn questions, dialogues, composed queries, synthetic previews) exist to close.

# %%
if not paper:
    s = world.State(view="front", pose="walking", scene="street")
    crng = config.rng_for(seed, "notebook00", "captions")
    print("visible:", ", ".join(world.visible_slots(p, s.view)), "\n")
    for style in world.STYLES:
        for _ in range(2):
            text, mentioned = world.caption(p, s, style, crng)
            print(f"[{style}] {text}\n   mentions {len(mentioned)} of {len(world.visible_slots(p, s.view))} visible slots: {sorted(mentioned)}\n")

# %% [markdown]
# ## 3. The datasets on disk
#
# The world writes six datasets, each in its public release's format and field names (see
# `person_retrieval.datasets.formats`). They are cached by scale and seed under `.cache/world/`, so every
# later notebook finds them ready. With `data_root` set, the same call returns your real folders instead
# (and the first cell has already parsed and checked each annotation file). Every entry shown below is read
# through the library's reader, which names the file and the cause when a file is truncated or malformed.

# %%
roots = {name: world.dataset_root(name, P["data_root"], scale, seed) for name in datasets.REAL_FOLDERS
         if P["data_root"] is None or (P["data_root"] / datasets.REAL_FOLDERS[name]).is_dir()}
for name, root in roots.items():
    files = sorted(f.name for f in root.iterdir())
    print(f"{name:11s} {root}\n            {files}")

# %%
readers = {"cuhk_pedes": ("reid_raw.json", lambda r: datasets.read_tpr_annotations("cuhk_pedes", r)),
           "rstpreid": ("data_captions.json", lambda r: datasets.read_tpr_annotations("rstpreid", r)),
           "itcpr": ("query.json", lambda r: datasets.read_itcpr(r, check_images=False).queries),
           "syncpr": ("SynCPR.json", lambda r: datasets.read_syncpr(r, check_images=False))}
for name, (fname, read) in readers.items():
    if name in roots:
        print(f"--- {name}/{fname}, first entry:\n{json.dumps(read(roots[name])[0], indent=1)[:700]}\n")

# %% [markdown]
# One call reads any split of the three TPR datasets and returns IRRA's fields: `image_paths`,
# `image_pids`, `captions`, `caption_pids`, and `caption_image_ids` (which image each caption describes).

# %%
split = datasets.load_split("cuhk_pedes", roots["cuhk_pedes"], "test")
print(split)
print(split.captions[0], "->", split.image_paths[split.caption_image_ids[0]])

# %% [markdown]
# ### Statistics in the papers' terms
#
# Identities, images, captions, mean caption length (words) and vocabulary size, per split, beside the
# real datasets' numbers as TIPS (Appendix A) reports them. The world's vocabulary is, by design, far
# smaller than human annotators'; its *shape* (split sizes, captions per image, relative lengths) follows
# the real datasets. For the world we also report **coverage**: the mean fraction of visible attributes
# a caption mentions.

# %%
rows = []
for name in ("cuhk_pedes", "icfg_pedes", "rstpreid"):
    if name not in roots:
        continue
    fmt = datasets.TPR_FORMATS[name]
    for sp in fmt.splits:
        st = datasets.split_statistics(datasets.load_split(name, roots[name], sp))
        if P["data_root"] is None:
            st["caption coverage"] = world.caption_coverage(roots[name], sp)
        rows.append({"dataset": name, "split": sp, **st, "source": source})
ref = reports.reported("dataset_statistics")
ref = ref[ref.dataset != "itcpr"].assign(source="paper (TIPS App. C.1; the 'train (CECA)' row: CECA's supplement)").drop(columns=["note"])
stats = pd.concat([pd.DataFrame(rows), ref], ignore_index=True)
stats = stats.sort_values(["dataset", "source"], kind="stable").reset_index(drop=True)
reports.save_table(stats, "00_dataset_statistics", scale, title="Dataset statistics: this run beside the real datasets",
                   notes="Coverage = mean fraction of the visible slots a caption mentions (measurable in the world only).")
stats

# %% [markdown]
# ## 4. A composed-retrieval triplet and a dialogue
#
# **Composed person retrieval** (SynCPR / ITCPR, notebook 03-04) queries with a reference image plus a
# relative caption ("now in a red coat, no backpack"); the target is the same person after the change.
# In ITCPR's format, a gallery item is the ground truth of a query when their `instance_id` agree; `-1`
# marks distractors, among them the same person in the original outfit.

# %%
itcpr = datasets.read_itcpr(roots["itcpr"])
q = itcpr.queries[0]
target = next(g for g in itcpr.gallery if g["instance_id"] == q["instance_id"])
same_person = [g for g in itcpr.gallery if g["person_id"] == q["person_id"] and g["instance_id"] == -1]
imgs = [itcpr.root / q["file_path"], itcpr.root / target["file_path"]] + [itcpr.root / g["file_path"] for g in same_person[:1]]
fig = viz.image_grid(imgs, ["reference", "target", "distractor:\nold outfit"][: len(imgs)], cols=3, scale=1.6,
                     title=f"query: \"{q['caption']}\"")
reports.save_figure(fig, "00_composed_triplet", scale)

# %% [markdown]
# **Chat-based retrieval** (ChatPedes / DiaNA, notebook 06) queries with a dialogue: a questioner asks,
# the user answers from memory of the person. In the world, each answer is grounded in what the image
# shows: absent items get a "no", and what the viewpoint hides gets "I cannot see".

# %%
chat = datasets.read_chatpedes(roots["chatpedes"], "test")[0]
for question, answer in chat["chats"][0]:  # a dialogue is a list of rounds: (question, answer)
    print(f"Q: {question['value']}\nA: {answer['value']}")

# %% [markdown]
# ## 5. The metrics, on a case you can check by hand
#
# For a query, sort the gallery by similarity and let $m_j = 1$ when the item at rank $j$ shows the
# query's person. With $M$ matches in all and $L$ the rank of the last one:
#
# $$\text{R@}k = \mathbb{1}\Big[\textstyle\sum_{j \le k} m_j > 0\Big], \qquad
#   \text{AP} = \frac{1}{M} \sum_j m_j \, \frac{\sum_{i \le j} m_i}{j}, \qquad
#   \text{INP} = \frac{M}{L}.$$
#
# Averaged over queries (in percent) these are Rank-k, mAP and mINP, as IRRA computes them. mINP
# punishes the *hardest* match: it is high only when even the last image of the person ranks early.

# %%
sim = torch.tensor([[0.9, 0.8, 0.1, 0.5],    # query of person 0
                    [0.2, 0.3, 0.6, 0.7]])   # query of person 1
query_pids, gallery_pids = torch.tensor([0, 1]), torch.tensor([0, 1, 0, 2])
toy = metrics.retrieval_metrics(sim, query_pids, gallery_pids, ks=(1, 3))
toy

# %% [markdown]
# By hand: query 0 ranks its two matches 1st and 4th, so AP = (1/1 + 2/4)/2 = 0.75 and INP = 2/4;
# query 1 ranks its one match 3rd, so AP = INP = 1/3. Hence R@1 = 50, R@3 = 100,
# mAP = (0.75 + 0.333)/2 = 54.2 and mINP = (0.5 + 0.333)/2 = 41.7.

# %%
assert abs(toy["mAP"] - 100 * (0.75 + 1 / 3) / 2) < 1e-6 and abs(toy["mINP"] - 100 * (0.5 + 1 / 3) / 2) < 1e-6

# %% [markdown]
# Dialogue retrieval is scored per round. **Recall@k** after round $r$ counts queries whose target is in
# the top $k$ then; **Hits@k** (ChatIR) counts a query from the first round it reaches the top $k$, so it
# never falls; **BRI** (PlugIR) averages, over rounds so far, the log of the best rank reached: lower is
# better, 0 is rank 1 from the start.

# %%
round0 = torch.tensor([[0.5, 0.9, 0.8, 0.1], [0.9, 0.8, 0.1, 0.0]])
round1 = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.9, 0.1, 0.8, 0.7]])
dm = metrics.dialogue_metrics([round0, round1], torch.tensor([0, 1]), torch.tensor([0, 1, 2, 3]), ks=(1, 2))
pd.DataFrame({k: v for k, v in dm.items() if k != "ranks"}, index=["round 0", "round 1"]).round(3)

# %% [markdown]
# Query 1's target drops from rank 2 to rank 4 in round 1: its Recall@2 falls, its Hits@2 does not.
#
# ## 6. The backbone: a mini CLIP
#
# Every paper here starts from CLIP ViT-B/16: an image encoder $f$ and a text encoder $g$ trained so that
# matching pairs have a high cosine similarity $s_{ij} = \langle f(I_i), g(T_j)\rangle$ (unit vectors).
# Its objective is the symmetric InfoNCE loss over a batch, with a temperature $\tau$:
#
# $$\mathcal{L}_{\mathrm{ITC}} = -\frac{1}{2B}\sum_i \Big[\log \frac{e^{s_{ii}/\tau}}{\sum_j e^{s_{ij}/\tau}}
#   + \log \frac{e^{s_{ii}/\tau}}{\sum_j e^{s_{ji}/\tau}}\Big].$$
#
# (In person retrieval two rows of a batch can show the same person; our version treats every such pair as
# a positive.) CLIP learns $\tau$, starting from 0.07. CLIP's weights cannot be downloaded here, so we build a
# **mini CLIP**: open_clip's CLIP class with its text transformer and CLIP's own BPE vocabulary at a small
# size, and a small **convolutional image tower** (open_clip lets a CLIP hold any image tower, as its ResNet
# and timm towers do). It plays the role OpenAI's CLIP plays in the papers; with `weights` set, the real
# model is loaded instead. It is built the way LiT (Zhai et al., CVPR 2022) builds a CLIP, in two stages:
#
# 1. **An image tower that knows people.** The tower first learns to recognise every attribute (gender, age,
#    build, hair, each garment's type, colour and pattern, bag, hat, what is held, accessories, and view,
#    pose and scene) of rendered people who are in no dataset: the mini world's ImageNet, labels and no
#    captions. Its feature map of $H/16 \times W/16$ cells is kept: each cell, projected, is an **image
#    token** (as a ViT's patch tokens are), and the pooled feature reads the whole map in place, since *where*
#    a colour is tells a top from trousers.
# 2. **A text tower that meets it.** Contrastive learning on the world's "web": other people again, each
#    picture with one line of **alt-text** ("a woman in a red coat in a park", "black jeans, white sneakers,
#    guy"), as the web captions CLIP learned from name a few things in passing. The tower's trunk stays
#    **locked**; its projections and the whole text tower learn. The datasets' annotators write something
#    else: long sentences naming many details, in each dataset's own habits. Bridging that gap is what
#    fine-tuning (notebook 01) is for, as it is for real CLIP.
#
# One departure from CLIP's recipe: the mini CLIP trains for minutes, not weeks, and with so few steps a
# fixed, sharper temperature ($\tau = 0.03$) learns faster than a learned one that starts at 0.07. Both stages
# are cached by scale, seed and configuration. With `weights` given (required at `scale="paper"`) neither
# stage runs: the zero-shot test below uses your CLIP.

# %%
from person_retrieval import models, train

if weights is not None:
    print(f"weights={weights!r}: the real CLIP is used from here on; the mini CLIP is not trained")
else:
    tower_path = models.pretrained_image_tower(scale, seed, gpus)
    tower_history = train.read_history(tower_path.parent)
    heads = {k[8:]: v for k, v in max(tower_history, key=lambda h: h["val_acc"]).items() if k.startswith("val_acc_")}
    fig = viz.bar_chart(heads, title="image tower, stage 1: attribute accuracy on held-out people (%)", ylabel="accuracy (%)")
    reports.save_figure(fig, "00_image_tower_attributes", scale)
    print(f"stage 1: {tower_history[-1]['pairs_per_s']:.0f} images/s; mean accuracy over {len(heads)} heads "
          f"{max(h['val_acc'] for h in tower_history):.1f}%")

# %%
if weights is None:
    clip_path = models.pretrained_mini_clip(scale, seed, gpus)
    history = train.read_history(clip_path.parent)
    fig = viz.plot_history(history, ["loss"], ["val_R1", "val_mAP"], title="mini CLIP, stage 2: alt-text pretraining (held-out identities)")
    reports.save_figure(fig, "00_mini_clip_pretraining", scale)
    print(f"{clip_path}\n{history[-1]['pairs_per_s']:.0f} training pairs/s; best validation R1 "
          f"{max(h['val_R1'] for h in history):.1f}")

# %% [markdown]
# ### Zero-shot retrieval
#
# Before any fine-tuning on a retrieval dataset, how well does the backbone retrieve people from their
# descriptions? We embed every test image and caption and rank by cosine similarity. The papers report
# zero-shot CLIP on the real datasets (TIPS Table 1); notebook 01 fine-tunes from this starting point.

# %%
backbone = models.build_backbone(weights, scale)
if weights is None:
    train.load_weights(backbone, clip_path)
zero_shot = models.DualEncoder(backbone).eval()
test_sets = {name: models.split_data(name, roots[name], "test", backbone) for name in ("cuhk_pedes", "icfg_pedes", "rstpreid")
             if name in roots}
rows = [{"method": "mini CLIP zero-shot" if weights is None else f"{weights} zero-shot", "dataset": name,
         **models.evaluate_retrieval(zero_shot, data), "source": source} for name, data in test_sets.items()]
ref = reports.reported("tpr_baselines")
ref = ref[ref.method == "CLIP zero-shot"].drop(columns=["note"]).assign(source="paper (TIPS Table 1, real data)")
zs = pd.concat([pd.DataFrame(rows), ref], ignore_index=True)
reports.save_table(zs, "00_zero_shot", scale, title="Zero-shot text-to-image retrieval")
zs.round(2)

# %% [markdown]
# One query and its top five images (green: the described person). Notice what the top results share
# with the caption: with only part of the outfit described, other people can match it just as well.

# %%
name = next(iter(test_sets))
data = test_sets[name]
metrics_, sim = models.evaluate_retrieval(zero_shot, data, return_similarity=True)
q = 0
top = sim[q].topk(5).indices
fig = viz.image_grid([data.images[i].permute(1, 2, 0).numpy() for i in top],
                     ["match" if data.image_pids[i] == data.caption_pids[q] else "other" for i in top], cols=5, scale=1.3,
                     title=data.captions[q][:110])
reports.save_figure(fig, "00_zero_shot_example", scale)

# %% [markdown]
# ## 7. The assistants: a mini MLLM and a mini LLM
#
# Every paper leans on a large language model (writing prompts, summaries, rephrasings, judging dialogue
# rounds) and a multimodal one (answering questions about a person image, describing it, judging it
# against a text, scoring it 1-10). Real ones (Qwen2.5-VL, Qwen3, ...) load through the transformers
# backend when their weights are on disk. The embedded default is learned from the world: the **mini
# MLLM** sees through a small convolutional *attribute recognizer*, trained on rendered people who appear
# in no dataset, and answers in the world's words from what it predicts, never from the true attributes
# of the image it is asked about. So, like a real MLLM, it is good and imperfect.
#
# This section is about the mini assistants, so at `scale="paper"` it is skipped: no recognizer is trained.
# The notebooks whose paper step asks an MLLM or an LLM take your models through their `vlm` and `llm`
# parameters (None there: the mini ones).

# %%
from person_retrieval import assistants
from person_retrieval.assistants import prompts

if paper:
    print("scale='paper': section 7 (the mini MLLM and mini LLM) is skipped; notebooks 02_tips-07 take real ones as vlm / llm")
else:
    vlm = assistants.mini_vlm(scale, seed)
    acc = pd.Series(vlm.recognizer.accuracy, name="accuracy (%)").round(1)
    reports.save_table(acc.rename_axis("attribute").reset_index().assign(source=reports.run_source(scale, seed, "mini world, held-out people")),
                       "00_recognizer_accuracy", scale, title="Mini MLLM: attribute accuracy on held-out people")
    display(acc.to_frame().T)

# %% [markdown]
# CECA's five questions (its supplement, word for word) asked about three test people, beside what is
# true. The answers are sentences; CECA then asks for a summary, which the mini LLM writes.

# %%
if not paper:
    data = test_sets[name]
    people = [0, 7, 21]
    ims = [data.images[i].permute(1, 2, 0).numpy() for i in people]
    fig = viz.image_grid(ims, [f"person {i}" for i in people], cols=3, scale=1.3)
    answers = {q: vlm.answer(ims, text) for q, text in prompts.CECA_QUESTIONS.items()}
    display(pd.DataFrame(answers, index=[f"person {i}" for i in people]).T)

# %%
from person_retrieval.analysis import world_people  # noqa: E402
from person_retrieval.assistants.grammar import render_claims  # noqa: E402

if not paper:
    lm = assistants.MiniLM(seed)
    if data_root is None:
        truth = world_people(data, roots[name])
    for k, i in enumerate(people):
        summary = lm.generate(prompts.CECA_SUMMARY.format(answers=" ".join(a[k] for a in answers.values())))[0]
        print(f"person {i}\n  mini LLM summary: {summary}")
        if data_root is None:
            print(f"  the truth:        {render_claims({s: v for s, v in truth[i].items() if isinstance(v, str) and v not in ('none', 'plain')})}")

# %% [markdown]
# Every call is counted, so later notebooks can say what a method costs in assistant calls:

# %%
if not paper:
    display(pd.concat({"mini MLLM": vlm.usage.table(), "mini LLM": lm.usage.table()}))
