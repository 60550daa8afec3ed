"""Exact top-k masks: the k largest entries of one tensor or of several together, fast when called once per step."""

from __future__ import annotations

import math

import torch

from mtp.pruning.base import host_reads_are_free


def allocate(total: int, sizes: list[int], fraction: float) -> list[int]:
    """Split `total` kept entries over matrices in proportion to their sizes (largest remainder), summing exactly."""
    raw = [fraction * n for n in sizes]
    counts = [min(n, int(math.floor(r))) for r, n in zip(raw, sizes, strict=True)]
    rest = total - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order:
        if rest <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            rest -= 1
    return counts


def kth_largest(values: torch.Tensor, k: int, scratch: bool = False) -> float:
    """The k-th largest entry (1 <= k <= n), by selection rather than sorting: numpy's introselect on CPU
    (an order of magnitude faster than torch.topk there), torch.kthvalue on accelerators. With `scratch`,
    a CPU float32 `values` may be reordered in place (saves a copy)."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu":
        import numpy as np

        arr = flat.float().numpy()
        if scratch and flat.dtype == torch.float32:
            arr.partition(n - k)
            return float(arr[n - k])
        return float(np.partition(arr, n - k)[n - k])
    return float(torch.kthvalue(flat.float(), n - k + 1).values)


def topk_mask(criterion: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask keeping exactly the k largest entries (ties broken by position, deterministically)."""
    return threshold_masks([criterion], k)[0][0]


def threshold_masks(criteria: list[torch.Tensor], k: int) -> tuple[list[torch.Tensor], float]:
    """Boolean masks over several tensors keeping exactly the k largest entries of all of them together
    (entries equal to the threshold are taken first by tensor, then by position), and that threshold."""
    masks = [torch.empty_like(c, dtype=torch.bool) for c in criteria]
    return masks, TopK().select(criteria, k, masks)


