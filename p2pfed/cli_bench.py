"""``p2pfed bench``: the measurements, printed as tables and written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gossip.errors import ConfigError, LocalError

out = Console()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON (a clear error, not a traceback, when it cannot be written)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise LocalError(f"cannot write {path}: {exc.strerror}") from exc


def bench(
    json_path: Annotated[Path | None, typer.Option("--json", help="Write results here.")] = None,
    quick: Annotated[
        bool, typer.Option(help="Small sizes (a smoke run, not a measurement).")
    ] = False,
    sim: Annotated[
        bool, typer.Option("--sim", help="Only the simulator at scale (see below).")
    ] = False,
    federation: Annotated[
        bool, typer.Option("--federation", help="Only rounds between real daemons (see below).")
    ] = False,
    model: Annotated[str | None, typer.Option(
        metavar="MODEL", help="Only a round on this text model (minilm, or a local Hugging Face "
        "model directory; see below).")] = None,
    device: Annotated[str, typer.Option(
        help="With --model: cpu, cuda[:N] or auto (CUDA where torch sees one).")] = "cpu",
    precision: Annotated[str, typer.Option(
        help="With --model: fp32, or bf16 (the forward pass under bfloat16 autocast; the "
        "adapter stays float32).")] = "fp32",
    neighbours: Annotated[int, typer.Option(
        min=1, max=1000, help="With --model: neighbours that fetch the adapter each round "
        "(the config's overlay degree).")] = 4,
    rate_mb_s: Annotated[float | None, typer.Option(
        min=0.001, help="With --model: the member's uplink in MB/s (default: measured over the "
        "bulk channel on 127.0.0.1: the transport's own cost, no real link's).")] = None,
    round_steps: Annotated[int, typer.Option(
        min=1, max=10_000, help="With --model: optimiser steps per round (the config's "
        "model steps).")] = 8,
    adapter_mode: Annotated[str, typer.Option(
        help="With --model: frozen-a (B is trained and sent) or ab (A too).")] = "frozen-a",
) -> None:
    """Measure memory bandwidth, mixing, payload codec, digests, signatures, the network and
    the daemon at a long ledger.

    With --sim, only the simulator: consensus on a random 4-regular graph of 100 and 1,000
    nodes, 20 rounds, one component of 100,000 parameters (16 and 24 nodes, 4 rounds, 1,000
    parameters with --quick), each size in its own process: ``sim_node_round_ms`` (CPU of the
    run per node-round) and ``sim_peak_rss_mb`` (that process's peak RSS), the largest size's
    at the top and every size's under ``sim_sizes``.

    With --federation, only rounds between four daemons on 127.0.0.1 averaging one component
    of 100,000 and of 10,000,000 parameters (10,000 with --quick), rounds back to back:
    ``round_s_100k``, ``round_s_10m`` (median gap between a daemon's mixes, from its ledger)
    and ``round_cpu_s_*`` (CPU of the four processes per round).

    The network part streams a 64 MB payload over libp2p (TCP, Noise, Yamux) between two
    processes on 127.0.0.1, and the same bytes over a plain TCP socket, in the same run.  The
    ledger part builds a ledger of 100,000 entries (2,000 with --quick) and starts the daemon
    on it: start-up to READY, CPU of one status, and a full verification for comparison.
    ``cli_start_s`` is the CPU of ``python -m p2pfed --help`` (median of 5 runs; 3 with --quick).

    With --model, only the text model a member would train (LoRA on its top layer and the topic
    head, on --device): ``train_step_s`` (median of 5 optimiser steps on 16 texts of 32 tokens,
    ``batch_shape``), ``adapter_bytes`` (the float32 adapter a round mixes and sends) and the
    round's ``round_compute_s`` (the step × --round-steps) against ``round_network_s`` (the
    adapter × --neighbours ÷ the rate); ``bound`` says which is longer.
    """
    from p2pfed.bench import cli_start_seconds, run_bench, run_ledger_bench, run_sim_bench
    from p2pfed.bench_fed import run_federation_bench
    from p2pfed.bench_net import run_net_bench

    chosen = [name for name, on in (("--sim", sim), ("--federation", federation),
                                    ("--model", model is not None)) if on]
    if len(chosen) > 1:
        raise typer.BadParameter(f"one at a time, not {' and '.join(chosen)}",
                                 param_hint=chosen[-1])
    if model is not None:
        from p2pfed.bench_model import resolve_device, run_model_bench
        from p2pfed.model.textbase import check_text_model

        for hint, check in (("--model", lambda: check_text_model(model)),
                            ("--device", lambda: resolve_device(device)),
                            ("--precision", lambda: resolve_device("cpu", precision))):
            try:
                check()
            except ConfigError as exc:  # (before anything loads: a usage error)
                raise typer.BadParameter(str(exc), param_hint=hint) from exc
        report = run_model_bench(model, device=device, precision=precision,
                                 neighbours=neighbours,
                                 round_steps=round_steps, rate_mb_s=rate_mb_s,
                                 adapter_mode=adapter_mode)
        _print_model(report)
    elif sim:
        report = run_sim_bench(quick=quick)
        _print_sim(report)
    elif federation:
        report = run_federation_bench(quick=quick)
        _print_figures("p2pfed bench --federation", report)
    else:
        sizes = {"memcpy_mb": 16, "mix_params": 1_000_000, "repeats": 2} if quick else {}
        report = dict(run_bench(**sizes))
        report.update(run_net_bench(size_mb=4 if quick else 64, repeats=2 if quick else 5))
        report.update(run_ledger_bench(2_000 if quick else 100_000))
        report["cli_start_s"] = cli_start_seconds(3 if quick else 5)
        _print_figures("p2pfed bench", report)
    if json_path is not None:
        write_json(json_path, report)


def _print_sim(report: dict[str, Any]) -> None:
    table = Table(title="p2pfed bench --sim")
    for column in ("nodes", "rounds", "params", "ms per node-round", "peak RSS MB"):
        table.add_column(column, justify="right")
    for row in report["sim_sizes"]:
        table.add_row(f"{row['nodes']:,}", str(row["rounds"]), f"{row['params']:,}",
                      f"{row['sim_node_round_ms']:.2f}", f"{row['sim_peak_rss_mb']:,.0f}")
    out.print(table)


def _print_model(report: dict[str, Any]) -> None:
    table = Table(title=f"p2pfed bench --model {report['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        shown = f"{value:.4g}" if isinstance(value, float) else (
            f"{value:,}" if isinstance(value, int) else str(value))
        table.add_row(key, shown)
    out.print(table)


def _print_figures(title: str, results: dict[str, Any]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        whole = isinstance(value, int) or float(value).is_integer()
        small = abs(value) < 1 and not whole  # e.g. a status in fractions of a millisecond
        table.add_row(key, f"{value:,.0f}" if whole else f"{value:.3g}" if small
                      else f"{value:,.2f}")
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(bench)
