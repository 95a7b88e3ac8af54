# %% [markdown]
# # 03 · Composed person retrieval, part 1: the SynCPR pipeline and the ITCPR benchmark
#
# In **composed person retrieval** (CPR) a query is a reference image and a relative text, *"wearing a
# white shirt instead, carrying a black bag"*; the target is the same person as changed. Nobody has a
# million such triplets by hand, so the paper behind this notebook (*Automatic Synthetic Data and
# Fine-grained Adaptive Feature Alignment for Composed Person Retrieval*, Liu et al.,
# [arXiv:2311.16515](https://arxiv.org/abs/2311.16515)) synthesizes them, **SynCPR**, in three stages:
#
# 1. a language model writes **quadruples**: (reference text, target text, forward difference, reverse difference);
# 2. a LoRA-tuned FLUX.1-dev draws **one image with two panels** of one person in the two states, cut into
#    (reference, target): the model's own coherence across the canvas keeps the identity; the LoRA strength
#    $\beta$ is drawn per sample for style variety (**dynamic $\beta$**);
# 3. an MLLM **filters**: four scores from 1 to 10 (naturalness, identity consistency, text-image alignment,
#    relevance of the relative caption), kept when their mean reaches 8.5.
#
# SynCPR has 1.15 M triplets. For testing, the paper annotates **ITCPR** by hand: 2,202 queries over a
# gallery of 20,510 images. Notebook 04 trains FAFA on the first and tests it, zero-shot, on the second.
#
# Here each stage runs on the mini world: the mini LM writes the quadruples, the mini generator of
# notebook 02 draws the panels with its dual adapter, the mini MLLM (an attribute recognizer trained on
# other people) scores them. With `llm`, `weights` and `vlm` the same functions run a transformers LLM,
# FLUX.1-dev with notebook 02's dual LoRA, and Qwen2-VL; with `data_root` the real ITCPR is read.
#
# At `scale="paper"` all three are required (`weights`, `llm`, `vlm`; the paper: FLUX.1-dev, an LLM, Qwen2-VL),
# and nothing of the mini world runs. The dual LoRA is read from where notebook 02_generators saved it (any
# rank); when it is missing it is trained first on `data_root`'s CUHK-PEDES by the same library call
# (`generators.flux.flux_loras`: TIPS's recipe, 20,000 steps capped by `max_steps`), and a line says so.
# `n_quadruples` sets the synthesis's size (SynCPR: 140.5 K quadruples), `panels` the image pairs drawn per quadruple
# (the release's 10 at paper: 20 candidate triplets). An LLM whose answers do not parse
# gives no quadruple: the count is printed with what it wrote, and the notebook goes on with what it has.

# %% tags=["parameters"]
from typing import Optional  # the types papermill --help-notebook shows

scale: str = "small"            # "tiny", "small" or "paper"
gpus: int = 0                   # 0: one process (1: on a GPU, real models); N: the synthesis's shards split over N processes
seed: int = 0                   # the world, the assistants and the generator
data_root: Optional[str] = None  # None: the mini world's ITCPR; a folder holding ITCPR/ (and, if there, SynCPR/): real data
weights: Optional[str] = None    # None: the mini generator; "FLUX.1-dev" or a folder: FLUX.1-dev with notebook 02's dual LoRA
llm: Optional[str] = None        # None: the mini LM; a transformers LLM (name or folder) writes the quadruples
vlm: Optional[str] = None        # None: the mini MLLM; a transformers MLLM (the paper: Qwen2-VL) filters
beta_range: list = [0.5, 1.0]   # dynamic beta: the LoRA strength is drawn uniformly from this range per pair
keep_mean: float = 8.5          # the filter keeps a triplet when the mean of its four scores reaches this (the paper: 8.5)
n_quadruples: Optional[int] = None  # quadruples the LLM writes; None: by scale (8 tiny, 1,024 small; at paper SynCPR's 140,500)
panels: Optional[int] = None        # image pairs per quadruple, 2 candidate triplets each; None: by scale (2 tiny, 4 small; at paper the release's 10)
clip_weights: Optional[str] = None  # the CLIP of ITCPR's zero-shot composition: "ViT-B-16" or a checkpoint; None: the mini CLIP (skipped at paper)
epochs: Optional[int] = None        # None: the paper's schedule
max_steps: Optional[int] = None     # None: no cap; N: every training run stops after N optimizer steps, LoRA training included
batch_size: Optional[int] = None    # None: the paper's / the scale's batch

