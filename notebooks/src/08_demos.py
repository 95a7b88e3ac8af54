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

# %% tags=["parameters"]
scale: str = "small"           # "tiny" or "small" (the demos run on the mini world)
gpus: int = 0                  # 0: CPU; 1: one GPU; N: processes for any model still to train
seed: int = 0                  # the world and the models' seed (the other notebooks' default)
datasets: list = ["cuhk_pedes", "icfg_pedes", "rstpreid"]  # the text demo's styles
methods: list = ["zero-shot", "irra", "rde", "ceca"]  # the text demo's models
top_k: int = 10                # images shown per ranking (the chat demo shows half)

# %%
from person_retrieval import analysis, assistants, models, params, reports
from person_retrieval.datasets import read_chatpedes, read_itcpr
from person_retrieval.generators.mini import mini_config, mini_generators, target_set
from person_retrieval.papers import ceca, ctgi, diana, fafa, syncpr, tpr
from person_retrieval.train import load_weights
from person_retrieval.widgets import GenerationDemo, TextRetrievalDemo
from person_retrieval.world import dataset_root, world_dataset

P = params.check(dict(scale=scale, gpus=gpus, seed=seed, datasets=datasets, methods=methods, top_k=top_k),
                 datasets=params.choices(["cuhk_pedes", "icfg_pedes", "rstpreid"]), methods=params.choices(["zero-shot", "irra", "rde", "ceca"]),
                 top_k=params.integer(1, 50))
if scale == "paper":
    raise ValueError("parameter 'scale': the demos run on the mini world: use 'tiny' or 'small'")
datasets, methods = P["datasets"], P["methods"]
source = reports.run_source(scale, seed, "mini world")
init = str(models.pretrained_mini_clip(scale, seed, gpus))
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
backbone = models.build_backbone(None, scale)
load_weights(backbone, init)
roots = {d: dataset_root(d, None, scale, seed) for d in datasets}
test_sets = {d: models.split_data(d, roots[d], "test", backbone) for d in datasets}
people = {d: analysis.world_people(test_sets[d], roots[d]) for d in datasets}
vlm, lm = assistants.load(scale, seed)  # the mini MLLM and LM (00): CECA's summaries here, the chat demo below
text_models, gallery_data = {}, {}
for m in methods:
    if m == "zero-shot":
        text_models["zero-shot"] = models.DualEncoder(backbone).eval()
    elif m == "ceca":  # notebook 05's run (its schedule), over the summaries it built
        folders = {d: ceca.build_summaries(d, roots[d], scale, seed, vlm=vlm, lm=lm, progress=False) for d in datasets}
        schedule = {} if ceca.EPOCHS.get(scale) is None else {"epochs": ceca.EPOCHS[scale]}
        text_models["CECA"] = {d: ceca.fit_ceca(d, roots[d], folders[d], scale=scale, seed=seed, gpus=gpus, init=init, progress=False,
                                                **schedule).model for d in datasets}
        gallery_data["CECA"] = {d: ceca.with_summaries(test_sets[d], roots[d], folders[d], "test", backbone.tokenize) for d in datasets}
    else:
        text_models[m.upper()] = {d: tpr.fit_baseline(m, d, roots[d], scale=scale, seed=seed, gpus=gpus, init=init, progress=False).model
                                  for d in datasets}
text_demo = TextRetrievalDemo(test_sets, text_models, people, k=top_k, gallery_data=gallery_data)
first = text_demo.pick_caption(0)
print(f"caption 0: {first.text!r} -> Rank-1 {'right' if first.r1 else 'wrong'}")
text_demo.snapshot()  # what the first interaction shows, kept in the executed copy

# %%
text_demo  # the live demo

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
bench = read_itcpr(dataset_root("itcpr", None, scale, seed))
syn_root, _ = syncpr.syncpr_dataset(scale, seed, gpus=0)
train_root = next(r for r in (syn_root, world_dataset("syncpr", scale, seed)) if fafa.can_train(r, scale))  # notebook 04's rule
fafa_model = fafa.fit_fafa(train_root, scale, seed, gpus, init, parts=fafa.LOSS_SETS["FDA + FD + MFR"], progress=False).model
irra_cuhk = tpr.fit_baseline("irra", "cuhk_pedes", dataset_root("cuhk_pedes", None, scale, seed), scale=scale, seed=seed, gpus=gpus,
                             init=init, progress=False).model
composed_demo = fafa.composed_demo(fafa_model, bench, scale, init, irra_cuhk, k=top_k)
print("query 0's target rank:", composed_demo.last.target_rank)
composed_demo.snapshot()  # what the first interaction shows, kept in the executed copy

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
chat_demo.snapshot()  # what the first interaction shows, kept in the executed copy

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
gen, _ = mini_generators(scale, seed, rank=4 if scale == "tiny" else 32, progress=False)
target = target_set("cuhk_pedes", roots.get("cuhk_pedes") or dataset_root("cuhk_pedes", None, scale, seed), mini_config(scale), seed)
sizes = {"no size condition": None, **{f"{w}x{h}": (w, h) for w, h in sorted(set(target.sizes), reverse=True)}}
gen_demo = GenerationDemo(lambda prompts, size, beta, s: gen.spg(prompts, size, seed=s, beta=beta), sizes,
                          prompt=test_sets[datasets[0]].captions[0], n=8, seed=seed)
images = gen_demo.run()
print(f"{len(images)} samples of {tuple(images.shape[-2:])} pixels")
gen_demo.snapshot()  # what the first interaction shows, kept in the executed copy

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
