import math

import numpy as np
import pytest
import torch

from person_retrieval.metrics import (
    dialogue_metrics, first_match_ranks, rank_metrics, retrieval_metrics, retrieval_metrics_from_features, search,
)

# Two queries, four gallery items, worked by hand in the comments.
SIM = torch.tensor([[0.9, 0.8, 0.1, 0.5],   # ranks g0(pid0) g1(pid1) g3(pid2) g2(pid0): matches 1 0 0 1
                    [0.2, 0.3, 0.6, 0.7]])  # ranks g3(pid2) g2(pid0) g1(pid1) g0(pid0): matches 0 0 1 0
QP = torch.tensor([0, 1])
GP = torch.tensor([0, 1, 0, 2])


def test_known_answer():
    m = retrieval_metrics(SIM, QP, GP, ks=(1, 2, 3, 5))
    assert m["R1"] == pytest.approx(50.0)
    assert m["R2"] == pytest.approx(50.0)
    assert m["R3"] == pytest.approx(100.0)
    assert m["R5"] == pytest.approx(100.0)
    # AP: q0 = (1/1 + 2/4) / 2 = 0.75; q1 = (1/3) / 1
    assert m["mAP"] == pytest.approx(100 * (0.75 + 1 / 3) / 2)
    # INP: q0 = 2 matches / last match at rank 4; q1 = 1 / 3
    assert m["mINP"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)


def test_perfect_and_worst_rankings():
    g = torch.arange(5)
    perfect = retrieval_metrics(torch.eye(5), g, g)
    assert perfect == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}
    worst = retrieval_metrics(-torch.eye(5), g, g, ks=(1,))
    assert worst["R1"] == 0.0 and worst["mAP"] == pytest.approx(20.0)


def test_chunking_and_numpy_inputs_agree():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(37, 50)).astype(np.float32)
    qp, gp = rng.integers(0, 6, 37), np.arange(50) % 6
    a = retrieval_metrics(sim, qp, gp, chunk=4)
    b = retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(qp), torch.from_numpy(gp), chunk=1000)
    assert a == pytest.approx(b)


def test_ranking_path_matches_similarity_path():
    order = torch.sort(SIM, dim=1, descending=True, stable=True).indices
    assert rank_metrics(order, QP, GP) == pytest.approx(retrieval_metrics(SIM, QP, GP))


def test_ties_broken_by_gallery_order():
    sim = torch.zeros(1, 3)  # all tied: gallery order decides
    m = retrieval_metrics(sim, torch.tensor([7]), torch.tensor([1, 7, 7]), ks=(1, 2))
    assert m["R1"] == 0.0 and m["R2"] == 100.0
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_query_without_match_is_an_error():
    with pytest.raises(ValueError, match="query 1 has no matching item"):
        retrieval_metrics(SIM, torch.tensor([0, 9]), GP)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="similarity has shape"):
        retrieval_metrics(SIM, torch.tensor([0, 1, 2]), GP)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_feature_path_agrees_with_similarity(backend):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(40, 16)), rng.normal(size=(60, 16))
    qp, gp = rng.integers(0, 10, 40), np.arange(60) % 10
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    ref = retrieval_metrics(qn @ gn.T, qp, gp)
    got = retrieval_metrics_from_features(q, g, qp, gp, backend=backend, chunk=7)
    assert got == pytest.approx(ref, abs=1e-4)


def test_faiss_and_torch_search_agree():
    rng = np.random.default_rng(2)
    q, g = rng.normal(size=(30, 32)).astype(np.float32), rng.normal(size=(500, 32)).astype(np.float32)
    sf, i_f = search(q, g, 10, backend="faiss")
    st, i_t = search(q, g, 10, backend="torch")
    assert np.array_equal(i_f, i_t)
    assert np.allclose(sf, st, atol=1e-4)
    with pytest.raises(ValueError, match="backend"):
        search(q, g, 3, backend="annoy")


def test_first_match_ranks():
    assert first_match_ranks(SIM, QP, GP).tolist() == [1, 3]


def test_dialogue_metrics_known_answer():
    # Target ranks: query 0 goes 3 -> 1, query 1 goes 2 -> 4 over two rounds.
    gp = torch.tensor([0, 1, 2, 3])
    qp = torch.tensor([0, 1])
    r0 = torch.tensor([[0.5, 0.9, 0.8, 0.1], [0.9, 0.8, 0.1, 0.0]])
    r1 = torch.tensor([[0.9, 0.5, 0.4, 0.1], [0.9, 0.1, 0.8, 0.7]])
    m = dialogue_metrics([r0, r1], qp, gp, ks=(1, 2))
    assert m["ranks"].tolist() == [[3, 2], [1, 4]]
    assert m["recall@1"] == [0.0, 50.0]
    assert m["recall@2"] == [50.0, 50.0]
    assert m["hits@1"] == [0.0, 50.0]
    assert m["hits@2"] == [50.0, 100.0]  # query 1 keeps its round-0 success
    assert m["BRI"][0] == pytest.approx((math.log(3) + math.log(2)) / 2)
    assert m["BRI"][1] == pytest.approx((math.log(3) / 2 + math.log(2)) / 2)


def test_counting_ranks_equal_a_stable_sort_even_with_many_ties():
    rng = np.random.default_rng(3)
    sim = torch.from_numpy(rng.integers(0, 4, size=(50, 40)).astype(np.float32))  # heavy ties
    qp, gp = torch.from_numpy(rng.integers(0, 8, 50)), torch.arange(40) % 8
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    assert retrieval_metrics(sim, qp, gp, chunk=7) == pytest.approx(rank_metrics(order, qp, gp), abs=1e-9)


def test_head_accuracy_counts_visible_images_only():
    from person_retrieval.metrics import head_accuracy

    acc = head_accuracy({"a": torch.tensor([0, 1, 1, 2]), "b": torch.tensor([0, 0])},
                        {"a": torch.tensor([0, 1, -1, 0]), "b": torch.tensor([-1, -1])})
    assert list(acc) == ["a"] and math.isclose(acc["a"], 100 * 2 / 3, rel_tol=1e-6)
