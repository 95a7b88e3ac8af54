import numpy as np
import pytest
import torch

from person_retrieval import assistants as A
from person_retrieval.assistants import grammar
from person_retrieval.pipelines.ctgi import mti_rerank, mtg_captions
from person_retrieval.world import PROFILES, render, sample_person, sample_state


@pytest.fixture(scope="module")
def setup():
    vlm = A.mini_vlm("tiny", seed=0, progress=False)
    rng = np.random.default_rng(11)
    ims = [render(sample_person(rng, i), sample_state(rng, PROFILES["cuhk_pedes"]), 64) for i in range(10)]
    return vlm, ims


def test_mtg_enriches_without_asking_twice(setup):
    vlm, ims = setup
    lm = A.MiniLM(seed=0)
    res = mtg_captions(ims, A.MiniVLM(vlm.recognizer, seed=0), lm, rounds=6, seed=0, batch=4)
    assert len(res) == len(ims)
    for r in res:
        assert len(r.qa) <= 6 and r.caption.endswith(".")
        covered = grammar.claimed_groups(grammar.parse_claims(r.initial))
        for q, a in r.qa:  # each kept question asked about something not yet said, and its answer said something
            g = set(grammar.question_groups(q))
            assert g and not g <= covered and grammar.claimed_groups(grammar.parse_claims(a))
            covered |= g | grammar.claimed_groups(grammar.parse_claims(a))
    n_init = np.mean([len(grammar.parse_claims(r.initial)) for r in res])
    n_final = np.mean([len(grammar.parse_claims(r.caption)) for r in res])
    assert n_final > n_init
    again = mtg_captions(ims, A.MiniVLM(vlm.recognizer, seed=0), A.MiniLM(seed=0), rounds=6, seed=0, batch=4)
    assert [[q for q, _ in r.qa] for r in again] == [[q for q, _ in r.qa] for r in res]  # same seed, same questions
    none = mtg_captions(ims[:2], vlm, lm, rounds=0)
    assert all(r.qa == [] for r in none)


def _scorer(vlm, ims):
    probs = [p for _, _, p in vlm.perceive(ims)]
    return lambda text: torch.tensor([vlm.claim_probability(p, grammar.parse_claims(text)) for p in probs])


def test_mti_no_anchor_changes_nothing(setup):
    vlm, ims = setup
    never = A.MiniVLM(vlm.recognizer, judge_threshold=1.1)  # never says yes
    scores = torch.linspace(0.5, 0.1, len(ims))
    r = mti_rerank("a man in a black coat", scores, ims, never, A.MiniLM(), _scorer(vlm, ims), top_k=5)
    assert r.anchor is None and torch.equal(r.scores, scores) and r.vlm_calls == 5 and r.llm_calls == 0


def test_mti_anchor_refines_and_ranks_first(setup):
    vlm, ims = setup
    always = A.MiniVLM(vlm.recognizer, judge_threshold=0.0)
    scores = torch.linspace(0.5, 0.1, len(ims))
    lm = A.MiniLM()
    r = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), top_k=5, lam=0.5)
    assert r.anchor == 0 and r.scores[0] == 1.0 and not r.early_exit and r.llm_calls == 1
    assert r.vlm_calls == 1 + 8  # the confirmation, then one diagnostic question per missing group
    assert len(grammar.parse_claims(r.refined)) > len(grammar.parse_claims("a man"))
    keep = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), lam=1.0)
    assert torch.allclose(keep.scores[1:], scores[1:])
    early = mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), xi=0.4)
    assert early.early_exit and torch.equal(early.scores, scores) and early.vlm_calls == 1
    with pytest.raises(ValueError, match="lam"):
        mti_rerank("a man", scores, ims, always, lm, _scorer(vlm, ims), lam=1.5)
