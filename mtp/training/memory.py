"""Resident memory of each rank, phase by phase, for `bench/memory.py`: with $MTP_MEMORY_PROFILE set to a folder,
a thread samples this process's RSS every 0.2 s and the trainer names the phase it is in (model build, engine
set-up, training, evaluation, checkpoint, final save); at exit each rank writes rank<R>.json there. Unset: nothing
runs."""

from __future__ import annotations

import atexit
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any


class MemoryProfile:
    """Peak, median and last RSS (MiB) of every phase of this process."""

    def __init__(self, folder: Path, interval: float = 0.2):
        import psutil

        self.folder, self.interval = folder, interval
        self.process = psutil.Process()
        self.current = "start"
        self.samples: dict[str, list[float]] = {"start": []}
        self.order = ["start"]
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
                                                                  "phases": self.summary()}, indent=2))


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
