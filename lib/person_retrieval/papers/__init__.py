"""One home per paper: each module holds everything its notebook trains and calls (heads, tasks for
:func:`person_retrieval.train.fit`, pipeline stages, the experiment's drivers).

* :mod:`.tpr`: the IRRA- and RDE-style baselines (notebook 01);
* :mod:`.tips`: TIPS's pair synthesis (prompts, SPG / IDPG images, the MLLM filter, captions), its
  pretraining and few-shot protocol, and its test-time augmentation (notebook 02_tips);
* :mod:`.syncpr`: SynCPR's triplet synthesis and ITCPR's evaluation (notebook 03);
* :mod:`.fafa`: FAFA's Q-Former, its losses' combination and its experiment (notebook 04);
* :mod:`.ceca`: CECA's attribute mining (summaries per image), its mixer, its model and task (notebook 05);
* :mod:`.diana`: ChatPedes' construction and cleaning, DiaNA's model, task and evaluation (notebook 06);
* :mod:`.ctgi`: CTGI's MTG, PES and MTI (notebook 07).

Shared infrastructure (world, datasets, models, train, losses, metrics, assistants, generators, shards, reports)
never imports from here; a paper module may build on another (CTGI fine-tunes with ``tpr``; FAFA reads
``syncpr``'s data; CECA extends ``tpr``'s RDE task; TIPS loads FLUX.1-dev through ``syncpr``'s loader).
"""
