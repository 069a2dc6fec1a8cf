"""The typed ledger journal: every kind round-trips, old ledgers still read and restore, and a
body that is not what its kind says is named, never half-read."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.identity import load_identity
from p2pfed import exitcodes, journal, kinds
from p2pfed.cli import main
from p2pfed.journal import (
    SCHEMA,
    BaseModel,
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
    BaseModel("encoder.text.lora", "ab" * 32, "tiny: bert encoder, 2 layers of 32"),
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


# ---------------------------------------------------------------- provenance (schema 3)
PROV_KEYS = {"credit", "mass", "prov_flags", "share_weights"}
AB = Lineage.of(["a", "b"])
M2 = struct.pack("<2d", 0.75, 0.25)  # a mass vector aligned with AB
ck_prov = Checkpoint("backbone", 3, D, AB, {"radius": 0.5}, M2, 1)
PROV_SAMPLES: list[Record] = [
    LocalUpdate("backbone", 2, D, True, D, AB, 1, credit=1.25),
    LocalUpdate("backbone", 2, D, True, D, AB, 1, PrivacySpent(3, 1.5, 1e-5, 2.0, 1.0, True),
                credit=0.0),
    Contribution("peer", "backbone", 1, D, 0.25, AB, 0.1, age=2, mass=M2, prov_flags=0),
    Mix("backbone", 4, 0.5, (MixInputRef("p", 0.25, D), MixInputRef("q", 0.25, D)), ("r",), AB,
        1, "trimmed", {"radius": 1.5}, M2, 2, (0.25, (0.5, 0.25))),
    Mix("backbone", 4, 0.5, (MixInputRef("p", 0.5, D),), (), AB, 1, "mh", {}, M2, 3),
    ck_prov,
    Forget("t", "exact", 1, 0,
           {"backbone": Rerun(4, D, AB, {"radius": 0.0}, ck_prov, M2, 1)},
           ("backbone",), ("head.grade",)),
]


def test_provenance_fields_round_trip_and_are_written_only_when_set() -> None:
    for record in PROV_SAMPLES:
        assert journal.decode(_entry(record)) == record
    for record in SAMPLES:  # none set: none written, and they read back as None
        assert not PROV_KEYS & set(record.to_body())
        back = journal.decode(_entry(record))
        assert all(getattr(back, k, None) is None for k in PROV_KEYS)
    update, _, contribution, mix, _, ck3, forget = (r.to_body() for r in PROV_SAMPLES)
    assert update["credit"] == 1.25 and update["v"] == SCHEMA == 3
    assert contribution["mass"] == M2 and contribution["prov_flags"] == 0
    assert mix["share_weights"] == [0.25, [0.5, 0.25]] and mix["prov_flags"] == 2
    assert (ck3["mass"], ck3["prov_flags"]) == (M2, 1)
    rerun = forget["components"]["backbone"]
    assert (rerun["mass"], rerun["keep"]["mass"]) == (M2, M2)
    # an unlearning rollback restores the vector with the checkpoint
    stored_forget = journal.decode(_entry(PROV_SAMPLES[-1]))
    assert isinstance(stored_forget, Forget)
    back = stored_forget.components["backbone"].rollback("backbone", 0)
    assert (back.mass, back.prov_flags, back.memory) == (M2, 1, {"radius": 0.0})
    assert Rerun(4, D, AB).rollback("backbone", 0).mass is None
    # share weights are the rule's, kept with or without a vector (a clipped self weight of
    # 1 - the sum of the others may round just below 0)
    shares = Mix("backbone", 4, 0.5, (MixInputRef("p", 0.25, D),), (), AB, 1, "clipped", {},
                 share_weights=(-2.0 ** -53, (1.0,)))
    assert journal.decode(_entry(shares)) == shares and "mass" not in shares.to_body()
    # an int credit (msgpack keeps 1.0 a float, but a hand-made body may not) reads as float
    assert journal.decode(_entry({**update, "credit": 2}, kinds.LOCAL_UPDATE)) == \
        LocalUpdate("backbone", 2, D, True, D, AB, 1, credit=2.0)


def test_provenance_fields_never_become_a_rules_audit_or_memory() -> None:
    mix = journal.decode(_entry(PROV_SAMPLES[3]))
    assert isinstance(mix, Mix) and dict(mix.audit) == {"radius": 1.5}
    ck3 = journal.decode(_entry(ck_prov))
    assert isinstance(ck3, Checkpoint) and dict(ck3.memory) == {"radius": 0.5}
    forget = journal.decode(_entry(PROV_SAMPLES[-1]))
    assert isinstance(forget, Forget)
    rerun = forget.components["backbone"]
    assert dict(rerun.memory) == {"radius": 0.0} and rerun.keep is not None
    assert dict(rerun.keep.memory) == {"radius": 0.5}
    # nor can a rule's audit or memory take their names (they would not read back)
    with pytest.raises(SchemaError, match=r"audit uses the record's own field names \['mass'\]"):
        Mix("backbone", 4, 1.0, (), (), AB, 1, "mh", {"mass": M2})
    with pytest.raises(SchemaError, match=r"memory uses the record's own field names"):
        Checkpoint("backbone", 3, D, AB, {"prov_flags": 1.0})
    with pytest.raises(SchemaError, match=r"memory uses the record's own field names"):
        Rerun(4, D, AB, {"prov_flags": 1.0})


_BAD_PROV: list[tuple[int, dict[str, Any], str]] = [
    (0, {"credit": math.nan}, r"field 'credit' is nan, not a finite number >= 0"),
    (0, {"credit": math.inf}, r"field 'credit' is inf, not a finite number >= 0"),
    (0, {"credit": -0.5}, r"field 'credit' is -0.5, not a finite number >= 0"),
    (0, {"credit": "1.0"}, r"field 'credit' is a str, not a float"),
    (0, {"credit": True}, r"field 'credit' is a bool, not a float"),
    (2, {"mass": M2[:12]}, r"field 'mass' holds 12 bytes, not a whole number of float64s"),
    (2, {"mass": M2[:8]}, r"field 'mass' holds 1 values for a lineage of 2 members"),
    (2, {"mass": M2 + M2}, r"field 'mass' holds 4 values for a lineage of 2 members"),
    (2, {"mass": [0.75, 0.25]}, r"field 'mass' is a list, not a bytes"),
    (2, {"mass": struct.pack("<2d", 0.5, -0.25)}, r"'mass' holds a value that is negative or"),
    (2, {"mass": struct.pack("<2d", math.nan, 0.0)}, r"'mass' holds a value that is negative or"),
    (2, {"prov_flags": 4}, r"field 'prov_flags' is 4, not an int in 0..3"),
    (2, {"prov_flags": -1}, r"field 'prov_flags' is -1, not an int in 0..3"),
    (2, {"prov_flags": 1.0}, r"field 'prov_flags' is a float, not a int"),
    (2, {"prov_flags": True}, r"field 'prov_flags' is a bool, not a int"),
    (3, {"prov_flags": 4}, r"field 'prov_flags' is 4, not an int in 0..3"),
    (3, {"mass": b"\0" * 24}, r"field 'mass' holds 3 values for a lineage of 2 members"),
    (3, {"share_weights": [0.25, [0.5]]}, r"'share_weights' holds 1 input weights for 2 inputs"),
    (3, {"share_weights": [0.25, [0.5, math.nan]]}, r"'share_weights' holds a weight that is not"),
    (3, {"share_weights": [math.inf, [0.5, 0.5]]}, r"'share_weights' holds a weight that is not"),
    (3, {"share_weights": [0.25, 0.5, 0.25]}, r"'share_weights' is not \[self weight, \[input"),
    (3, {"share_weights": [0.25, ["p", 0.5]]}, r"'share_weights' is not \[self weight, \[input"),
    (3, {"share_weights": "even"}, r"field 'share_weights' is a str, not a list/tuple"),
    (5, {"mass": M2[:8]}, r"field 'mass' holds 1 values for a lineage of 2 members"),
    (5, {"prov_flags": 7}, r"field 'prov_flags' is 7, not an int in 0..3"),
    (5, {"mass": None}, r"fields 'mass' and 'prov_flags' come together"),
    (5, {"prov_flags": None}, r"fields 'mass' and 'prov_flags' come together"),
]


@pytest.mark.parametrize(("sample", "change", "message"), _BAD_PROV)
def test_a_malformed_provenance_field_is_refused_by_name(
        sample: int, change: dict[str, Any], message: str) -> None:
    record = PROV_SAMPLES[sample]
    body = {k: v for k, v in {**record.to_body(), **change}.items() if v is not None}
    with pytest.raises(SchemaError, match=rf"^entry 7 \({record.KIND}\): (field )?{message}"):
        journal.decode(_entry(body, record.KIND))


def test_a_malformed_provenance_field_in_a_forget_is_refused() -> None:
    body = PROV_SAMPLES[-1].to_body()
    body["components"]["backbone"]["prov_flags"] = 4
    with pytest.raises(SchemaError, match=r"\(forget\): field 'prov_flags' is 4, not an int"):
        journal.decode(_entry(body, kinds.FORGET))
    body = PROV_SAMPLES[-1].to_body()
    body["components"]["backbone"]["keep"]["mass"] = b"\0" * 8
    with pytest.raises(SchemaError, match=r"\(forget\): field 'mass' holds 1 values"):
        journal.decode(_entry(body, kinds.FORGET))
    # and a record with one cannot be made, so it is never written
    with pytest.raises(SchemaError, match=r"field 'credit' is -1.0"):
        LocalUpdate("backbone", 2, D, True, D, AB, 1, credit=-1.0)
    with pytest.raises(SchemaError, match=r"field 'mass' holds 2 values for a lineage of 0"):
        Checkpoint("backbone", 3, D, Lineage(), {}, M2, 0)


def test_a_schema_2_body_reads_and_writes_back_the_same_fields() -> None:
    """What schema 2 wrote is what schema 3 writes without provenance: same fields, same
    values, only ``v`` moves on (as it did from schema 0 to 2)."""
    for record in SAMPLES:
        old = {**record.to_body(), "v": 2}
        back = journal.decode(_entry(old, record.KIND))
        assert back == record
        assert back.to_body() == {**old, "v": SCHEMA}


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
            record = journal.decode(entry)  # its members' peer ids as lineage tags
            body = record.to_body()
            assert body.pop("v") == SCHEMA and body == _tagged(entry.body)
            # with no provenance: none read into a rule's audit or memory, none written
            assert not PROV_KEYS & set(body)
            assert all(getattr(record, k, None) is None for k in PROV_KEYS)
            assert not PROV_KEYS & set(getattr(record, "audit", getattr(record, "memory", {})))
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