# %%
import time

import pandas as pd

from person_retrieval import params, reports, viz
from person_retrieval.assistants import prompts
from person_retrieval.datasets import read_itcpr, read_syncpr
from person_retrieval.papers import syncpr
from person_retrieval.world import dataset_root, world_dataset

P = params.check(dict(scale=scale, gpus=gpus, seed=seed, data_root=data_root, weights=weights, llm=llm, vlm=vlm,
                      beta_range=beta_range, keep_mean=keep_mean, n_quadruples=n_quadruples, panels=panels, clip_weights=clip_weights, epochs=epochs,
                      max_steps=max_steps, batch_size=batch_size),
                 needs=["itcpr"], weights=params.flux_weights, beta_range=params.number_range(0, 2), keep_mean=params.number(1, 10),
                 n_quadruples=params.integer(1, allow_none=True), panels=params.integer(1, allow_none=True),
                 clip_weights=lambda n, v: params.check_weights(v, n))
if scale == "paper" and None in (weights, llm, vlm):
    raise ValueError("scale='paper' needs weights='FLUX.1-dev', llm (a chat LLM writes the quadruples) and vlm (the paper: Qwen2-VL "
                     "filters); the mini generator, LM and MLLM have tiny and small scales")
# %% [markdown]
# The checked parameters, then the three models the pipeline runs on: the language model that writes quadruples, the generator, and the MLLM that filters.

# %%
beta_range = P["beta_range"]
source = reports.run_source(scale, seed, "mini world" if data_root is None else f"real data at {data_root}")
models = "+".join(n.split(":")[0] for n in ("mini-lm" if llm is None else "llm", "mini-generator" if weights is None else "FLUX.1-dev",
                                           "mini-vlm" if vlm is None else "vlm"))
paper = scale == "paper"  # no mini world and no mini model: the world's demos are skipped, each with a line saying so
lm, gen, mllm, names = syncpr.load_models(scale, seed, gpus, weights=P["weights"], llm=P["llm"], vlm=P["vlm"], data_root=P["data_root"])
print(source, "|", names)

# %% [markdown]
# ## 1 · Quadruples from the language model
#
# One prompt per quadruple (`prompts.SYNCPR_QUADRUPLE`; the slides describe it, the words are ours), each
# with a hint of whom to invent (gender, age, hair drawn per quadruple), so that the identities vary: a
# language model left alone repeats its favourite person. An answer without all four lines is dropped.

# %%
print(prompts.SYNCPR_QUADRUPLE.format(hint=syncpr.quadruple_hints([0], seed)[0]))
quads, answers = syncpr.make_quadruples(lm, range(6), seed, answers=True)
print(syncpr.parse_summary(quads, answers))
pd.DataFrame([vars(q) if q else {"reference": "(did not parse)"} for q in quads])

# %% [markdown]
# ## 2 · One canvas, two panels, dynamic $\beta$
#
# The generator draws a canvas two crops wide, prompted *"on the left: reference text; on the right:
# target text"*, and the canvas is cut in the middle. Below, three quadruples at three LoRA strengths
# ($\beta$ scales the adapter's update, $W' = W + \beta\,\gamma\,BA$, notebook 02): the same noise, so only
# $\beta$ changes between columns.

# %%
good = [q for q in quads if q is not None][:3]
if not good:
    print(f"{syncpr.parse_summary(quads)}: no panels to draw")
betas_shown = [beta_range[0], (beta_range[0] + beta_range[1]) / 2, beta_range[1]]
cells, titles = [], []
for b in betas_shown:
    refs, tgts = syncpr.dual_pairs(gen, [q.reference for q in good], [q.target for q in good], [b] * len(good), seed=seed)
    for j in range(len(good)):
        cells += [refs[j], tgts[j]]
        titles += [f"q{j} beta={b:.2f} ref", "target"]
order = [k for j in range(len(good)) for bi in range(3) for k in (bi * 2 * len(good) + 2 * j, bi * 2 * len(good) + 2 * j + 1)]
if good:
    fig = viz.image_grid([cells[k].permute(1, 2, 0).numpy() for k in order], titles=[titles[k] for k in order], cols=6, fontsize=6)
    reports.save_figure(fig, "03_dual_panels_by_beta", scale)

