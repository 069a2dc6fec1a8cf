"""The ledger's schema: one typed record per entry kind, and reading entries back as records.

The ledger (:mod:`p2pfed.ledger`) chains and signs bodies without reading them; this module is
the one place that says what a body holds.  Every record type names its kind
(:mod:`p2pfed.kinds`), encodes itself (:meth:`Record.to_body`) and decodes and checks a body
(:meth:`Record.from_body`).  Writers hand the journal records, readers get records back:
:func:`decode` for one entry, :func:`read` for the entries of one kind, :func:`schema_problems`
for ``p2pfed ledger verify``.

Versions: each body written now carries ``"v": SCHEMA``.  Bodies without ``"v"`` were written
before the schema had a number (version 0, commit 67c3a79 and earlier); they hold the same
fields and read the same way (``tests/fixtures/ledger_v0`` holds two such ledgers).  A body with
a higher version than this code knows is refused with a clear error, never half-read.  Schema 3
added optional provenance fields (``credit``; ``mass``, ``prov_flags``, ``share_weights``),
written only when set: without them a body holds what schema 2 wrote.  It is a new version
because schema 2 code would read them into a mix's audit or a checkpoint's memory.  A
``local-update``'s optional ``make_up`` (the make-up factor), ``objective`` and ``tilt`` (the
local objective) came later in schema 3: code that does not know them reads the rest of the
body as before.

Free of torch: the CLI reads ledgers through it.  The records are in ``_rounds`` (a node's
rounds) and ``_other`` (membership, the task catalogue, unlearning, the ledger's own); ``_base``
holds what they share.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from p2pfed import kinds
from p2pfed.journal._base import SCHEMA, R, Record, SchemaError, Stored
from p2pfed.journal._other import (
    BaseModel,
    CatalogueApplied,
    Compaction,
    Forget,
    ForgetFailed,
    ForgetRecord,
    JoinRequest,
    Membership,
    Opened,
    Rerun,
    Unlearned,
)
from p2pfed.journal._rounds import (
    MAX_MAKE_UP,
    CatchUp,
    Checkpoint,
    Contribution,
    LocalUpdate,
    Mix,
    MixInputRef,
    PrivacySpent,
)
from p2pfed.ledger import Ledger, LedgerEntry
from p2pfed.ledger_verify import OPEN

__all__ = [
    "MAX_MAKE_UP", "SCHEMA", "TYPES", "BaseModel", "CatalogueApplied", "CatchUp", "Checkpoint",
    "Compaction", "Contribution", "Forget", "ForgetFailed", "ForgetRecord", "JoinRequest",
    "LocalUpdate", "Membership", "Mix", "MixInputRef", "Opened", "PrivacySpent", "R", "Record",
    "Rerun",
    "SchemaError", "Stored", "Unlearned", "decode", "read", "schema_problems", "stored", "write",
]

TYPES: dict[str, type[Record]] = {t.KIND: t for t in (
    LocalUpdate, Contribution, Mix, Checkpoint, CatchUp, Membership, JoinRequest, ForgetRecord,
    Forget, Unlearned, ForgetFailed, CatalogueApplied, Opened, Compaction, BaseModel)}
assert set(TYPES) == kinds.ALL | {OPEN}



# ---------------------------------------------------------------- writing and reading
def write(ledger: Ledger, record: Record, now_ms: int, *, durable: bool = False) -> LedgerEntry:
    """Append ``record`` to ``ledger`` (``durable``: on disk when this returns)."""
    return ledger.append(record.KIND, record.to_body(), timestamp_ms=now_ms, durable=durable)


def decode(entry: LedgerEntry) -> Record:
    """The record ``entry`` holds (:class:`SchemaError` naming the entry when it holds none)."""
    kind = TYPES.get(entry.kind)
    if kind is None:
        raise SchemaError(f"entry {entry.index}: unknown kind {entry.kind!r}")
    try:
        return kind.from_body(entry.body)
    except SchemaError as exc:
        raise SchemaError(f"entry {entry.index} ({entry.kind}): {exc}") from None


def stored(entry: LedgerEntry, kind: type[R]) -> Stored[R]:
    """``entry`` (of ``kind``) as a :class:`Stored` record."""
    record = decode(entry)
    if not isinstance(record, kind):
        raise SchemaError(f"entry {entry.index} is a {entry.kind}, not a {kind.KIND}")
    return Stored(entry.index, entry.timestamp_ms, record)


def read(entries: Iterable[LedgerEntry], kind: type[R]) -> Iterator[Stored[R]]:
    """The entries of ``kind`` among ``entries``, in their order, as records."""
    for entry in entries:
        if entry.kind == kind.KIND:
            yield stored(entry, kind)


def schema_problems(entries: Iterable[LedgerEntry]) -> list[str]:
    """Entries whose body is not a record of their kind (``p2pfed ledger verify``)."""
    problems = []
    for entry in entries:
        try:
            decode(entry)
        except SchemaError as exc:
            problems.append(str(exc))
    return problems
