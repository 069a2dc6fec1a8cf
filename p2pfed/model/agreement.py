"""Members agree on the text model: its identity in the genesis, checked at join and at start.

Adapters of ``encoder.text.lora`` can only be mixed between members whose frozen text models
are the same model with the same adapter settings (:func:`p2pfed.model.textbase.identity`).
Two models of the same shapes but different weights give adapters of the same layout, so
nothing else would notice.  So:

* ``p2pfed federation create`` signs the founder's identity into the genesis
  (:func:`genesis_policies`: policies ``model.text``, the digest, and ``model.text.summary``)
  when the catalog has ``encoder.text.lora`` and the founder runs the M3T model;
* ``p2pfed join`` refuses, before anything is written, when this node would hold
  ``encoder.text.lora`` with another identity (:func:`check_joining`);
* the daemon refuses to start when ``[model]`` was changed since (:func:`check_at_start`),
  and records the identity in its ledger (a ``base-model`` entry, :func:`record_base`) when
  it is new there: the text adapter's checkpoints after it were made over that model, and
  ``export``, ``predict`` and ``explain`` load them onto no other (:func:`check_checkpoint`).

A federation whose genesis has no ``model.text`` (founded before, or by a node that runs the
consensus workload) is not checked.  The text model is loaded only for a node that holds (or
a catalog that has) ``encoder.text.lora``; at start it is loaded once more than before (a few
tenths of a second for MiniLM).  The check guards honest members against a misconfiguration;
it proves nothing to anyone else (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

from gossip.errors import ConfigError
from gossip.records import Genesis, Policy
from p2pfed.config import Config
from p2pfed.journal import BaseModel, Stored, stored, write
from p2pfed.ledger import Ledger
from p2pfed.model.m3t import ENCODERS, TEXT

log = logging.getLogger(__name__)

#: the genesis policy holding the identity's digest, and the one with its summary (for people)
POLICY = "model.text"
SUMMARY_POLICY = "model.text.summary"
#: the component whose base model must be the same everywhere
COMPONENT = ENCODERS[TEXT]
#: what a member changes to match
SETTINGS = "[model] text_model, lora_layers and lora_targets in p2pfed.toml"
_MAX_POLICY_CHARS = 1024
#: the identity's definition: a cached identity of another definition is not used
IDENTITY_FORMAT = 2


class TextModelMismatchError(ConfigError):
    """This node's text model (or its adapter settings) is not the federation's."""

    code = "text-model-mismatch"


def text_identity(config: Config, cache: Path | None = None) -> dict[str, Any]:
    """The identity of the text model ``config`` names, with the adapter settings the model
    uses (:func:`p2pfed.model.local.model_spec`).  It loads the model (from local files) and
    hashes its weights, unless ``cache`` (a directory, usually the home's ``cache/``) holds the
    identity of the same settings over the same files (their names, sizes and modification
    times): a model of several GB is then hashed once, not at every start."""
    from p2pfed.model.local import model_spec
    from p2pfed.model.textbase import (
        BUILT_IN,
        _bundled_path,
        check_text_model,
        identity,
        load_text_base,
    )

    spec = model_spec(config, bytes(32))
    settings = {"targets": sorted(spec.lora_targets), "rank": spec.lora_rank,
                "alpha": spec.lora_alpha, "mode": str(spec.adapter_mode),
                "layers": None if spec.lora_layers is None else sorted(spec.lora_layers)}
    where = (Path(_bundled_path()) if spec.text_model == "minilm" else None
             if spec.text_model in BUILT_IN else check_text_model(spec.text_model))
    key = _cache_key(where, spec.text_model, settings) if where is not None else None
    known = _cached(cache, key)
    if known is not None:
        return known
    base, _tokenizer = load_text_base(spec.text_model)
    ident = identity(base, spec.text_model, targets=spec.lora_targets, layers=spec.lora_layers,
                     rank=spec.lora_rank, alpha=spec.lora_alpha, mode=str(spec.adapter_mode))
    if where is not None and _cache_key(where, spec.text_model, settings) == key:
        _remember(cache, key, ident)  # (unless the files changed while they were hashed)
    return ident


_CACHE_FILE = "text-identity.json"
_CACHE_ENTRIES = 8


def _cache_key(directory: Path, kind: str, settings: dict[str, Any]) -> str | None:
    """A digest of ``directory``'s files (names, sizes, modification and change times, inodes:
    a copy that keeps the times, or a file replaced in place, changes it), the libraries that
    compute the identity and the adapter settings; None when the directory has no model."""
    import torch
    import transformers

    files = []
    for root, _dirs, names in os.walk(directory, followlinks=True):
        for name in names:
            path = Path(root) / name
            try:
                st = path.stat()
            except OSError:
                return None
            files.append((str(path.relative_to(directory)), st.st_size, st.st_mtime_ns,
                          st.st_ctime_ns, st.st_ino, st.st_dev))
    if not any(f[0] == "config.json" for f in files):
        return None
    blob = json.dumps([IDENTITY_FORMAT, transformers.__version__, torch.__version__, kind,
                       str(directory.resolve()), sorted(files), settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(cache: Path | None, key: str | None) -> dict[str, Any] | None:
    if cache is None or key is None:
        return None
    try:
        entries = json.loads((cache / _CACHE_FILE).read_text(encoding="utf-8"))
        found = entries.get(key) if isinstance(entries, dict) else None
    except (OSError, ValueError):
        return None  # (a missing or damaged cache is only a slower start)
    ok = isinstance(found, dict) and isinstance(found.get("digest"), str) and isinstance(
        found.get("summary"), str)
    return found if ok else None


def _remember(cache: Path | None, key: str | None, ident: dict[str, Any]) -> None:
    if cache is None or key is None:
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / _CACHE_FILE
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            entries = {}
        entries = dict(list(entries.items())[-(_CACHE_ENTRIES - 1):]) if isinstance(
            entries, dict) else {}  # (in the order written: the oldest go)
        entries.pop(key, None)
        entries[key] = ident
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".text-identity.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(entries))
        os.replace(tmp, path)
    except OSError as exc:
        log.info("the text model's identity is not cached in %s (%s): it is hashed again at "
                 "each start", cache, exc)


def genesis_policies(config: Config, catalog: Collection[str], cache: Path | None = None
                     ) -> tuple[tuple[str, Policy], ...]:
    """The policies a founder signs into the genesis: the text model's identity when the
    catalog has ``encoder.text.lora`` and the founder runs the M3T model; () otherwise."""
    if config.model.kind != "m3t" or COMPONENT not in catalog:
        return ()
    ident = text_identity(config, cache)
    return ((POLICY, ident["digest"]), (SUMMARY_POLICY, ident["summary"][:_MAX_POLICY_CHARS]))


def expected(genesis: Genesis) -> tuple[str, str] | None:
    """The federation's text model: its digest and summary (None: the genesis names none)."""
    digest = genesis.policy(POLICY)
    if not isinstance(digest, str):
        return None
    summary = genesis.policy(SUMMARY_POLICY)
    return digest, summary if isinstance(summary, str) else f"digest {digest[:12]}"