# %% [markdown]
# ## 3 · The MLLM filter
#
# Each triplet (reference image, target image, relative caption, with the target's text) gets four
# scores $s_1..s_4 \in \{1..10\}$: **naturalness** (both images look real: the lower of the two),
# **identity** (the same person, whatever they wear), **alignment** (the target shows what its text
# says), **relevance** (the caption says what changed). It is kept when
#
# $$\tfrac14 \textstyle\sum_{k=1}^{4} s_k \;\ge\; 8.5 .$$
#
# The mini MLLM's 1-10 scale is fitted once on validation renders of people in no dataset, per criterion
# and per camera resolution (which it reads from how sharp the image is): fitting items (a real photo with
# its true description, the same person, the true relative caption) score 10 in the median, as a real MLLM
# scores such a pair 9 or 10, the point that best tells them from failing ones (another person's text,
# another person, another pair's caption, a broken image) scores 8.5, and clear failures 1, so that the
# paper's bar of 8.5 means here what it means there. Below: purpose-made bad triplets beside good
# ones from the world's own renders, one kind of fault each, and what the filter says. The faults are drawn
# by the world's renderer: at `scale="paper"` this demo is skipped, and the released SynCPR (when `data_root`
# holds `SynCPR/`) stands where the world's rendered triplets stand below.

# %%
if paper:
    print("scale='paper': the filter's fault demo renders mini-world people; skipped")
    wroot = P["data_root"] / "SynCPR" if (P["data_root"] / "SynCPR" / "SynCPR.json").is_file() else None
    world_triplets = read_syncpr(wroot, check_images=False) if wroot else None
    ref_label, demo_table, fault_check = "SynCPR release", None, None
else:
    wroot = world_dataset("syncpr", scale, seed, progress=False)
    world_triplets, ref_label = read_syncpr(wroot), "world (rendered)"

# %%
if not paper:
    demo = syncpr.fault_examples(world_triplets, wroot, seed=seed)
    demo_scores = syncpr.filter_scores(mllm, demo["references"], demo["targets"], demo["target_texts"], demo["edits"])
    demo_table = pd.DataFrame(demo_scores, columns=syncpr.DIMENSIONS)
    demo_table.insert(0, "example", demo["labels"])
    demo_table["mean"] = demo_scores.mean(1)
    demo_table["kept"] = syncpr.kept(demo_scores, keep_mean)
demo_table

# %%
if not paper:
    fig = viz.image_grid([im for pair in zip(demo["references"], demo["targets"]) for im in pair],
                         titles=[f"{lab}: {'kept' if k else 'rejected'}" if side else "reference"
                                 for lab, k in zip(demo["labels"], demo_table["kept"]) for side in (0, 1)], cols=10, fontsize=5)
    reports.save_figure(fig, "03_filter_examples", scale)
    fault_check = syncpr.fault_check(demo_table)
fault_check

# %% [markdown]
# **Can the judge be trusted?** Before its scores decide which triplets stay, the MLLM is tested on pairs
# whose truth the world knows: held-out people (in no dataset, drawn from a seed stream of their own),
# rendered at each capture size of the world's cameras and handed to the judge at the generator's height, as
# the pipeline's images reach it. True pairs: the target's own text, the same person after an outfit edit,
# the true relative caption, clean renders; false pairs: another person's text, another person, another
# pair's relative caption, a render broken into shuffled blocks; and the filter's rule on true triplets vs
# the same triplets with another pair's relative caption. A trustworthy judge accepts at least 80% of true
# pairs and rejects at least 80% of false ones at every size. (Not at `scale="paper"`: the test pairs are
# the mini world's renders.)

# %%
if paper:
    print("scale='paper': the judge check renders mini-world people; skipped")
    judge = None
else:
    from person_retrieval.assistants import judge_check

    judge = judge_check.judge_table(mllm, scale, seed, n=200 if scale == "small" else 24, height=gen.image_size[0], pipelines=("syncpr",))
    judge["meets both bars"] = judge_check.meets_bars(judge)
    judge["source"] = source + f"; {models}"
    reports.save_table(judge, "03_judge", scale, "SynCPR's filter judge on pairs whose truth the world knows",
                       notes="Per capture size (w x h) and criterion: accepted true pairs (score >= 8.5; the filter's rule: mean of "
                             "the four >= 8.5) and rejected false pairs, over held-out people rendered at the generator's height "
                             "with the camera of each capture size.")