class TopK:
    """Exact top-k masks, cheap when called again on values that moved a little (once per optimizer step).

    The k-th largest entry is looked for first in a narrow band around the previous threshold: a count of
    the entries above the band says whether the band holds it, and only the band's entries are selected
    from. When the band misses (the first call, a jump in k) a full selection runs and the band widens.
    The result is always exact, with the same tie rule as a full selection, so the selector's state is a
    speed hint only (it is not checkpointed).
    """

    def __init__(self, numpy_on_cpu: bool = True) -> None:
        self.numpy_on_cpu = numpy_on_cpu  # band search through numpy for CPU tensors (torch's path otherwise)
        self.hint: float | None = None  # where the threshold is expected: the last one plus its last move
        self.last: float | None = None
        self.width = 0.0
        self.full_selections = 0

    def select(self, criteria: list[torch.Tensor], k: int, out: list[torch.Tensor]) -> float | torch.Tensor:
        """Write 0/1 masks keeping exactly the k largest entries of `criteria` into `out` (any dtype) and
        return the threshold; entries equal to it are taken first by tensor, then by position. Where host reads
        are not free (an accelerator) the same masks come from `select_on_device` and the threshold is a tensor."""
        flats = [c.detach().reshape(-1) for c in criteria]
        n = sum(f.numel() for f in flats)
        if k >= n or k <= 0:
            for m in out:
                m.fill_(1 if k >= n else 0)
            return -math.inf if k >= n else math.inf
        if not host_reads_are_free(flats[0]):
            return select_on_device(flats, k, out)
        found = self._in_band(flats, k) if self.hint is not None else None
        if found is None:
            threshold = kth_largest(flats[0], k) if len(flats) == 1 else kth_largest(
                torch.cat([f.float() for f in flats]), k, scratch=True)
            above = sum(int(torch.count_nonzero(f > threshold)) for f in flats)
            at_least = above + sum(int(torch.count_nonzero(f == threshold)) for f in flats)
            self.full_selections += 1
            grown = 4 * self.width
        else:
            (threshold, above, at_least), grown = found, 0.75 * self.width  # the band shrinks slowly while it hits
        error = abs(threshold - self.hint) if self.hint is not None else 0.0
        self.width = max(grown, 3 * error, 1e-4 * abs(threshold), 1e-12)
        self.hint = threshold if self.last is None else 2 * threshold - self.last  # linear extrapolation
        self.last = threshold
        if at_least == k:  # the usual case: no other entry equals the threshold
            for c, m in zip(criteria, out, strict=True):
                torch.ge(c.detach(), threshold, out=m)
            return threshold
        for c, m in zip(criteria, out, strict=True):
            torch.gt(c.detach(), threshold, out=m)
        missing = k - above
        for c, m in zip(criteria, out, strict=True):
            if missing <= 0:
                break
            ties = torch.nonzero((c.detach() == threshold).reshape(-1)).squeeze(1)[:missing]
            m.view(-1)[ties] = 1
            missing -= ties.numel()
        return threshold

    def _in_band(self, flats: list[torch.Tensor], k: int) -> tuple[float, int, int] | None:
        """(k-th largest, entries above it, entries at least it) when it lies within hint +- width, else None."""
        assert self.hint is not None
        low, high = self.hint - self.width, self.hint + self.width
        if self.numpy_on_cpu and all(f.device.type == "cpu" for f in flats):  # numpy: 2-5x torch's speed here
            import numpy as np

            arrays = [f.float().numpy() for f in flats]
            above = sum(int(np.count_nonzero(a > high)) for a in arrays)
            if above >= k:
                return None
            pieces = [a[(a > low) & (a <= high)] for a in arrays]
            band = torch.from_numpy(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        else:
            above = sum(int(torch.count_nonzero(f > high)) for f in flats)
            if above >= k:
                return None
            bands = [f[(f > low) & (f <= high)] for f in flats]
            band = bands[0] if len(bands) == 1 else torch.cat(bands)
        if above + band.numel() < k:
            return None
        threshold = kth_largest(band, k - above)
        return (threshold, above + int(torch.count_nonzero(band > threshold)),
                above + int(torch.count_nonzero(band >= threshold)))


def select_on_device(flats: list[torch.Tensor], k: int, out: list[torch.Tensor]) -> torch.Tensor:
    """The masks of `TopK.select` (0 < k < n) without reading a value back to the host: the k-th largest entry by
    `kthvalue`, the entries above it, then the ties in order (by tensor, then position) up to k through a cumulative
    count. Returns the threshold as a 0-d tensor."""
    values = flats[0].float() if len(flats) == 1 else torch.cat([f.float() for f in flats])
    threshold = torch.kthvalue(values, values.numel() - k + 1).values
    above = values > threshold
    ties = values == threshold
    keep = above | (ties & (ties.cumsum(0) <= k - above.sum()))
    for part, m in zip(keep.split([f.numel() for f in flats]), out, strict=True):
        m.copy_(part.view_as(m))
    return threshold


def select_rows_on_device(criteria: list[torch.Tensor], ks: list[int], out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor top-k masks (the k of each in `ks`) for tensors of one size, in one batch of operators and without
    host reads: the rows sorted, each row's k-th largest gathered, then the entries above it and its ties in order
    of position up to k. The same masks as `TopK.select` on each tensor alone. Returns the thresholds (a [rows, 1]
    tensor's rows; +inf where k = 0)."""
    values = torch.stack([c.detach().reshape(-1) for c in criteria]).float()
    k = torch.tensor(ks, dtype=torch.int64).to(values.device, non_blocking=True)[:, None]
    ordered = values.sort(dim=1, descending=True).values
    threshold = ordered.gather(1, (k - 1).clamp(min=0))
    threshold = torch.where(k > 0, threshold, torch.full_like(threshold, math.inf))
    above = values > threshold
    ties = values == threshold
    keep = above | (ties & (ties.cumsum(1) <= k - above.sum(1, keepdim=True)))
    torch._foreach_copy_(out, [row.view_as(m) for row, m in zip(keep.unbind(0), out, strict=True)])
    return list(threshold.unbind(0))