def _has_text(config: Config, holds: Collection[str]) -> bool:
    """Whether this node runs a text model: the M3T model, holding the text adapter."""
    return config.model.kind == "m3t" and COMPONENT in holds


def _unless_same(ours: dict[str, Any], theirs: tuple[str, str], what: str, fix: str) -> None:
    digest, summary = theirs
    if ours["digest"] == digest:
        return
    hidden = (" (the summaries agree: they differ in what a summary leaves out, the model's "
              "config.json or the adapter's alpha or mode)" if ours["summary"] == summary
              else "")
    raise TextModelMismatchError(
        f"{what}: {COMPONENT} adapters are only mixed over the same text model and adapter "
        f"settings; the federation's is {summary!r}, this node's is {ours['summary']!r}"
        f"{hidden}. {fix}")


def check_joining(config: Config, holds: Collection[str], genesis: Genesis,
                  cache: Path | None = None) -> None:
    """Refuse (TextModelMismatchError) to join a federation whose text model is not the one
    this node would hold (``holds``: the components it would join with)."""
    theirs = expected(genesis)
    if theirs is not None and _has_text(config, holds):
        _unless_same(text_identity(config, cache), theirs, f"refusing to join {genesis.name!r}",
                     f"Set {SETTINGS} to the federation's model (ask its admin which one), "
                     "then join again; nothing was written.")


def check_at_start(config: Config, genesis: Genesis, holds: Collection[str],
                   cache: Path | None = None) -> dict[str, Any] | None:
    """Refuse (TextModelMismatchError) to start a node whose ``[model]`` no longer gives the
    federation's text model; this node's identity (None: it holds no text adapter, or runs
    the consensus workload)."""
    if not _has_text(config, holds):
        return None
    ours = text_identity(config, cache)
    theirs = expected(genesis)
    if theirs is not None:
        _unless_same(ours, theirs, f"refusing to start in {genesis.name!r}",
                     f"Put {SETTINGS} back as they were when this node joined; nothing was "
                     "added to the ledger.")
    return ours


def record_base(ledger: Ledger, ident: dict[str, Any], now_ms: int) -> bool:
    """Append a ``base-model`` entry for the text adapter unless the newest one already names
    this identity (True: one was written).  A change (possible only in a federation whose
    genesis names no text model) is logged: checkpoints from before it are over another base."""
    last = ledger.last(BaseModel.KIND)
    before = stored(last, BaseModel).record if last is not None else None
    if before is not None and before.digest == ident["digest"]:
        return False
    if before is not None:
        log.warning("the text model is not the one this node's earlier %s checkpoints were "
                    "trained over (%s; now %s): they are resumed all the same, since the "
                    "federation names no text model", COMPONENT, before.summary,
                    ident["summary"])
    write(ledger, BaseModel(COMPONENT, ident["digest"], ident["summary"]), now_ms,
          durable=True)
    return True


def base_before(bases: Iterable[Stored[BaseModel]], index: int) -> BaseModel | None:
    """The ``base-model`` entry in force at ledger entry ``index`` (a checkpoint): the newest
    one before it (None: the checkpoint is older than any, so its base is not recorded)."""
    found = None
    for entry in bases:
        if entry.index < index and entry.record.component == COMPONENT:
            found = entry.record
    return found


def check_checkpoint(config: Config, base: BaseModel | None, what: str,
                     cache: Path | None = None) -> None:
    """Refuse (TextModelMismatchError) to load a text adapter checkpointed over ``base`` onto
    the text model ``config`` names when that is another one (``what``: the command)."""
    if base is None:
        return
    ours = text_identity(config, cache)
    if ours["digest"] != base.digest:
        raise TextModelMismatchError(
            f"{what}: the {COMPONENT} checkpoint was trained over {base.summary!r}, and "
            f"[model] now gives {ours['summary']!r}; the adapter means nothing on another "
            f"base. Put {SETTINGS} back as they were when it was trained.")
