"""``p2pfed explain TASK --input FILE``: why the node's current model predicts what it does for
one example, shown to a student, an instructor or an administrator (registered by
:mod:`p2pfed.cli`).

The model and the example are read as ``p2pfed predict`` reads them (the task's pipeline from
its latest clean checkpoints of one round; the input files in the formats of the data files);
:func:`p2pfed.model.explain.explain` gives the attributions, the components' initial values
being rebuilt from the federation id as every member builds them.  The provenance of each
component is that of the checkpointed state the model loaded (its mass vector, read from the
ledger as ``p2pfed provenance`` reads it), members named by peer id.  The views and the HTML
are :mod:`p2pfed.explain_report`'s.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gossip.errors import LocalError
from p2pfed.cli_daemon import HomeOpt, _load

out = Console()


class Role(StrEnum):
    student = "student"
    instructor = "instructor"
    admin = "admin"


def provenance_of(root: Path, components: list[str], round_: int) -> dict[str, dict[str, Any]]:
    """Per component, the provenance of its clean checkpoint of ``round_`` (what the model
    holds): the members' shares by peer id, as ``p2pfed provenance --json`` names them
    (``members``: peer_id, tag, share, mass, self, forgotten), its flags and total mass; a
    component whose checkpoint carries no vector gets ``error`` instead."""
    from p2pfed.cli_provenance import flag_words, members_of, read_ledger, vector_of
    from p2pfed.lineage import tag
    from p2pfed.unlearning import is_clean

    got = read_ledger(root)
    peers = got.peers | set(got.forgotten) | members_of(root, got.memberships)
    if got.me is not None:
        peers.add(got.me)
    names = {tag(p): p for p in peers}
    forgotten = set(got.forgotten)
    found: dict[str, dict[str, Any]] = {}
    for component in components:
        records = [c for c in got.checkpoints if c.component == component
                   and c.round == round_ and is_clean(c.lineage, forgotten)]
        if not records:
            found[component] = {"error": f"no clean checkpoint of round {round_} in the ledger"}
            continue
        last = records[-1]
        try:
            prov = vector_of(last.mass, last.prov_flags, last.lineage)
        except LocalError as exc:
            found[component] = {"error": str(exc)}
            continue
        shares = prov.shares()
        members: list[dict[str, Any]] = []
        for t, mass in zip(prov.tags, prov.mass, strict=True):
            peer = names.get(t, f"unknown:{t.hex()}")
            members.append({"peer_id": peer, "tag": t.hex(), "share": shares.get(t, 0.0),
                            "mass": float(mass), "self": peer == got.me,
                            "forgotten": peer in forgotten})
        members.sort(key=lambda m: (-m["share"], m["peer_id"]))
        word, text = flag_words(prov.flags)
        found[component] = {"source": "checkpoint", "round": last.round, "flags": word,
                            "flags_text": text, "prov_flags": prov.flags,
                            "total_mass": prov.total(), "members": members}
    return found


def _check_writable(path: Path) -> None:
    """Refuse, before any work, an HTML path that cannot be written."""
    parent = path.parent if str(path.parent) else Path()
    if path.is_dir():
        raise LocalError(f"{path}: is a directory; name the HTML file to write")
    if not parent.is_dir():
        raise LocalError(f"{path}: cannot write: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LocalError(f"{path}: cannot write: permission denied")


def explain(
    task: Annotated[str, typer.Argument(help="Task to explain: digits, topic or engagement.")],
    inputs: Annotated[list[Path], typer.Option(
        "--input", help="A file in the format of the data files (one per modality, told apart "
                        "by suffix: .jsonl text, .npz image, .csv activity).")],
    role: Annotated[Role, typer.Option(
        "--for", help="Who reads it: student, instructor or admin.")] = Role.instructor,
    as_json: Annotated[bool, typer.Option("--json", help="Print the role's view as JSON.")]
    = False,
    html_out: Annotated[Path | None, typer.Option(
        "--html", help="Also write a self-contained HTML report (plots embedded) here.")]
    = None,
    home: HomeOpt = None,
    index: Annotated[int, typer.Option(min=0, help="Which example of the file (from 0).")] = 0,
) -> None:
    """Explain the node's current model's prediction for one example: its reasons, by input,
    by component and by contributing member, as a student, an instructor or an admin sees
    them (attributions are not causes)."""
    from p2pfed.model.tasks import LABELS, task_by_name

    spec = task_by_name(task)
    if html_out is not None:
        _check_writable(html_out)
    root, config = _load(home)

    from p2pfed.explain_report import render_html, view_for
    from p2pfed.model.explain import explain as run_explain
    from p2pfed.model.predict import load_current, read_example

    example = read_example(spec.name, inputs, config, index)
    current = load_current(root, config, spec.pipeline())
    exp = run_explain(current.model, spec.name, example)  # (initial: from the federation seed)
    provenance = (provenance_of(root, list(current.components), current.round)
                  if role is Role.admin else {})
    view = view_for(role.value, exp, LABELS.get(spec.name), current.round, provenance)
    if html_out is not None:
        try:
            html_out.write_text(render_html(view, exp), encoding="utf-8")
        except OSError as exc:
            raise LocalError(f"{html_out}: cannot write: {exc.strerror or exc}") from exc
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        _print(view)
    if html_out is not None and not as_json:
        out.print(f"wrote {escape(str(html_out))}")


def _print(view: dict[str, Any]) -> None:
    """The view as text."""
    from p2pfed.explain_report import headline, member_name

    out.print(f"[bold]{escape(headline(view))}[/bold]: {escape(view['certainty'])}")
    for reason in view["reasons"]:
        out.print(f"  • {escape(reason)}")
    if "modalities" in view:
        shares = ", ".join(f"{m} {100 * s:.0f}%" for m, s in view["modalities"].items())
        out.print(f"modalities: {escape(shares)}; baseline p = "
                  f"{view['baseline_probability']:.3f}, delta {view['delta']:.2g}")
        inputs = view["inputs"]
        if "text" in inputs:
            words = ", ".join(f"{w['word']} {w['attribution']:+.3g}"
                              for w in inputs["text"]["top_words"])
            out.print(f"words: {escape(words)}")
        if "activity" in inputs:
            steps = ", ".join(f"step {s['step']} {s['attribution']:+.3g}"
                              for s in inputs["activity"]["top_steps"])
            out.print(f"steps: {escape(steps)}")
        if "image" in inputs:
            image = inputs["image"]
            pixels = ", ".join(f"({p['row']},{p['col']}) {p['attribution']:+.3g}"
                               for p in image["top_pixels"][:4])
            out.print(f"image: strongest in the {escape(str(image['region']))}; "
                      f"pixels {escape(pixels)}")
    for comp in view.get("components", []):
        prov = comp["provenance"]
        line = f"[bold]{escape(comp['component'])}[/bold]: attribution {comp['attribution']:+.4f}"
        if "error" in prov:
            out.print(f"{line}; provenance: {escape(str(prov['error']))}")
            continue
        out.print(f"{line}; state of round {prov['round']}, {escape(prov['flags_text'])}")
        table = Table("member", "share", "mass")
        for m in prov["members"]:
            table.add_row(escape(member_name(m)), f"{100 * m['share']:.2f}%",
                          f"{m['mass']:.6g}")
        out.print(table)
    out.print(f"[dim]{escape(view['caveat'])}[/dim]")


def register(app: typer.Typer) -> None:
    app.command()(explain)
