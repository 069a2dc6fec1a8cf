"""Hardware profiles (``[node] profile``): what a member's machine may spend on the federation.

A profile is a set of defaults for the settings that decide a member's own work: what it
trains, how many optimiser steps and examples a round takes, how many CPU threads torch uses
and the memory past which it stops training.  Each of them can be set explicitly
(``[model] steps``, ``[model] batch_size``, ``[node] threads``, ``[node] max_memory_mb``,
``[components] train``); an explicit setting wins over the profile.

=========  =========================  =====  =====  =======  ==========
profile    trains                     steps  batch  threads  memory cap
=========  =========================  =====  =====  =======  ==========
server     everything local data      8      16     all      none
laptop     trains                     4      16     2        4096 MB
phone      heads and prompts only     2      8      1        1536 MB
=========  =========================  =====  =====  =======  ==========

``[node] inference_only = true`` (any profile) trains nothing: the member still mixes what it
holds and can predict.  A profile limits only the member's own work; nothing it declares is
sent to, or trusted by, the others (docs/security.md).

This module is torch-free: the config reads it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from p2pfed.config import Config

__all__ = ["PROFILES", "PROFILE_NAMES", "Profile", "Resources", "resources_of",
           "trained_subset"]


@dataclass(frozen=True)
class Profile:
    name: str
    #: torch's intra-op threads (0: torch's default, one per core)
    threads: int
    #: peak resident memory (MB) past which training stops (0: none)
    max_memory_mb: int
    #: ``[model] steps`` and ``batch_size`` when the config does not set them (None: the
    #: config's defaults)
    steps: int | None
    batch_size: int | None
    #: the name prefixes of the held components it trains (None: all that local data trains)
    trains: tuple[str, ...] | None
    #: a line for ``p2pfed init``'s comments and the docs
    summary: str
    #: train a round only once the last training is a round interval behind it, when a
    #: training takes longer than a round (:class:`p2pfed.node.KeepPace`)
    keep_pace: bool = False


PROFILES: dict[str, Profile] = {
    "server": Profile("server", 0, 0, None, None, None,
                      "trains everything, all cores, no memory cap"),
    "laptop": Profile("laptop", 2, 4096, 4, 16, None,
                      "trains everything, 2 threads, 4 steps of 16, stops training past 4 GB",
                      keep_pace=True),
    "phone": Profile("phone", 1, 1536, 2, 8, ("head.", "prompt."),
                     "trains heads and prompts only, 1 thread, 2 steps of 8, stops training "
                     "past 1.5 GB", keep_pace=True),
}
PROFILE_NAMES = tuple(PROFILES)


@dataclass(frozen=True)
class Resources:
    """The effective settings of a config's profile and its explicit settings."""

    profile: str
    threads: int  # 0: torch's default
    max_memory_mb: int  # 0: no cap
    steps: int
    batch_size: int
    #: prefixes of the components it may train (None: any)
    trains: tuple[str, ...] | None
    inference_only: bool
    #: the profile's :attr:`Profile.keep_pace`
    keep_pace: bool = False


def resources_of(config: Config) -> Resources:
    """``config``'s profile with its explicit settings applied (see :class:`Profile`)."""
    profile = PROFILES[config.node.profile]
    model = config.model
    return Resources(
        profile=profile.name,
        threads=config.node.threads or profile.threads,
        max_memory_mb=config.node.max_memory_mb or profile.max_memory_mb,
        steps=model.steps if profile.steps is None or config.is_set("model.steps")
        else profile.steps,
        batch_size=model.batch_size
        if profile.batch_size is None or config.is_set("model.batch_size")
        else profile.batch_size,
        trains=profile.trains,
        inference_only=config.node.inference_only,
        keep_pace=profile.keep_pace,
    )


def trained_subset(config: Config, holds: Iterable[str]) -> frozenset[str] | None:
    """Which of ``holds`` the trainer may train (``LocalTrainer.only``; None: every one that
    local data trains): nothing when inference-only; ``[components] train`` when set (an
    explicit list wins over the profile); else those the profile allows."""
    res = resources_of(config)
    if res.inference_only:
        return frozenset()
    if config.components.train:
        return frozenset(config.components.train)
    if res.trains is None:
        return None
    return frozenset(c for c in holds if c.startswith(res.trains))
