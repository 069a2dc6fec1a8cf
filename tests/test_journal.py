"""The typed ledger journal: every kind round-trips, old ledgers still read and restore, and a
body that is not what its kind says is named, never half-read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.identity import load_identity
from p2pfed import exitcodes, journal, kinds
from p2pfed.cli import main
from p2pfed.journal import (
    SCHEMA,
    CatalogueApplied,
    CatchUp,
    Checkpoint,
    Compaction,
    Contribution,
    Forget,
    ForgetFailed,
    ForgetRecord,
    JoinRequest,
    LocalUpdate,
    Membership,
    Mix,
    MixInputRef,
    PrivacySpent,
    Record,
    Rerun,
    SchemaError,
    Unlearned,
)
from p2pfed.ledger import Ledger, LedgerEntry, read_entries, verify_ledger
from p2pfed.lineage import Lineage
from p2pfed.node import Train
from p2pfed.unlearning import check_unlearning
from tests.fixtures.make_ledger_v0 import dp_node, restored, sim_node

FIXTURE = Path(__file__).parent / "fixtures" / "ledger_v0"
D = bytes(range(32))
ck = Checkpoint("backbone", 3, D, Lineage.of(["a", "b"]), {"radius": 0.5})
SAMPLES: list[Record] = [
    LocalUpdate("backbone", 2, D, True, D, Lineage.of(["a"]), 1,
                PrivacySpent(3, 1.5, 1e-5, 2.0, 1.0, True)),
    LocalUpdate("head.grade", 0, D, False, b"", Lineage(), 0),
    Contribution("peer", "backbone", 1, D, 0.25, Lineage.of(["peer"]), 0.1, kept=True),
    Mix("backbone", 4, 0.5, (MixInputRef("p", 0.25, D), MixInputRef("q", 0.25, D)), ("r",),
        Lineage.of(["p", "q"]), 1, "clipped", {"radius": 1.5, "clipped": ["q"]}),
    ck,
    CatchUp("backbone", 2, 9),
    Membership(b"signed"), JoinRequest(b"join"), ForgetRecord(b"forget"),
    Forget("t", "exact", 1, 0,
           {"backbone": Rerun(4, D, Lineage.of(["a"]), {"radius": 0.0}, ck)},
           ("backbone",), ("head.grade",)),
    Unlearned("t", "fast", 2, ("backbone",), (), 0),
    ForgetFailed("t", "exact", ("backbone",)),
    Compaction(((3, 6, D), (9, 10, D)), 4, D, 200, {"backbone": 40}, 12),
    CatalogueApplied(2, D, {"essay": {"phase": "active", "modalities": ["text"], "classes": 5,
                                      "components": ["head.essay"], "data_version": "v1"}},
                     ("task-retire ghost (signed at 5): no task ghost",), "backbone", 3),
]


def _entry(record_or_body: Record | dict[str, Any], kind: str = "", index: int = 7) -> LedgerEntry:
    if isinstance(record_or_body, Record):
        kind, body = record_or_body.KIND, record_or_body.to_body()
    else:
        body = record_or_body
    return LedgerEntry(index, kind, 0, body, b"", b"", b"")


def test_every_kind_has_a_record_that_round_trips_with_its_version() -> None:
    assert {type(r).KIND for r in SAMPLES} == kinds.ALL
    for record in SAMPLES:
        body = record.to_body()
        assert body["v"] == SCHEMA
        assert journal.decode(_entry(record)) == record


def test_a_bad_body_names_its_entry_and_field_and_a_newer_one_asks_for_an_upgrade() -> None:
    body = SAMPLES[3].to_body()
    del body["round"]
    with pytest.raises(SchemaError, match=r"entry 7 \(mix\): no field 'round'"):
        journal.decode(_entry(body, kinds.MIX))
    wrong = {**ck.to_body(), "digest": "not bytes"}
    with pytest.raises(SchemaError, match="'digest' is a str, not a bytes"):
        journal.decode(_entry(wrong, kinds.CHECKPOINT))
    newer = {**ck.to_body(), "v": SCHEMA + 1}
    with pytest.raises(SchemaError, match="upgrade p2pfed"):
        journal.decode(_entry(newer, kinds.CHECKPOINT))
    with pytest.raises(SchemaError, match="unknown kind 'gossip'"):
        journal.decode(_entry({}, "gossip"))
    mix = SAMPLES[3].to_body()
    mix["inputs"] = [["p", 0.5]]
    assert journal.schema_problems([_entry(mix, kinds.MIX), _entry(ck)]) == [
        "entry 7 (mix): field 'inputs' holds an item other than [peer, weight, digest]"]


# ---------------------------------------------------------------- ledgers written before "v"
def _copy(tmp_path: Path) -> Path:
    """The fixture, copied (opening a ledger may write its verified mark)."""
    shutil.copytree(FIXTURE, tmp_path / "v0")
    for key in (tmp_path / "v0").glob("*/identity.key"):
        key.chmod(0o600)  # (git keeps no file modes: a fresh clone has it readable by all)
    return tmp_path / "v0"


def _tagged(body: Any) -> Any:
    """``body`` with every lineage (a list of peer ids before schema 2) as packed tags."""
    if isinstance(body, dict):
        return {k: Lineage.decode(v).packed if k == "lineage" else _tagged(v)
                for k, v in body.items()}
    if isinstance(body, list):
        return [_tagged(v) for v in body]
    return body


def test_ledgers_written_before_the_schema_version_verify_read_and_restore(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(tmp_path)
    expected = json.loads((FIXTURE / "expected.json").read_text())
    for sub in ("sim", "dp"):
        path = root / sub / "ledger.sqlite3"
        assert verify_ledger(path, load_identity(root / sub / "identity.key").public_key).ok
        entries = read_entries(path)
        assert journal.schema_problems(entries) == []
        for entry in entries:  # every old body reads as a record and writes back the same,
            body = journal.decode(entry).to_body()  # its members' peer ids as lineage tags
            assert body.pop("v") == SCHEMA and body == _tagged(entry.body)
        assert main(["ledger", "verify", "--home", str(root / sub), "--json"]) == exitcodes.OK
        assert json.loads(capsys.readouterr().out)["schema_problems"] == []
    sim = read_entries(root / "sim" / "ledger.sqlite3")
    assert {e.kind for e in sim} >= {kinds.FORGET, kinds.UNLEARNED, kinds.MIX, kinds.CHECKPOINT}
    assert check_unlearning(sim) == []
    assert restored(sim_node(root / "sim", {"backbone": 4, "head.grade": 4})) == expected["sim"]
    dp = dp_node(root / "dp", 2)
    assert restored(dp) == expected["dp"]
    # and the restored node goes on, writing versioned entries after the old ones
    actions = dp.set_round_limit(4, 0) + dp.start(0)
    while actions:
        action = actions.pop(0)
        if isinstance(action, Train):
            dp.components["encoder.text"].flat.add_(0.25)
            actions += dp.local_update_done(action.component, action.round, 0)
    new = [e for e in dp.ledger.entries() if e.body.get("v") == SCHEMA]
    assert {e.kind for e in new} == {kinds.LOCAL_UPDATE, kinds.MIX, kinds.CHECKPOINT}
    update = journal.stored(next(e for e in new if e.kind == kinds.LOCAL_UPDATE), LocalUpdate)
    assert update.record.round == 3 and update.record.dp is not None
    assert update.record.dp.releases == 4  # the three releases before the restart count
    assert verify_ledger(root / "dp" / "ledger.sqlite3").ok


def test_ledger_verify_names_an_entry_whose_body_is_not_its_kind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(tmp_path)
    ident = load_identity(root / "sim" / "identity.key")
    with Ledger.open(root / "sim" / "ledger.sqlite3", ident) as ledger:
        index = ledger.append(kinds.MIX, {"component": "backbone"}, timestamp_ms=0).index
    assert main(["ledger", "verify", "--home", str(root / "sim"), "--json"]) == \
        exitcodes.LEDGER_BROKEN
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["first_bad_index"] is None
    assert result["schema_problems"] == [f"entry {index} (mix): no field 'inputs'"]


def test_a_checkpoint_of_an_untrained_component_is_the_payload_it_announces_next() -> None:
    from gossip.identity import Identity
    from p2pfed.blobs import BlobStore
    from p2pfed.components import FlatLayout
    from p2pfed.node._journal import Journal

    blobs = BlobStore(None)
    port = Journal(Ledger.open(None, Identity.from_seed(bytes(32))), blobs, 1 << 30)
    layout = FlatLayout.from_shapes({"w": (1000,)})
    flat = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    ck = port.put_checkpoint("backbone", 4, flat, layout)
    dig, _ = port.put_state("backbone", 4, flat, layout)
    assert dig == ck and len(blobs) == 1  # one blob, and in memory one object
    assert port.payload(dig) is blobs.get(dig)
    assert torch.equal(port.tensor(ck), flat)
    # a state changed since (trained, or noised for privacy) is a payload of its own
    ck5 = port.put_checkpoint("backbone", 5, flat, layout)
    assert port.put_state("backbone", 5, flat + 1, layout)[0] != ck5 and len(blobs) == 3
    # bit for bit: -0.0 is not 0.0
    zero = torch.zeros(1000)
    ck6 = port.put_checkpoint("backbone", 6, zero, layout)
    assert port.put_state("backbone", 6, -zero, layout)[0] != ck6
    # a checkpoint written before schema 2 (safetensors) reads the same
    old = blobs.put_tensors({"flat": flat}, {"component": "backbone", "round": "1"})
    assert torch.equal(port.tensor(old), flat)
