"""CLI commands of a school's model: export, predict and example data (registered by
:mod:`p2pfed.cli`)."""

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
    component: Annotated[str, typer.Argument(help="Component to export, e.g. encoder.text.lora; "
                                             "a head exports its whole pipeline.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into (created).")],
    home: HomeOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write into a folder that has files, or over a file.")] = False,
) -> None:
    """Write a component's latest checkpoint: an adapter as a peft adapter, else safetensors.

    A head comes with every component of its pipeline, all from one round (the latest at
    which each has a checkpoint free of forgotten members), and a README saying how to load
    them."""
    root, config = _load(home)
    if config.model.kind == "m3t":
        from p2pfed.model.export import export_parts, prepare_out
        from p2pfed.model.predict import load_current, parts_of

        parts = parts_of(component)
        if not force:
            prepare_out(out_dir)  # before the model is built: a refusal is quick
        current = load_current(root, config, parts)
        written = export_parts(current.model, parts, out_dir, current.round, force=force,
                               base=current.base)
        round_ = current.round
    else:
        written, round_ = _export_flat(root, component, out_dir, force)
    out.print(f"exported {component} (round {round_}) to {out_dir}: "
              f"{', '.join(p.name for p in written)}")


def _export_flat(root: Path, component: str, out_dir: Path, force: bool) -> tuple[list[Path], int]:
    """A consensus component's latest clean checkpoint, as ``<component>.safetensors``."""
    from safetensors.torch import save_file

    from p2pfed.blobs import BlobStore, read_state
    from p2pfed.home import BLOBS_DIR
    from p2pfed.journal import Checkpoint, Forget, read
    from p2pfed.ledger import Ledger
    from p2pfed.model.export import prepare_out
    from p2pfed.unlearning import latest_clean_checkpoints

    if not force:
        prepare_out(out_dir)
    identity = load_identity(root / KEY_FILE)
    with Ledger.open(root / LEDGER_FILE, identity, create=False) as ledger:
        forgotten = {f.record.target for f in read(ledger.entries(Forget.KIND), Forget)}
        checkpoints = list(ledger.entries(Checkpoint.KIND))
        found = latest_clean_checkpoints(checkpoints, forgotten).get(component)
        if found is None:
            held = sorted({c.record.component for c in read(checkpoints, Checkpoint)})
            raise LocalError(f"{root} has no checkpoint of {component!r} "
                             f"(checkpointed: {', '.join(held) or 'nothing yet'})")
    flat = read_state(BlobStore(root / BLOBS_DIR), found[1].digest).clone()
    prepare_out(out_dir, force=force)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{component}.safetensors"
    save_file({"weight": flat.contiguous()}, str(path), metadata={"component": component})
    return [path], found[1].round


def predict(
    task: Annotated[str, typer.Argument(help="Task to predict: digits, topic or engagement.")],
    inputs: Annotated[list[Path], typer.Option(
        "--input", help="A file in the format of the data files (one per modality, told apart "
                        "by suffix: .jsonl text, .npz image, .csv activity).")],
    home: HomeOpt = None,
    index: Annotated[int, typer.Option(min=0, help="Which example of the file (from 0).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run the node's current model (its latest clean checkpoints) on one example."""
    from p2pfed.model.predict import load_current, read_example
    from p2pfed.model.predict import predict as run_prediction
    from p2pfed.model.tasks import task_by_name

    root, config = _load(home)
    spec = task_by_name(task)
    example = read_example(spec.name, inputs, config, index)
    current = load_current(root, config, spec.pipeline())
    result = run_prediction(current, spec.name, example)
    if as_json:
        out.print_json(data=result.as_dict())
        return
    out.print(f"{spec.name}: [bold]{result.name}[/bold] (class {result.label}, "
              f"p = {result.probabilities[result.label][1]:.3f}; model of round {result.round})")
    for i, (name, p) in sorted(enumerate(result.probabilities), key=lambda x: -x[1][1]):
        out.print(f"  {i:>2}  {name:<12} {p:.3f}")


def data_sample(
    task: Annotated[str, typer.Argument(help="Task: digits, topic or engagement.")],
    out_dir: Annotated[Path, typer.Argument(help="New folder for the files (created).")],
    count: Annotated[int, typer.Option(min=1, help="Examples to write.")] = 60,
    seed: Annotated[int, typer.Option(min=0, help="Same seed, same files.")] = 0,
) -> None:
    """Write labelled example files for TASK in the formats of the data files, and a README
    with the label meanings and the p2pfed.toml lines that use them."""
    from p2pfed.model.samples import write_samples

    written = write_samples(task, out_dir, count, seed)
    out.print(f"wrote {count} {task} examples to {out_dir}: "
              f"{', '.join(p.name for p in written)}")


data_app = typer.Typer(help="Example data for the model's tasks.", no_args_is_help=True)
data_app.command("sample")(data_sample)


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(predict)
    app.add_typer(data_app, name="data")
