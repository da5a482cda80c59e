"""How long a run into one ``--out`` took over all its invocations: each stage's seconds, kept in ``timing.json``.

The report's time is the sum of the stages' recorded seconds. An invocation adds the time it spends in a stage to
that stage's entry when the stage ends and every ``HEARTBEAT_S`` seconds while it runs, so the work of a run killed
even by SIGKILL (whose finished trainings and evaluations a rerun skips) stays in the total, less its last seconds.
A ``timing.json`` from before the stages were recorded (``earlier_seconds`` only) counts as one entry, ``earlier``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mlkv.files import atomic_json

__all__ = ["HEARTBEAT_S", "TIMING_FILE", "StageClock", "recorded_seconds"]

#: Seconds between two writes of ``timing.json`` while a stage runs.
HEARTBEAT_S = 10.0
TIMING_FILE = "timing.json"


def _read(out: Path) -> dict[str, float] | None:
    """The stages' recorded seconds in ``out``, or None when nothing was recorded."""
    path = out / TIMING_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    return dict(recorded["stages"]) if "stages" in recorded else {"earlier": recorded["earlier_seconds"]}


def recorded_seconds(out: Path) -> tuple[float | None, dict[str, float]]:
    """``(total, per stage)`` of what the invocations into ``out`` recorded (total None: nothing recorded)."""
    stages = _read(out)
    return (None, {}) if stages is None else (sum(stages.values()), stages)


@dataclass
class StageClock:
    """The stages' seconds of one ``--out``: what earlier invocations recorded plus this one's, written as it goes."""

    out: Path
    stages: dict[str, float] = field(default_factory=dict)
    current: str | None = None
    since: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, out: Path) -> StageClock:
        return cls(out, _read(out) or {})

    def seconds(self) -> dict[str, float]:
        """Each stage's seconds so far, the running one's included."""
        with self.lock:
            stages = dict(self.stages)
            if self.current:
                stages[self.current] = stages.get(self.current, 0.0) + time.time() - self.since
            return stages

    def record(self) -> None:
        """Add the running stage's seconds since the last record to its entry, and write ``timing.json``."""
        with self.lock:
            now = time.time()
            if self.current:
                self.stages[self.current] = self.stages.get(self.current, 0.0) + now - self.since
            self.since = now
            stages = {name: round(seconds, 3) for name, seconds in self.stages.items()}
            atomic_json(self.out / TIMING_FILE, {"stages": stages, "earlier_seconds": round(sum(stages.values()), 3)})

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Count the block's time as stage ``name``'s (recorded at its end, even when it fails or is stopped)."""
        self.record()
        self.current = name
        try:
            yield
        finally:
            self.record()
            self.current = None

    @contextlib.contextmanager
    def heartbeat(self, every: float = HEARTBEAT_S) -> Iterator[None]:
        """Record every ``every`` seconds while the block runs (a thread), so that a kill loses only the last ones."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every):
                self.record()

        thread = threading.Thread(target=beat, name="mlkv-reproduce-clock", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
