"""CLI commands of a school's model: export (registered by :mod:`p2pfed.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gossip.errors import LocalError
from gossip.identity import load_identity
from p2pfed.cli_daemon import HomeOpt, _load
from p2pfed.home import KEY_FILE, LEDGER_FILE

out = Console()
err = Console(stderr=True)


def export(
    component: Annotated[str, typer.Argument(help="Component to export, e.g. encoder.text.lora.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into (created).")],
    home: HomeOpt = None,
) -> None:
    """Write a component's latest checkpoint: an adapter as a peft adapter, else safetensors."""
    from p2pfed.blobs import BlobStore, read_state
    from p2pfed.fedstore import FederationStore
    from p2pfed.home import BLOBS_DIR
    from p2pfed.journal import Checkpoint, Forget, read
    from p2pfed.ledger import Ledger
    from p2pfed.unlearning import latest_clean_checkpoints

    root, config = _load(home)
    identity = load_identity(root / KEY_FILE)
    with Ledger.open(root / LEDGER_FILE, identity, create=False) as ledger:
        forgotten = {f.record.target for f in read(ledger.entries(Forget.KIND), Forget)}
        checkpoints = list(ledger.entries(Checkpoint.KIND))
        found = latest_clean_checkpoints(checkpoints, forgotten).get(component)
        if found is None:
            held = sorted({c.record.component for c in read(checkpoints, Checkpoint)})
            raise LocalError(f"{root} has no checkpoint of {component!r} "
                             f"(checkpointed: {', '.join(held) or 'nothing yet'})")
        federation_id = FederationStore(root).view(ledger).federation_id
    flat = read_state(BlobStore(root / BLOBS_DIR), found[1].digest).clone()
    if config.model.kind == "m3t":
        from p2pfed.model.export import export_component
        from p2pfed.model.local import build_model
        from p2pfed.model.tasks import task_by_name
        from p2pfed.model.train import LocalTrainer

        # a head is built with its pipeline (that is what holding it means); only it is written
        parts = (task_by_name(component.removeprefix("head.")).pipeline()
                 if component.startswith("head.") else [component])
        model = build_model(config, parts, federation_id)

        LocalTrainer(model, {}, node_seed=0).flats[component].load_(flat)
        written = export_component(model, component, out_dir)
    else:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{component}.safetensors"
        save_file({"weight": flat.contiguous()}, str(path), metadata={"component": component})
        written = [path]
    out.print(f"exported {component} (round {found[1].round}) to {out_dir}: "
              f"{', '.join(p.name for p in written)}")


def register(app: typer.Typer) -> None:
    app.command()(export)
