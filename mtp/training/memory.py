"""Resident memory of each rank, phase by phase, for `bench/memory.py`: with $MTP_MEMORY_PROFILE set to a folder,
a thread samples this process's RSS every 0.2 s and the trainer names the phase it is in (model build, engine
set-up, training, evaluation, checkpoint, final save); at exit each rank writes rank<R>.json there. Unset: nothing
runs. With $MTP_MEMORY_TENSORS=1 as well, each phase change also counts the tensors alive in this process (every
storage once, by dtype and shape) and the RSS once the C allocator has returned its free pages
(`malloc_trim`), which tells memory held by tensors from memory the allocator keeps. (The trim changes what is
measured after it: a diagnosis, not the benchmark's figure.)"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from mtp.hooks import Hook


class MemoryProfile:
    """Peak, median and last RSS (MiB) of every phase of this process."""

    def __init__(self, folder: Path, interval: float = 0.2):
        import psutil

        self.folder, self.interval = folder, interval
        self.process = psutil.Process()
        self.current = "start"
        self.samples: dict[str, list[float]] = {"start": []}
        self.order = ["start"]
        self.census: list[dict[str, Any]] = []
        self.count_tensors = os.environ.get("MTP_MEMORY_TENSORS") == "1"
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()
        atexit.register(self.write)

    def _rss(self) -> float:
        return self.process.memory_info().rss / 2**20

    def _sample(self) -> None:
        while not self.stopped.wait(self.interval):
            self.record()

    def record(self) -> None:
        rss = self._rss()
        with self.lock:
            self.samples[self.current].append(rss)

    def enter(self, phase: str) -> None:
        """Samples from now on belong to `phase` (a phase entered again adds to its samples)."""
        self.record()  # the end of the phase before
        if self.count_tensors:
            entry = {"leaving": self.current, "entering": phase, "rss_mib": round(self._rss(), 1), **live_tensors()}
            if release_free_memory():
                entry["rss_after_trim_mib"] = round(self._rss(), 1)
            self.census.append(entry)
        with self.lock:
            self.current = phase
            if phase not in self.samples:
                self.samples[phase] = []
                self.order.append(phase)
        self.record()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {phase: {"peak_mib": round(max(s), 1), "median_mib": round(statistics.median(s), 1),
                            "last_mib": round(s[-1], 1), "samples": len(s)}
                    for phase in self.order if (s := self.samples[phase])}

    def write(self) -> None:
        self.stopped.set()
        self.record()
        rank = os.environ.get("RANK", "0")
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.json").write_text(json.dumps({"rank": int(rank), "time": time.time(),
                                                                  "phases": self.summary(),
                                                                  "tensors": self.census}, indent=2))


MMAP_THRESHOLD = 256 << 10  # bytes: blocks this large or larger get their own mapping
ARENAS = 2


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library through ctypes, or None where it is not glibc (no mallopt / malloc_trim)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_trim_after_steps = False


def return_freed_memory_at_once(threshold: int = MMAP_THRESHOLD, arenas: int = ARENAS) -> bool:
    """Make glibc give freed memory back to the system rather than keep it: every allocation of `threshold`
    bytes or more gets its own mapping (M_MMAP_THRESHOLD; glibc otherwise raises that threshold, up to 32 MiB, as
    large blocks are freed, and keeps freed blocks below it for reuse), at most `arenas` heaps (M_ARENA_MAX), and
    the heaps' free pages handed back after every optimizer step (`after_optimizer_step`). A ZeRO-3 rank on CPU
    gathers and frees every layer's parameters and gradients each step; without this a BERT-large rank sat on
    about 2 GB of freed memory (docs/design.md). Settings made in $MALLOC_MMAP_THRESHOLD_ / $MALLOC_ARENA_MAX are
    left alone. False where the C library is not glibc."""
    global _trim_after_steps
    libc = _glibc()
    if libc is None:
        return False
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done &= libc.mallopt(-3, threshold) == 1  # M_MMAP_THRESHOLD
    if "MALLOC_ARENA_MAX" not in os.environ:
        done &= libc.mallopt(-8, arenas) == 1  # M_ARENA_MAX
    _trim_after_steps = True
    return done


def after_optimizer_step() -> None:
    """Once `return_freed_memory_at_once` is on: hand the heaps' free pages back (a few milliseconds; a BERT-large
    ZeRO-3 step on CPU takes seconds). Otherwise nothing."""
    if _trim_after_steps:
        release_free_memory()


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the system (glibc `malloc_trim`); False where there is none."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def live_tensors(top: int = 12) -> dict[str, Any]:
    """MiB held by the tensors alive in this process (each storage counted once) and the largest groups of them
    by (dtype, shape)."""
    import torch

    seen: set[int] = set()
    groups: dict[str, list[float]] = {}
    total = 0.0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
                continue
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except Exception:  # noqa: BLE001 - tensors without storage (sparse, functional and fake tensors)
            continue
        if pointer in seen or storage.nbytes() == 0:
            continue
        seen.add(pointer)
        mib = storage.nbytes() / 2**20
        total += mib
        entry = groups.setdefault(f"{str(obj.dtype).removeprefix('torch.')} {tuple(obj.shape)}", [0, 0.0])
        entry[0] += 1
        entry[1] += mib
    largest = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {"tensors_mib": round(total, 1), "storages": len(seen),
            "largest": [{"tensor": k, "count": n, "mib": round(m, 1)} for k, (n, m) in largest]}


_PROFILE: MemoryProfile | None = None


def phase(name: str) -> None:
    """Mark the phase this rank enters (a no-op unless $MTP_MEMORY_PROFILE is set)."""
    global _PROFILE
    folder = os.environ.get("MTP_MEMORY_PROFILE")
    if not folder:
        return
    if _PROFILE is None:
        _PROFILE = MemoryProfile(Path(folder))
    _PROFILE.enter(name)


class MemoryProfiler(Hook):
    """The memory profile on the trainer's events: each phase it enters is marked (a no-op unless
    $MTP_MEMORY_PROFILE is set), and after each optimizer step the heaps' free pages go back to the system once
    `return_freed_memory_at_once` is on. Built on every rank."""

    name = "memory"

    def on_phase(self, phase_name: str) -> None:
        phase(phase_name)

    def on_optimizer_step(self, model: Any, step: int) -> None:
        after_optimizer_step()