judge

# %% [markdown]
# ## 4 · The whole synthesis, in shards
#
# The run is split into shards of quadruples; each finished shard is written at once, images first, then
# its record, so a run that is killed resumes where it stopped, and `gpus=N` splits the shards over N
# processes (`synthesize(root, cfg, ..., shard=i, num_shards=N)`, one per torchrun rank on N GPUs). The
# first run at `small` takes about a quarter of an hour and is cached; then the folder is assembled into
# `SynCPR.json`, SynCPR's released format, which reads back through the same reader as the real one.
#
# **Candidates per quadruple.** Each quadruple is drawn as $P$ image pairs, and each pair gives two candidate
# triplets (reference $\to$ target with the forward caption, and back with the reverse one): $2P$ candidates before
# the filter. The release drew 2.81 M triplets from its 140,500 quadruples, $2P = 20$ ($P = 10$), and kept 1.15 M
# (8.2 per quadruple). At `scale="paper"` the synthesis draws the release's 10 pairs per quadruple; the mini pipeline
# draws what its budget allows, 4 pairs (8 candidates) at small and 2 at tiny, since every pair costs a drawing and
# two MLLM scorings and the small synthesis already takes a quarter of an hour on 2 CPU cores (`panels=N` sets it).

# %%
t0 = time.perf_counter()
if weights is None and llm is None and vlm is None:
    syn_root, manifest = syncpr.syncpr_dataset(scale, seed, gpus, n_quadruples=n_quadruples, panels=panels, beta_range=beta_range,
                                               keep_mean=keep_mean)
else:
    cfg = syncpr.paper_config(n_quadruples, beta_range, seed, names, scale, panels)
    syn_root = syncpr.synthesis_folder(scale, cfg)
    syncpr.synthesize(syn_root, cfg, lm, gen, mllm)
    manifest = syncpr.assemble(syn_root, keep_mean)
synthesized = read_syncpr(syn_root)
timing = syncpr.read_timing(syn_root)
print(f"{syncpr.synthesis_summary(manifest)}; "
      f"synthesis {timing.get('seconds', float('nan')):.0f} s when it ran ({timing.get('triplets_per_s', float('nan')):.1f} triplets/s); "
      f"this cell {time.perf_counter() - t0:.0f} s")
syncpr.candidates_table(manifest, f"this run ({models})")

# %% [markdown]
# Why the rejected ones were rejected (a triplet can fail on several dimensions), for the pipeline's
# triplets and, scored the same way, for the world's own rendered triplets: the same people drawn by the
# world's renderer, what a perfect generator would give.

# %%
all_scores = syncpr.read_scores(syn_root)
rej = [syncpr.rejection_table(all_scores, keep_mean).assign(triplets="pipeline (generated)")]
if world_triplets:  # at paper a few of the release's triplets when the pipeline kept none
    world_scores = syncpr.score_triplets(mllm, world_triplets, wroot, limit=len(all_scores) or (8 if paper else None), seed=seed)
    rej.append(syncpr.rejection_table(world_scores, keep_mean).assign(triplets=ref_label))
rejections = pd.concat(rej, ignore_index=True)
rejections["source"] = source + f"; {models}"
reports.save_table(rejections, "03_filter_rejections", scale, "SynCPR's filter: rejection rates per reason",
                   notes=f"keep when the mean of the four scores >= {keep_mean}; a rejected triplet counts under every dimension below the bar "
                         "(first percentage) and under its lowest one (second). The world's rendered triplets are scored by the same MLLM.")
rejections

# %%
fig = viz.bar_chart({f"{r.triplets.split()[0]}: {r.reason}": r["mean score"] for _, r in rejections.iterrows() if r.reason != "any (rejected)"},
                    title="mean filter score per dimension", ylabel="score (1-10)", sort=False)
reports.save_figure(fig, "03_filter_scores", scale)

# %% [markdown]
# ## 5 · SynCPR's statistics
#
# As the slides count them: triplets, the quadruples they come from, group ids (`cpr_id`: one per
# quadruple and direction; the targets of a group show one person in one outfit, FAFA's positives), the
# relative captions' mean length and vocabulary, and the share of men.

