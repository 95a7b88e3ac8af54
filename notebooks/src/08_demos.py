# %% [markdown]
# # 08 · Interactive demos: type, click, retrieve
#
# Four small demos over the models the other notebooks trained, for a classroom: the teacher types a
# description, picks a reference image, answers a question or moves a slider, and the class sees who the
# model finds. Each demo is a class in `person_retrieval.widgets` whose callbacks a test drives without a
# browser; here each is shown once with a first interaction already run, so that the executed copy shows
# results even where no browser is attached (papermill).
#
# | demo | paper | model (cached by the notebook named) |
# |---|---|---|
# | text retrieval | IRRA / RDE baselines, *CECA* (conversational attribute mining) | zero-shot mini CLIP (00), IRRA and RDE per style (01), CECA per style (05) |
# | composed retrieval | *Composed Person Retrieval* (SynCPR / ITCPR / FAFA) | FAFA trained on SynCPR (04) |
# | chat retrieval | *Chat-based Person Retrieval* (DiaNA) + CTGI's multi-turn interaction | DiaNA (06), mini MLLM and LM (00, 07) |
# | generation | *TIPS* (seed person generator) and SynCPR's LoRA strength | the mini generator (02) |
#
# Everything runs on the mini world at the scale chosen; a model missing from the cache is trained now
# (at `small`, from cold caches, that is the other notebooks' training time).
#
# **At `scale="paper"`** the text demo ranks your test splits (`data_root`) with your CLIP (`weights`): zero-shot,
# and IRRA / RDE fine-tuned from it (notebook 01's runs, reused from the cache when 01 ran with the same
# parameters; else trained now, `max_steps` caps them). The other demos' models exist only in the mini world
# or in another notebook's paper run (CECA's MLLM summaries: 05; FAFA on BLIP-2: 04; DiaNA: 06; the mini
# generator: 02), so at paper they are skipped, each with a printed line.

# %% tags=["parameters"]
from typing import Optional  # the types papermill --help-notebook shows

scale: str = "small"           # "tiny", "small" (the mini world) or "paper" (the text demo on data_root with your CLIP)
gpus: int = 0                  # 0: CPU; 1: one GPU; N: processes for any model still to train
seed: int = 0                  # the world and the models' seed (the other notebooks' default)
data_root: Optional[str] = None  # None: the mini world; a folder holding CUHK-PEDES/, ICFG-PEDES/, RSTPReid/ (the datasets listed): real data
weights: Optional[str] = None    # None: the mini CLIP of notebook 00; "ViT-B-16" or a checkpoint path: real CLIP (needed at paper)
datasets: list = ["cuhk_pedes", "icfg_pedes", "rstpreid"]  # the text demo's styles: any of "cuhk_pedes", "icfg_pedes", "rstpreid"
methods: list = ["zero-shot", "irra", "rde", "ceca"]  # the text demo's models: any of "zero-shot", "irra", "rde", "ceca" (ceca: mini world only)
top_k: int = 10                # images shown per ranking (the chat demo shows half)
epochs: Optional[int] = None     # None: the paper's / the scale's schedule for a model still to train; N: N epochs
max_steps: Optional[int] = None  # None: no cap; N: every training run stops after N optimizer steps
batch_size: Optional[int] = None  # None: the paper's / the scale's batch; N: every training run takes batches of N

# %%
import pandas as pd

from person_retrieval import analysis, assistants, models, params, reports
from person_retrieval.datasets import read_chatpedes, read_itcpr
from person_retrieval.generators.mini import mini_config, mini_generators, target_set
from person_retrieval.papers import ceca, ctgi, diana, fafa, syncpr, tpr
from person_retrieval.train import load_weights
from person_retrieval.widgets import GenerationDemo, TextRetrievalDemo
from person_retrieval.world import dataset_root, world_dataset

P = params.check(dict(scale=scale, gpus=gpus, seed=seed, data_root=data_root, weights=weights, datasets=datasets, methods=methods, top_k=top_k,
                      epochs=epochs, max_steps=max_steps, batch_size=batch_size),
                 needs="datasets", datasets=params.choices(["cuhk_pedes", "icfg_pedes", "rstpreid"]),
                 methods=params.choices(["zero-shot", "irra", "rde", "ceca"]), top_k=params.integer(1, 50))
paper = data_root is not None  # the user's data: the text demo only, on real CLIP weights
if scale == "paper" and weights is None:
    raise ValueError("parameter 'weights': scale='paper' ranks with real CLIP weights (e.g. 'ViT-B-16' under PR_WEIGHTS_DIR)")
datasets, methods = P["datasets"], P["methods"]
source = reports.run_source(scale, seed, "mini world" if data_root is None else f"real data at {data_root}")
init = None if weights else str(models.pretrained_mini_clip(scale if scale != "paper" else "small", seed, gpus))
print(source)

