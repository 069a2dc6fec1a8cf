"""The daemon's side of a hardware profile (:mod:`p2pfed.profiles`): torch's threads, the time
and memory each training round takes, and the memory cap.

At start-up :func:`apply_threads` sets torch's intra-op threads (and, when it still can, its
inter-op threads: torch refuses that once any parallel work has run in the process, which in
the daemon has not).  :class:`ResourceMonitor` wraps the trainer: after each training round it
records the seconds the round took and the process's peak resident memory (``ru_maxrss``),
counted from the end of start-up (:meth:`ResourceMonitor.loaded`; on Linux the kernel's
high-water mark is reset there, so the model's loading peak is reported apart and never stops
training).  Past the memory cap it stops training, for the life of the process (the peak
never falls): the
node's schedule (:meth:`ResourceMonitor.allows`, called at each round's start) then says no, so
every later round only mixes, and its ``local-update`` entry says it was not trained.  It logs a
warning once; ``status`` reports it (``resources``, :meth:`ResourceMonitor.status`).
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from p2pfed.profiles import Resources

log = logging.getLogger(__name__)

__all__ = ["ResourceMonitor", "apply_threads", "peak_rss_mb", "unit_limits"]

R = TypeVar("R")

#: the unit's MemoryMax= is the cap times this: the daemon's own check (which stops training
#: and goes on mixing) comes first, the kernel's limit (which kills it) is the backstop
UNIT_MEMORY_HEADROOM = 1.25


def peak_rss_mb() -> float:
    """The process's peak resident memory, MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Reset the process's peak resident memory to what it holds now (Linux: writing 5 to
    ``/proc/self/clear_refs`` resets the kernel's high-water mark, which ``ru_maxrss`` reads);
    False where that cannot be done (the peak then still counts start-up)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def apply_threads(threads: int) -> dict[str, int]:
    """Set torch's threads to ``threads`` (0: leave torch's default); returns what is in force.

    The inter-op pool can be sized only once, before any parallel work: when torch refuses, the
    pool it has stays (it runs work only between operators, so it does not add compute)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:  # (set already, or parallel work has run)
            log.debug("torch's inter-op threads stay %d: %s", torch.get_num_interop_threads(),
                      exc)
    in_force = {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
    log.info("torch threads: %d (inter-op %d)%s", in_force["torch"], in_force["interop"],
             "" if threads else ", torch's default")
    return in_force


def unit_limits(res: Resources) -> list[str]:
    """The systemd unit's resource directives for ``res``: none without a memory cap."""
    if not res.max_memory_mb:
        return []
    lines = [f"MemoryMax={math.ceil(res.max_memory_mb * UNIT_MEMORY_HEADROOM)}M"]
    if res.threads:
        lines.append(f"CPUQuota={100 * res.threads}%")
    return lines


class ResourceMonitor:
    """The time and memory of the training rounds, and the memory cap (thread-safe: the
    trainer runs in a worker thread, ``status`` on the event loop)."""

    def __init__(self, res: Resources, rss_mb: Callable[[], float] = peak_rss_mb,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.res = res
        self._rss_mb, self._clock = rss_mb, clock
        self._lock = threading.Lock()
        self.rounds = 0
        self.last_s: float | None = None
        self.total_s = 0.0
        self.peak_mb = 0.0
        #: the peak memory when start-up ended (None: not yet, :meth:`loaded`)
        self.startup_mb: float | None = None
        self.stopped = False
        self.threads: dict[str, int] = {}
        #: torch's threads as the training thread saw them (None: no round yet)
        self.training_threads: int | None = None

    def start(self) -> None:
        """At start-up: set torch's threads (:func:`apply_threads`)."""
        self.threads = apply_threads(self.res.threads)
        self.check()

    def loaded(self, reset: Callable[[], bool] = reset_peak) -> None:
        """Start-up is over (ledger verified, model built, data read): keep its peak apart
        (``startup_rss_mb``) and measure the cap from here, so that loading the model, whose
        transient peak training never reaches again, does not stop training."""
        startup = self._rss_mb()
        reset_ok = reset()
        with self._lock:
            self.startup_mb = startup
            if reset_ok:
                self.peak_mb = 0.0
                self.stopped = False  # (only start-up had been measured)
        self.check()

    def wrap(self, run: Callable[[Any], R]) -> Callable[[Any], R]:
        """``run`` (the trainer's), timed, with the memory checked after each round."""
        def timed(request: Any) -> R:
            import torch

            if self.res.threads and torch.get_num_threads() != self.res.threads:
                torch.set_num_threads(self.res.threads)  # (a worker thread has its own count)
            self.training_threads = torch.get_num_threads()  # (in the thread that trains)
            begin = self._clock()
            result = run(request)
            elapsed = self._clock() - begin
            if not (isinstance(result, float) and math.isnan(result)):  # (nan: no training)
                with self._lock:
                    self.rounds += 1
                    self.last_s = elapsed
                    self.total_s += elapsed
            self.check()
            return result
        return timed

    def check(self) -> bool:
        """Read the peak memory; past the cap, stop training (a warning, once).  True while
        training may go on."""
        peak = self._rss_mb()
        with self._lock:
            self.peak_mb = max(self.peak_mb, peak)
            cap = self.res.max_memory_mb
            if cap and self.peak_mb > cap and not self.stopped:
                self.stopped = True
                log.warning("peak memory %.0f MB is past the cap of %d MB ([node] max_memory_mb "
                            "or the %s profile's): training stops, mixing goes on (restart to "
                            "train again; raise the cap, or lower [model] batch_size)",
                            self.peak_mb, cap, self.res.profile)
            return not self.stopped

    def allows(self, _now_ms: int) -> bool:
        """The node's schedule (``NodeConfig.schedule``): may a round train?"""
        return self.check()

    def mean_ms(self) -> float:
        """The mean time of the training rounds so far, ms (0 before the first)."""
        with self._lock:
            return 1000 * self.total_s / self.rounds if self.rounds else 0.0

    def gate(self, interval_ms: int) -> Callable[[int], bool] | None:
        """The node's schedule from the profile: :meth:`allows` with a memory cap, and with
        ``keep_pace`` (laptop, phone) a :class:`~p2pfed.node.KeepPace` on the measured mean
        training time against the round interval ``interval_ms``; None with neither (a
        server runs exactly as before profiles)."""
        from p2pfed.node import KeepPace

        cap = self.allows if self.res.max_memory_mb else None
        if not self.res.keep_pace:
            return cap
        pace = KeepPace(self.mean_ms, interval_ms)
        if cap is None:
            return pace
        return lambda now_ms: cap(now_ms) and pace(now_ms)

    def training(self) -> str:
        if self.res.inference_only:
            return "inference-only"
        return "stopped: memory cap" if self.stopped else "on"

    def status(self) -> dict[str, Any]:
        """``status``'s ``resources`` (docs/status.schema.json)."""
        import torch

        self.check()
        with self._lock:
            return {
                "profile": self.res.profile,
                "threads": {"configured": self.res.threads, "torch": torch.get_num_threads(),
                            "interop": torch.get_num_interop_threads(),
                            "training": self.training_threads},
                "peak_rss_mb": round(self.peak_mb, 1),
                "startup_rss_mb": None if self.startup_mb is None else round(self.startup_mb, 1),
                "max_memory_mb": self.res.max_memory_mb or None,
                "training": self.training(),
                "round_s": {"rounds": self.rounds, "last": self.last_s,
                            "mean": self.total_s / self.rounds if self.rounds else None},
            }
