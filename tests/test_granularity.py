import torch

import pytest

from prunetune.errors import PrunetuneError
from prunetune.pruning.granularity import global_masks, mask_from_scores, nm_mask, parse_nm, unstructured_mask


def test_row_sparsity_exact_per_row():
    s = torch.rand(7, 30, generator=torch.Generator().manual_seed(0))
    m = unstructured_mask(s, 0.5, "row")
    assert (m.sum(1) == 15).all()
    # the pruned ones are the smallest of each row
    for r in range(7):
        assert s[r][~m[r]].max() <= s[r][m[r]].min()


def test_layer_sparsity_exact():
    s = torch.rand(13, 17)
    m = unstructured_mask(s, 0.3, "layer")
    assert int((~m).sum()) == int(0.3 * 13 * 17)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_every_group(n, m):
    s = torch.rand(6, 32)
    mask = nm_mask(s, n, m)
    assert (mask.view(6, -1, m).sum(-1) == n).all()


def test_global_total_exact():
    scores = {"a": torch.rand(10, 10), "b": torch.rand(5, 20) * 2}
    masks = global_masks(scores, 0.4)
    assert sum(int((~v).sum()) for v in masks.values()) == 80


def test_bad_inputs():
    with pytest.raises(PrunetuneError):
        parse_nm("4:2")
    with pytest.raises(PrunetuneError):
        parse_nm("x")
    with pytest.raises(PrunetuneError):
        mask_from_scores(torch.rand(2, 4), 1.0)