# %% [markdown]
# ## 1 · Text retrieval
#
# A test caption is in the box; **Search** ranks the gallery. The person to find is outlined in green, and
# the table underneath reads the query by the world's grammar (slot = value) and ticks what the top-1
# person and the true person really wear. Things to try:
#
# * switch from the zero-shot backbone to IRRA or RDE: fine-tuning on the style moves the true person up;
# * switch to CECA: its gallery reads each image together with the MLLM's summary of it (notebook 05's five
#   questions), so a detail the summary names counts even where the image alone is hard to read;
# * delete the colours from the query, then add a rare one back (a shoe colour few people have): the rare
#   attribute narrows the gallery far more than a common one;
# * change the dataset: each style's captions read differently, and each fine-tuned model knows its own.

# %%
backbone = models.build_backbone(weights, scale if scale != "paper" else "small")
if init:
    load_weights(backbone, init)
roots = {d: dataset_root(d, P["data_root"], scale, seed) for d in datasets}
test_sets = {d: models.split_data(d, roots[d], "test", backbone) for d in datasets}
people = None if paper else {d: analysis.world_people(test_sets[d], roots[d]) for d in datasets}  # the world's records
vlm, lm = (None, None) if paper else assistants.load(scale, seed)  # the mini MLLM and LM (00): CECA's summaries, the chat demo
text_models, gallery_data = {}, {}
for m in methods:
    if m == "zero-shot":
        text_models["zero-shot"] = models.DualEncoder(backbone).eval()
    elif m == "ceca" and paper:
        print("CECA skipped on real data: its gallery reads MLLM summaries (notebook 05 builds them with your vlm)")
    elif m == "ceca":  # notebook 05's run (its schedule), over the summaries it built
        folders = {d: ceca.build_summaries(d, roots[d], scale, seed, vlm=vlm, lm=lm, progress=False) for d in datasets}
        schedule = {} if ceca.EPOCHS.get(scale) is None else {"epochs": ceca.EPOCHS[scale]}
        text_models["CECA"] = {d: ceca.fit_ceca(d, roots[d], folders[d], scale=scale, seed=seed, gpus=gpus, init=init, progress=False,
                                                **schedule).model for d in datasets}
        gallery_data["CECA"] = {d: ceca.with_summaries(test_sets[d], roots[d], folders[d], "test", backbone.tokenize) for d in datasets}
    else:
        text_models[m.upper()] = {d: tpr.fit_baseline(m, d, roots[d], scale=scale, seed=seed, gpus=gpus, init=init, weights=weights,
                                                       progress=False).model for d in datasets}
# %% [markdown]
# The demo itself: type or pick a caption, and see the gallery ranked by each model.

# %%
text_demo = TextRetrievalDemo(test_sets, text_models, people, k=top_k, gallery_data=gallery_data)
first = text_demo.pick_caption(0)
print(f"caption 0: {first.text!r} -> Rank-1 {'right' if first.r1 else 'wrong'}")
text_demo.snapshot()  # what the first interaction shows, kept in the executed copy

# %%
text_demo  # the live demo

# %% [markdown]
# The demo's models on each whole test split, beside the papers' numbers (notebook 01 has the full tables):

# %%
rows = [{"method": name, "dataset": d, **models.evaluate_retrieval(per[d] if isinstance(per, dict) else per,
                                                                    gallery_data.get(name, {}).get(d, test_sets[d]))}
        for name, per in text_models.items() for d in datasets]
ref = reports.reported("tpr_baselines").drop(columns=["note"]).assign(source="paper (real data; CTGI Tables 1-3, TIPS Table 1, DiaNA Table 3)")
ref = ref[ref.dataset.isin(datasets)].assign(method=lambda x: x.method.replace({"CLIP zero-shot": "zero-shot"}))
demo_table = pd.concat([pd.DataFrame(rows).assign(source=source), ref[ref.method.isin(text_models)]], ignore_index=True)
reports.save_table(demo_table, "08_text_demo_models", scale, title="The text demo's models on the test splits, beside the papers")
demo_table.round(2)

# %% [markdown]
# ## 2 · Composed retrieval
#
# A reference image and a sentence saying what is different find the target person (*Composed Person
# Retrieval*, SynCPR / ITCPR / FAFA). FAFA composes the two in its Q-Former and scores a gallery image by the
# mean of the $k$ largest cosines between the composed query and the image's query tokens (its
# fine-grained dynamic alignment),
#
# $$s(q, g) = \frac{1}{k}\sum_{\text{top-}k\ j} \cos(f_q, t_j(g)).$$
#
# Beside it: the reference image alone (the text ignored) and the text alone (notebook 01's IRRA; the image
# ignored). Step through the ITCPR queries with the arrows, or edit the sentence: a change the text names
# should move FAFA's ranking, and never the image-only one.

# %%
composed_demo = None
if paper:
    print("composed demo skipped on real data: FAFA runs on BLIP-2 there (notebook 04 at paper, its parameter 'weights')")
