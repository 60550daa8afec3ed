"""Exact top-k and its allocation over matrices, against a full sort."""

from __future__ import annotations

import math

import pytest
import torch

from mtp.pruning import (
    TopK,
    accelerator_paths,
    allocate,
    topk_mask,
)


def test_topk_keeps_exactly_k_and_allocation_sums_exactly() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5], [0.1, 0.9, 0.5]])
    mask = topk_mask(scores, 4)
    assert int(mask.sum()) == 4 and bool(mask[1, 1]) and not bool(mask[1, 0])
    assert int(topk_mask(scores, 0).sum()) == 0 and int(topk_mask(scores, 99).sum()) == 6
    sizes = [1000, 4000, 3, 777]
    for fraction in (0.1, 0.333, 0.5, 0.999):
        total = math.floor(fraction * sum(sizes))
        counts = allocate(total, sizes, fraction)
        assert sum(counts) == total and all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))


def reference_masks(criteria: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k largest entries by a stable full sort: larger first, ties by tensor, then by position."""
    flat = torch.cat([c.reshape(-1) for c in criteria])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return [part.view_as(c) for part, c in zip(keep.split([c.numel() for c in criteria]), criteria, strict=True)]


@pytest.mark.parametrize("tensors", [1, 3])
@pytest.mark.parametrize("numpy_on_cpu", [True, False])  # False: the path accelerators take
def test_incremental_topk_matches_a_full_sort_as_values_drift(tensors: int, numpy_on_cpu: bool) -> None:
    """The banded selection (previous threshold as a hint) against a full stable sort, step after step:
    small drifts (the band hits), a jump of the values and of k (it misses), ties at the threshold."""
    torch.manual_seed(0)
    criteria = [torch.randn(64, 48) for _ in range(tensors)]
    n = sum(c.numel() for c in criteria)
    selector = TopK(numpy_on_cpu)
    for step in range(40):
        for c in criteria:
            c.add_(torch.randn_like(c), alpha=1e-3 if step != 20 else 1.0)
        if step == 30:  # many entries equal to the threshold: ties taken by tensor, then position
            for c in criteria:
                c.view(-1)[::3] = 0.25
        k = n // 4 if step < 25 else n // 10 + step
        masks = [torch.empty_like(c) for c in criteria]
        selector.select(criteria, k, masks)
        for mask, ref in zip(masks, reference_masks(criteria, k), strict=True):
            assert torch.equal(mask.bool(), ref), f"step {step}"
        assert sum(int(m.count_nonzero()) for m in masks) == k
    assert selector.full_selections <= 8  # the band normally answers; full selections at the first call and jumps


@pytest.mark.parametrize("tensors", [1, 3])
def test_the_device_selection_keeps_the_same_entries_without_host_reads(tensors: int) -> None:
    """The accelerator path (kthvalue, then ties by a cumulative count) against a full stable sort, ties included,
    with the threshold left on the device."""
    torch.manual_seed(1)
    criteria = [torch.randn(32, 24) for _ in range(tensors)]
    for c in criteria:
        c.view(-1)[::4] = 0.1  # many ties, some at the threshold for some k
    n = sum(c.numel() for c in criteria)
    with accelerator_paths():
        for k in (1, n // 10, n // 4, n // 2, n - 1):
            masks = [torch.empty_like(c, dtype=torch.bool) for c in criteria]
            threshold = TopK().select(criteria, k, masks)
            assert isinstance(threshold, torch.Tensor)
            for mask, ref in zip(masks, reference_masks(criteria, k), strict=True):
                assert torch.equal(mask, ref), k


def test_the_batched_device_selection_keeps_each_tensors_own_top_k() -> None:
    """Tensors of one size selected together, each with its own k (0 and all included), ties by position."""
    from mtp.pruning.topk import select_rows_on_device

    torch.manual_seed(2)
    criteria = [torch.randn(12, 10) for _ in range(5)]
    criteria[1].view(-1)[::3] = 0.2
    ks = [0, 37, 60, 119, 120]
    masks = [torch.empty(12, 10) for _ in criteria]  # float masks, as MaskedLinear keeps them
    select_rows_on_device(criteria, ks, masks)
    for c, k, m in zip(criteria, ks, masks, strict=True):
        assert torch.equal(m.bool(), reference_masks([c], k)[0]), k


def test_magnitude_masks_are_the_same_on_the_accelerator_path() -> None:
    from mtp.pruning import build_pruning, pruning_settings
    from tests.unit.pruning.tiny import tiny_model

    masks = []
    for accelerated in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        hook = build_pruning(pruning_settings(method="magnitude", budget=0.3, warmup_ratio=0.0, cooldown_ratio=0.0),
                             10)[0]
        hook.setup(model)
        with torch.no_grad():
            for m in hook.modules:
                m.weight.view(-1)[::7] = 0.01  # ties
        if accelerated:
            with accelerator_paths():
                hook.on_optimizer_step(model, 4)
        else:
            hook.on_optimizer_step(model, 4)
        masks.append([m.mask.clone() for m in hook.modules])
        assert hook.reported_threshold() > 0
    for a, b in zip(*masks, strict=True):
        assert torch.equal(a, b)
