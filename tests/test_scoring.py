import math

import pytest
import torch

from specdiff_fx.passes.token_ops import classify_tokens, normalise, token_scores
from specdiff_fx.runtime.scoring import draft_timesteps, future_importance, history_mix_weights


def test_classes_are_disjoint_and_sized():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=g)
    index, reuse = classify_tokens(scores, k=12, c2_share=0.1)
    assert index.shape == (3, 12)
    assert torch.all(index[:, 1:] > index[:, :-1]), "sorted, distinct"
    c1 = torch.zeros_like(reuse)
    c1.scatter_(1, index, True)
    assert not (c1 & reuse).any()
    for b in range(3):
        assert set(index[b].tolist()) == set(torch.topk(scores[b], 12).indices.tolist())
        # C2 is the lowest-scoring tokens and holds at most c2_share of the score mass
        assert scores[b][reuse[b]].sum() <= 0.1 * scores[b].sum() + 1e-6
        if reuse[b].any():
            assert scores[b][reuse[b]].max() <= scores[b][~reuse[b] & ~c1[b]].min()


def test_classes_differ_per_batch_element():
    scores = torch.stack([torch.arange(10.0), torch.arange(10.0).flip(0)])
    index, _ = classify_tokens(scores, k=3, c2_share=0.0)
    assert index.tolist() == [[7, 8, 9], [0, 1, 2]]


def test_scores_combine_history_future_and_starvation():
    his = torch.tensor([[1.0, 2.0, 3.0]])
    fut = torch.tensor([[3.0, 2.0, 1.0]])
    count = torch.tensor([[0, 0, 4]])
    s = token_scores(his, fut, count, lam=0.5)
    expected = normalise(his) * normalise(fut) * torch.exp(0.5 * count.float())
    torch.testing.assert_close(s, expected)
    assert token_scores(his, None, torch.zeros_like(count), lam=0.5).argmax() == 2


def test_history_weights_as_reported():
    w = history_mix_weights([900.0, 950.0, 1000.0], 850.0)
    raw = [math.exp(-1) * 50, math.exp(-2) * 100, math.exp(-3) * 150]
    torch.testing.assert_close(w, torch.tensor([r / sum(raw) for r in raw]))
    assert w.sum().item() == pytest.approx(1.0)
    assert history_mix_weights([900.0], 850.0).tolist() == [1.0, 0.0, 0.0]


def test_draft_timesteps_and_future_lookup():
    assert draft_timesteps(1000.0, 2) == [1000.0, 500.0]
    assert draft_timesteps(1.0, 4) == [1.0, 0.75, 0.5, 0.25]
    records = [(750.0, torch.tensor([1.0])), (500.0, torch.tensor([2.0])), (250.0, torch.tensor([3.0]))]
    assert future_importance(records, 800.0).item() == 1.0   # nearest later draft step
    assert future_importance(records, 600.0).item() == 2.0
    assert future_importance(records, 100.0).item() == 3.0   # past the draft: its last step
    assert future_importance([], 100.0) is None