else:
    bench = read_itcpr(dataset_root("itcpr", None, scale, seed))
    syn_root, _ = syncpr.syncpr_dataset(scale, seed, gpus=0)
    train_root = next(r for r in (syn_root, world_dataset("syncpr", scale, seed)) if fafa.can_train(r, scale))  # notebook 04's rule
    fafa_model = fafa.fit_fafa(train_root, scale, seed, gpus, init, parts=fafa.LOSS_SETS["FDA + FD + MFR"], progress=False).model
    irra_cuhk = tpr.fit_baseline("irra", "cuhk_pedes", dataset_root("cuhk_pedes", None, scale, seed), scale=scale, seed=seed, gpus=gpus,
                                 init=init, progress=False).model
    composed_demo = fafa.composed_demo(fafa_model, bench, scale, init, irra_cuhk, k=top_k)
    print("query 0's target rank:", composed_demo.last.target_rank)
    display(composed_demo.snapshot())  # what the first interaction shows, kept in the executed copy

# %%
composed_demo  # the live demo

# %% [markdown]
# ## 3 · Chat retrieval
#
# A ChatPedes test dialogue's first round starts it: the user has described the person once. The
# questioner (generator A's policy: it asks about what the dialogue has not covered) asks; type an answer,
# or let the MLLM answer from the target image. Every round, DiaNA reads the whole dialogue and re-ranks;
# CTGI's multi-turn interaction then asks the MLLM to confirm a top candidate and to answer about it, and
# re-ranks once more with the refined query (eq. 7: $s = \lambda s_q + (1 - \lambda) s_{\hat q}$). The plot
# follows the target's rank, with and without that refinement.
#
# Try answering truthfully for a few rounds (the rank should fall), then answer something false.

# %%
chat_demo = None
if paper:
    print("chat demo skipped on real data: DiaNA on the released ChatPedes is notebook 06's, and the demo's answers come from the mini MLLM")
else:
    chat_folder = diana.build_chatpedes(scale, seed, vlm=vlm, progress=False)
    chat_clean = chat_folder / "clean"
    stage1 = diana.pretrained_diana(scale, seed, gpus, init=init, progress=False)
    diana_model = diana.fit_diana(chat_clean, scale, seed, gpus, init=init, stage1=stage1, progress=False).model
    task = diana.DiaNATask(chat_root=str(chat_clean), scale=scale, init=init)
    chat_demo = diana.chat_demo(diana_model, read_chatpedes(chat_clean, "test"), chat_clean / "imgs", task._tokenize, task.backbone.image_size,
                                vlm=vlm, k=max(1, top_k // 2), refine=ctgi.mti_refiner(vlm, lm))
    chat_demo.answer(None)
    res = chat_demo.answer(None)
    print("the target's rank by round:", res.ranks, "| with MTI:", res.refined_ranks)
    display(chat_demo.snapshot())  # what the first interaction shows, kept in the executed copy

# %%
chat_demo  # the live demo

# %% [markdown]
# ## 4 · Generation
#
# TIPS's seed person generator is told the capture size of the image it should imitate; a small size
# should give a blurrier person at the same resolution. SynCPR draws the LoRA strength $\beta$ per
# sample, $W' = W + \beta\,\gamma\,BA$: at $\beta = 0$ the base model (the studio look), at 1 the
# target domain. Same prompt, size, $\beta$ and seed: the same images.

# %%
gen_demo = None
if paper:
    print("generation demo skipped on real data: it draws with the mini generator (notebook 02 trains FLUX.1-dev's LoRAs at paper)")
else:
    gen, _ = mini_generators(scale, seed, rank=4 if scale == "tiny" else 32, progress=False)
    target = target_set("cuhk_pedes", roots.get("cuhk_pedes") or dataset_root("cuhk_pedes", None, scale, seed), mini_config(scale), seed)
    sizes = {"no size condition": None, **{f"{w}x{h}": (w, h) for w, h in sorted(set(target.sizes), reverse=True)}}
    gen_demo = GenerationDemo(lambda prompts, size, beta, s: gen.spg(prompts, size, seed=s, beta=beta), sizes,
                              prompt=test_sets[datasets[0]].captions[0], n=8, seed=seed, scale=scale)
    images = gen_demo.run()
    print(f"{len(images)} samples of {tuple(images.shape[-2:])} pixels")
    display(gen_demo.snapshot())  # what the first interaction shows, kept in the executed copy

# %%
gen_demo  # the live demo

# %% [markdown]
# ## What to notice
#
# * The mini world's models are small: rankings are often wrong at Rank-1, and the demos show why, by what
#   the query says against what the people wear.
# * Composed retrieval needs both inputs: the image alone finds people who look like the reference, the
#   text alone people who match the change; FAFA should put the target above both where it has learned to.
# * Each round of a truthful dialogue usually moves the target up (notebook 06 measures it over the test
#   set); a false answer moves it down.
# * Per-interaction latency at `small` is measured by `benchmarks/bench_demos.py` (median of 20).
