"""The kinds of ledger entry, in one place (no imports: every layer may read it).

A node's ledger is its database; each entry has one of these kinds.  Readers and writers name
kinds through these constants, never as bare strings.
"""

from __future__ import annotations

#: the node's own state before it is announced (durable: written before the announcement)
LOCAL_UPDATE = "local-update"
#: a neighbour's update, fetched, checked and kept for the round
CONTRIBUTION = "contribution"
#: one round's mix: weights, inputs, what was missing, the rule and its audit
MIX = "mix"
#: a component's state stored as a blob (the start of the round it names)
CHECKPOINT = "checkpoint"
#: a jump to a neighbour's later round
CATCH_UP = "catch-up"
#: a signed membership record (genesis aside): a join, an admission or a leave; or a record
#: of the task catalogue (an admin's task-add, task-retire or task-data)
MEMBERSHIP = "membership"
#: the newcomer's own join, kept until a member admits it
JOIN_REQUEST = "join-request"
#: a signed request to forget a member, as received or made
FORGET_RECORD = "forget-record"
#: a forget request applied: what it rolled back (durable, before any rollback)
FORGET = "forget"
#: ... and its re-run finished
UNLEARNED = "unlearned"
#: a forget request that could not be applied (no clean checkpoint)
FORGET_FAILED = "forget-failed"

#: a new version of the task catalogue, applied at a round boundary
CATALOGUE = "catalogue"

#: entries pruned to bound storage, accounted for (see p2pfed.ledger_verify)
COMPACTION = "compaction"

#: the frozen base model a component's adapter applies to (its identity), written at a start
#: that finds it new: the checkpoints after it were made over that base
BASE_MODEL = "base-model"

ALL = frozenset({LOCAL_UPDATE, CONTRIBUTION, MIX, CHECKPOINT, CATCH_UP, MEMBERSHIP, JOIN_REQUEST,
                 FORGET_RECORD, FORGET, UNLEARNED, FORGET_FAILED, CATALOGUE, COMPACTION,
                 BASE_MODEL})