# %%
sets = {f"pipeline, kept ({models})": syncpr.statistics(synthesized, syncpr.quadruple_count(synthesized))}
if not paper:
    sets["world's rendered triplets"] = syncpr.statistics(world_triplets, syncpr.quadruple_count(world_triplets))
if data_root is not None and (P["data_root"] / "SynCPR" / "SynCPR.json").is_file():
    sets["SynCPR (the release, read here)"] = syncpr.statistics(read_syncpr(P["data_root"] / "SynCPR", check_images=False))
stats = syncpr.statistics_table(sets)
stats["source"] = ["SynCPR slides"] + [source] * (len(stats) - 1)
reports.save_table(stats, "03_syncpr_statistics", scale, "SynCPR statistics beside the paper's",
                   notes="Caption length and vocabulary are of the relative captions; the share of men is read from the reference captions.")
stats

# %%
show = synthesized[:4] if synthesized else []
if show:
    fig = viz.image_grid([viz.load_image(syn_root / t[k]) for t in show for k in ("reference_image_path", "target_image_path")],
                         titles=[s for t in show for s in ("reference", t["edit_caption"][:40])], cols=8, fontsize=5)
    reports.save_figure(fig, "03_syncpr_kept", scale)
else:
    print("the filter kept no triplet")

# %% [markdown]
# ## 6 · ITCPR, the test set
#
# ITCPR's annotators wrote one relative caption per (reference, target) pair, 9.54 words on average (3 to 32);
# the gallery is mostly distractors, and a match is a gallery image whose `instance_id` equals the query's:
# **the same person in another image, in the old outfit, is a miss**. The world builds it the same way
# (ids from 1; about one query in 96 has two ground truths, as 2,225 truths for 2,202 queries), in the
# released files `query.json` and `gallery.json`.
#
# The slides count ITCPR per source as "images / IDs": 1,151 / 512 from Celeb-reID, 146 / 146 from PRCC, 905 / 541
# from LAST. The images are the queries' reference images (1,151 + 146 + 905 = the 2,202 unique queries), the IDs the
# people among them. Below, the same counts per source (the `datasets` field of each entry) and over all, beside
# the slides'. The world draws every ITCPR person from one source, so its rows are `world` and `all`; the real
# ITCPR (`data_root`) gives its three. Caption words are counted as the datasets' tokenizer splits them.

# %%
bench = read_itcpr(dataset_root("itcpr", P["data_root"], scale, seed))
it_ours = syncpr.itcpr_statistics(bench).assign(set="ITCPR (this run)", source=source)
it_paper = reports.reported("itcpr_statistics").rename(columns={"note": "source"}).assign(set="ITCPR (reported)")
it_stats = pd.concat([it_paper, it_ours], ignore_index=True)[["set", *it_ours.columns.drop(["set", "source"]), "source"]]
reports.save_table(it_stats, "03_itcpr_statistics", scale, "ITCPR per source beside the slides",
                   notes="queries: reference images with their caption (the slides' 'images'); identities: distinct people "
                         "among the queries (the slides' 'IDs'); caption words: shortest, mean and longest relative caption.")
it_stats

# %% [markdown]
# One query, ranked by a composition that had no CPR training (the mini CLIP's normalised image feature
# of the reference plus its text feature of the caption; notebook 04 compares it with FAFA): the ground
# truth is framed green, distractors red.

#
# The CLIP is `clip_weights` (e.g. ViT-B/16) when given, else the mini CLIP of notebook 00; at `scale="paper"`
# without `clip_weights` this ranking is skipped (no mini model at paper).

# %%
from person_retrieval.models import build_backbone, pretrained_mini_clip
from person_retrieval.train import load_weights

if clip_weights is None and paper:
    print("scale='paper' without clip_weights: no CLIP to compose with; the zero-shot ranking is skipped")
else:
    backbone = build_backbone(clip_weights, scale)
    if clip_weights is None:
        load_weights(backbone, pretrained_mini_clip(scale, seed, gpus))
    sim = syncpr.zero_shot_composition(backbone, bench)
    zs = syncpr.evaluate_itcpr(sim, bench)
    print("zero-shot composition on ITCPR:", {k: round(v, 2) for k, v in zs.items()})
    rows = syncpr.ranking_rows(sim, bench, [0, 1, 2])
    fig = viz.ranking_rows(rows, k=5, first="reference")
    reports.save_figure(fig, "03_itcpr_query", scale)
