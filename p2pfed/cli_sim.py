"""``p2pfed simulate``: options, their checks and the summary (registered by :mod:`p2pfed.cli`).

The simulator loads torch: it is imported only when a simulation runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from p2pfed.cli_bench import write_json as _write_json
from p2pfed.cli_sim_print import _print_sim_summary
from p2pfed.config_sections import DEFAULT_LEAN, MAX_LEAN, MAX_TILT

if TYPE_CHECKING:
    from p2pfed.node import RetentionPolicy
    from p2pfed.sim.config import SimConfig
    from p2pfed.sim.education import EducationSettings

out = Console()
err = Console(stderr=True)


def simulate(
    topology: Annotated[Path, typer.Argument(help="Topology file (topologies/*.toml).")],
    workload: Annotated[
        str, typer.Option(help="consensus (random values, mixing only) or education.")
    ] = "consensus",
    rounds: Annotated[
        int | None,
        typer.Option(min=1, max=100_000,
                     help="Rounds (default: 200; education: 40 with --quick, else 48)."),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Education workload: the few-minute run.")]
    = False,
    text_model: Annotated[str | None, typer.Option(
        metavar="MODEL", help="Education: the frozen text model, minilm (default) or a local "
        "Hugging Face model directory (nothing is downloaded), LoRA on its top layer.")] = None,
    seed: Annotated[int, typer.Option(min=0, help="Same seed, same numbers.")] = 0,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the report here (default: not written; a missing folder is "
                       "created).")] = None,
    home: Annotated[
        Path | None, typer.Option(help="Keep each node's identity and ledger in HOME/<node>/ "
                                       "(default: in memory only).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write a PNG (default: none; a missing folder is created): consensus distance per "
             "round, or for the education workload accuracy per round per task.")] = None,
    dim: Annotated[int, typer.Option(min=1, max=1 << 24, help="Parameters per component.")] = 32,
    dtype: Annotated[str, typer.Option(
        help="Consensus workload: float64, or float32 as a model's parameters.")] = "float64",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    unlearn: Annotated[
        str | None,
        typer.Option(metavar="NODE@ROUND",
                     help="Forget NODE after ROUND rounds; compare with a run without it "
                          "(education: NODE's topic data carries a backdoor)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="Unlearning mode: exact or fast.")] = "exact",
    dp_sigma: Annotated[float | None, typer.Option(
        min=0.0, help="Education: DP noise multiplier for every trained component "
                      "(default: no DP).")] = None,
    dp_clip: Annotated[float, typer.Option(min=0.0, help="DP clipping norm.")] = 1.0,
    dp_delta: Annotated[float, typer.Option(min=0.0, max=1.0, help="DP delta.")] = 1e-5,
    dp_budget: Annotated[float, typer.Option(min=0.0, help="ε cap per component (0: none).")]
    = 0.0,
    dp_noisy: Annotated[str | None, typer.Option(
        metavar="COUNT:SIGMA", help="COUNT evenly spaced nodes use noise multiplier SIGMA "
                                    "instead (heterogeneous budgets; needs --dp-sigma).")] = None,
    attack: Annotated[str | None, typer.Option(
        metavar="KIND:COUNT", help="COUNT Byzantine nodes: sign-flip, gaussian, alie, ipm or "
                                   "label-flip (compared with a run without them).")] = None,
    robust: Annotated[str, typer.Option(
        help="Aggregation at honest nodes: mh, clipped, trimmed-mean or noise-aware.")] = "mh",
    storage: Annotated[str | None, typer.Option(
        metavar="HORIZON:MB", help="Keep HORIZON rounds of history and at most MB megabytes per "
                                   "node (checkpoints every 5 rounds); the report gains storage.")]
    = None,
    continual: Annotated[str | None, typer.Option(
        metavar="SCHEDULE", help="Education: tasks start and retire while the run goes on, e.g. "
                                 "topic@0,engagement@15,digits@30,retire:topic@30; the report "
                                 "gains continual (the method beside naive sequential and "
                                 "joint training).")] = None,
    method: Annotated[str, typer.Option(
        help="Continual method: rehearsal, ewc, rehearsal+ewc or naive.")] = "rehearsal",
    catch_up: Annotated[int | None, typer.Option(
        min=1, max=10, help="Continual: a task that starts late trains this many times the "
                            "steps per round until it made up the rounds it missed (at most "
                            "10 rounds; 1: off; default 3, as [continual] catch_up).")] = None,
    catch_up_lr: Annotated[float | None, typer.Option(
        help="Continual: those rounds' steps run at this fraction of the learning rate, in "
             "(0, 1] (default 0.5, as [continual] catch_up_lr).")] = None,
    participation: Annotated[str | None, typer.Option(
        metavar="NODES:P[,NODES:P]", help="These nodes train only a fraction P of the rounds "
        "(NODES: a node, a group of a hierarchical topology, or a share such as 1/3 of the "
        "nodes, evenly spaced); compared with everyone training every round.")] = None,
    train_s: Annotated[float, typer.Option(
        min=0.0, max=3600.0, help="Simulated seconds a round's training takes (with "
                                  "--participation: 1 if 0).")] = 0.0,
    round_interval: Annotated[float, typer.Option(
        min=0.0, max=3600.0, help="With --participation: a node starts a round at most every "
                                  "this many simulated seconds, as a daemon's [rounds] "
                                  "interval_s (0: twice the training time).")] = 0.0,
    update_scale: Annotated[str | None, typer.Option(
        metavar="NODE:K", help="Consensus: every node adds a seeded unit vector to its state "
        "each round, K times as long at NODE; compared with a run without each member "
        "(report provenance_study).")] = None,
    explain: Annotated[int, typer.Option(
        metavar="N", min=0, max=100_000,
        help="Education: at the end, explain N held-out examples per task and check the "
             "explanations' faithfulness (report explain; 0: none).")] = 0,
    groups: Annotated[bool, typer.Option(
        "--groups", help="Education: the group study (a minority group concentrated in one "
        "region; report fairness: per task mean, worst node, 10th percentile, each group's "
        "accuracy and the worst-group gap, federated and baselines).")] = False,
    fairness: Annotated[str, typer.Option(
        metavar="RULE", help="With --groups: the members' local objective, erm or group-dro, "
        "and/or loss-mixing (each member keeps more of its own state the worse its model fits "
        "its data; --lean), e.g. group-dro+loss-mixing; other than erm: compared with erm and "
        "plain mixing in the same run; with --unlearn, the unlearning study runs with it.")
    ] = "erm",
    profile: Annotated[list[str] | None, typer.Option(
        metavar="NODES:PROFILE", help="Education: NODES (a node or a group, e.g. student) run "
        "on PROFILE hardware (server, laptop or phone: what it trains, and its training "
        "--train-s times 1, 2 or 5); compared with everyone a server (report hardware). "
        "Repeatable.")] = None,
    round_timeout: Annotated[float | None, typer.Option(
        min=0.001, max=3600.0, help="Seconds a node waits for a neighbour's state after "
        "publishing its own (default: 10; with --profile: the round interval minus the "
        "training time).")] = None,
    tilt: Annotated[float, typer.Option(
        min=0.0, max=MAX_TILT, help="group-dro: how hard it leans on the worst group (0: the "
        "groups' mean).")] = 1.0,
    lean: Annotated[float | None, typer.Option(
        min=0.001, max=MAX_LEAN, help="loss-mixing: a member that fits its data no better than a "
        "guess counts up to 1 + LEAN times as much as one that fits it perfectly (default "
        f"{DEFAULT_LEAN:g}).")] = None,
) -> None:
    """Run every node of TOPOLOGY in this process over the in-memory transport."""
    from p2pfed.sim.simulator import plot_report

    # (every argument is checked before the run: a bad path must not cost a finished run)
    if json_path is not None:
        _check_output(json_path, "--json")
    if plot is not None:
        _check_output(plot, "--plot")
    config = _sim_config(topology, workload=workload, rounds=rounds, quick=quick, seed=seed,
                         home=home, dim=dim, dtype=dtype, unlearn=unlearn, mode=mode,
                         dp_sigma=dp_sigma, dp_clip=dp_clip, dp_delta=dp_delta,
                         dp_budget=dp_budget,
                         dp_noisy=dp_noisy, attack=attack, robust=robust, storage=storage,
                         update_scale=update_scale, explain=explain)
    if text_model is not None:
        config.education = _education_text_model(text_model, workload, quick)
    config = _continual_options(config, continual=continual, method=method, catch_up=catch_up,
                                catch_up_lr=catch_up_lr, participation=participation,
                                train_s=train_s, round_interval=round_interval)

    objective, mixing = fairness_rule(fairness)
    if (groups or fairness != "erm") and (workload != "education" or not groups):
        raise typer.BadParameter("needs --workload education and --groups",
                                 param_hint="--fairness" if fairness != "erm" else "--groups")
    if lean is not None and not mixing:
        raise typer.BadParameter("only with --fairness loss-mixing (or OBJECTIVE+loss-mixing)",
                                 param_hint="--lean")
    config = dataclasses.replace(config, groups=groups, fairness=objective, tilt=tilt,
                                 lean=(DEFAULT_LEAN if lean is None else lean) if mixing else 0.0)
    config = _profile_options(config, profile or [], round_timeout)
    others = [name for name, on in (("--unlearn", unlearn), ("--participation", participation),
                                    ("--continual", continual), ("--attack", attack)) if on]
    if config.profiles and others:  # (each is a study of its own: one at a time)
        raise typer.BadParameter(f"runs a study of its own; not with {', '.join(others)}",
                                 param_hint="--profile")
    if fairness != "erm" and (config.profiles or [o for o in others if o != "--unlearn"]):
        raise typer.BadParameter("compares the rule with erm in a study of its own; not with "
                                 f"{', '.join(others or ['--profile'])}", param_hint="--fairness")
    report = _simulate_with_progress(config, quiet)
    if json_path is not None:
        _write_json(json_path, report)
    if plot is not None:
        plot_report(report, plot)
    _print_sim_summary(report)
    for what, path in (("report", json_path), ("plot", plot)):
        if path is not None:
            out.print(f"{what}: {path}")


def _check_output(path: Path, option: str) -> None:
    """Make sure ``path`` can be written once the run is done: its folder is created when
    missing; BadParameter (exit 2) for a folder, or a place that cannot be written."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot create the folder {folder}: {exc.strerror or exc}",
                                 param_hint=option) from exc
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                     and not os.access(path, os.W_OK)):
        raise typer.BadParameter(f"cannot write {path}: permission denied", param_hint=option)


def fairness_rule(rule: str) -> tuple[str, bool]:
    """``--fairness RULE``: its local objective, and whether it mixes by the loss
    (``group-dro``, ``loss-mixing``, ``group-dro+loss-mixing`` ...; BadParameter otherwise)."""
    from p2pfed.model.fairness import OBJECTIVES

    parts = rule.split("+")
    objectives = [p for p in parts if p != "loss-mixing"]
    if len(set(parts)) != len(parts) or len(objectives) > 1 or not set(objectives) <= set(
            OBJECTIVES):
        raise typer.BadParameter(f"unknown rule {rule!r}; choose from {', '.join(OBJECTIVES)}, "
                                 "loss-mixing, or OBJECTIVE+loss-mixing", param_hint="--fairness")
    return (objectives or ["erm"])[0], "loss-mixing" in parts


def _sim_config(topology: Path, *, workload: str, rounds: int | None, quick: bool, seed: int,
                home: Path | None, dim: int, unlearn: str | None, mode: str,
                dtype: str = "float64",
                dp_sigma: float | None, dp_clip: float, dp_delta: float, dp_budget: float,
                dp_noisy: str | None, attack: str | None, robust: str,
                storage: str | None = None, update_scale: str | None = None,
                explain: int = 0) -> SimConfig:
    """The simulation ``simulate``'s options ask for (BadParameter for a malformed one)."""
    from p2pfed.sim.simulator import WORKLOADS, SimConfig
    from p2pfed.sim.topology import load_topology

    if workload not in WORKLOADS:
        raise typer.BadParameter(
            f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}",
            param_hint="--workload",
        )
    from p2pfed.sim.config import DTYPES

    if dtype not in DTYPES:
        raise typer.BadParameter(f"unknown type {dtype!r}; choose from {', '.join(DTYPES)}",
                                 param_hint="--dtype")
    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"unknown mode {mode!r}; choose exact or fast",
                                 param_hint="--mode")
    from p2pfed.config import MIXING_RULES

    if robust not in MIXING_RULES:
        raise typer.BadParameter(f"unknown rule {robust!r}; choose from "
                                 f"{', '.join(MIXING_RULES)}", param_hint="--robust")
    target = _parse_unlearn(unlearn) if unlearn is not None else None
    attackers = _parse_attack(attack) if attack is not None else None
    dp = None
    if dp_sigma is not None:
        from p2pfed.privacy import Policy

        dp = Policy(dp_clip, dp_sigma, dp_delta, 1.0, dp_budget)
    noisy = _parse_noisy(dp_noisy) if dp_noisy is not None else None
    if noisy is not None and dp is None:
        raise typer.BadParameter("needs --dp-sigma (the other nodes' level)",
                                 param_hint="--dp-noisy")
    if topology.is_dir():
        raise typer.BadParameter(f"{topology} is a folder; give a topology file such as "
                                 f"{topology / 'ring-16.toml'}", param_hint="TOPOLOGY")
    topo = load_topology(topology)
    if rounds is None:
        from p2pfed.sim.education import FULL, QUICK

        rounds = (QUICK if quick else FULL).rounds if workload == "education" else 200
    retention = _parse_storage(storage) if storage is not None else None
    updates = None
    if update_scale is not None:
        updates = _parse_update_scale(update_scale, topo.nodes)
        if workload != "consensus" or attackers is not None:
            raise typer.BadParameter("needs the consensus workload and no --attack",
                                     param_hint="--update-scale")
    if explain and workload != "education":
        raise typer.BadParameter("needs --workload education (nothing predicts in the "
                                 "consensus workload)", param_hint="--explain")
    return SimConfig(topo, workload=workload, rounds=rounds, seed=seed, home=home, dim=dim,
                     dtype=dtype, explain=explain,
                     quick=quick, unlearn=target, unlearn_mode=mode, dp=dp, dp_noisy=noisy,
                     attack=attackers, robust=robust, retention=retention,
                     checkpoint_every=5 if retention is not None else 0, updates=updates)


def _education_text_model(text_model: str, workload: str, quick: bool) -> EducationSettings:
    """The education settings (quick or full) with ``text_model`` as the frozen text model;
    BadParameter for another workload or a path that is not a model directory."""
    from gossip.errors import ConfigError
    from p2pfed.model.textbase import check_text_model
    from p2pfed.sim.education import FULL, QUICK

    if workload != "education":
        raise typer.BadParameter("needs --workload education (no text model in the consensus "
                                 "workload)", param_hint="--text-model")
    try:
        check_text_model(text_model)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--text-model") from exc
    return dataclasses.replace(QUICK if quick else FULL, text_model=text_model)


def _simulate_with_progress(config: SimConfig, quiet: bool) -> dict[str, Any]:
    """Run the simulation with a progress bar on stderr (none if ``quiet``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from p2pfed.sim.simulator import simulate as run_simulation

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, disable=quiet, transient=True,
    )
    rounds = f"{config.topology.name}: rounds"
    with progress:
        task = progress.add_task(rounds, total=config.rounds)

        def update(done: int, total: int) -> None:
            progress.update(task, description=rounds, completed=done, total=total)

        def phase(name: str, done: int, total: int) -> None:
            progress.update(task, description=name, completed=done, total=total)

        config.progress = update
        return run_simulation(config, on_phase=phase)


def _parse_noisy(value: str) -> tuple[int, float]:
    count, sep, sigma = value.partition(":")
    try:
        parsed = int(count), float(sigma)
    except ValueError:
        parsed = (0, -1.0)
    if not sep or parsed[0] < 1 or not math.isfinite(parsed[1]) or parsed[1] <= 0:
        raise typer.BadParameter(f"expected COUNT:SIGMA (a count ≥ 1, a sigma > 0), got "
                                 f"{value!r}", param_hint="--dp-noisy")
    return parsed


def _parse_update_scale(value: str, nodes: tuple[str, ...]) -> tuple[str, float]:
    node, sep, k = value.rpartition(":")
    try:
        scale = float(k)
    except ValueError:
        scale = math.nan
    if not sep or not node or not math.isfinite(scale) or scale <= 0.0:
        raise typer.BadParameter(f"expected NODE:K with K finite and > 0, got {value!r}",
                                 param_hint="--update-scale")
    if node not in nodes:
        raise typer.BadParameter(f"no node {node!r} in the topology", param_hint="--update-scale")
    return node, scale


def _parse_attack(value: str) -> tuple[str, int]:
    from p2pfed.sim.attacks import ATTACKS

    kind, sep, count = value.rpartition(":")
    if not sep or not kind or not count.isdigit():
        raise typer.BadParameter(f"expected KIND:COUNT, got {value!r}", param_hint="--attack")
    if kind not in ATTACKS:
        raise typer.BadParameter(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}",
                                 param_hint="--attack")
    return kind, int(count)


def _continual_options(config: SimConfig, *, continual: str | None, method: str,
                       participation: str | None, train_s: float,
                       catch_up: int | None = None, catch_up_lr: float | None = None,
                       round_interval: float = 0.0) -> SimConfig:
    """``config`` with the continual schedule, the participation and the compute model."""

    from gossip.errors import ConfigError
    from p2pfed.continual import METHODS, ContinualSettings, Schedule
    from p2pfed.model.tasks import TASKS

    if method not in METHODS:
        raise typer.BadParameter(f"unknown method {method!r}; choose from {', '.join(METHODS)}",
                                 param_hint="--method")
    if continual is None and method != "rehearsal":
        raise typer.BadParameter("needs --continual SCHEDULE", param_hint="--method")
    for value, hint in ((catch_up, "--catch-up"), (catch_up_lr, "--catch-up-lr")):
        if continual is None and value is not None:
            raise typer.BadParameter("needs --continual SCHEDULE", param_hint=hint)
    if catch_up_lr is not None and not 0.0 < catch_up_lr <= 1.0:
        raise typer.BadParameter("must be in (0, 1]", param_hint="--catch-up-lr")
    if participation is None and round_interval:
        raise typer.BadParameter("needs --participation", param_hint="--round-interval")
    if participation is not None and (continual is not None or config.attack is not None):
        raise typer.BadParameter("is a study of its own: run it without --continual and "
                                 "--attack", param_hint="--participation")
    if participation is not None and config.workload != "education":
        raise typer.BadParameter("needs --workload education (nothing trains in the "
                                 "consensus workload)", param_hint="--participation")
    schedule = None
    if continual is not None:
        if config.workload != "education":
            raise typer.BadParameter("needs --workload education", param_hint="--continual")
        try:
            schedule = Schedule.parse(continual, [t.name for t in TASKS])
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--continual") from exc
    shares = _parse_participation(participation, config) if participation is not None else {}
    given = {k: v for k, v in (("catch_up", catch_up), ("catch_up_lr", catch_up_lr))
             if v is not None}
    return dataclasses.replace(
        config, participation=shares, train_s=train_s, round_interval_s=round_interval,
        continual=None if schedule is None else (
            schedule, ContinualSettings(method=method, **given)))  # type: ignore[arg-type]


def _parse_participation(value: str, config: SimConfig) -> dict[str, float]:
    """``NODES:P[,NODES:P]`` -> node -> P (BadParameter naming the bad item)."""
    from p2pfed.sim.nodes import spaced

    topo = config.topology
    shares: dict[str, float] = {}
    for item in (i.strip() for i in value.split(",") if i.strip()):
        who, sep, share = item.rpartition(":")
        try:
            p = float(share)
        except ValueError:
            p = -1.0
        if not sep or not who or not 0.0 < p <= 1.0:
            raise typer.BadParameter(f"expected NODES:P with P in (0, 1], got {item!r}",
                                     param_hint="--participation")
        num, slash, den = who.partition("/")
        if slash and num.isdigit() and den.isdigit() and 0 < int(num) <= int(den):
            names = spaced(topo.nodes, max(1, len(topo.nodes) * int(num) // int(den)))
        else:
            names = [n for n in topo.nodes if topo.groups.get(n) == who] or (
                [who] if who in topo.nodes else [])
        if not names:
            raise typer.BadParameter(f"{who!r} is neither a node, a group of "
                                     f"{topo.name} nor a share such as 1/3",
                                     param_hint="--participation")
        shares.update(dict.fromkeys(names, p))
    return shares


def _parse_storage(value: str) -> RetentionPolicy:
    from p2pfed.node import RetentionPolicy

    horizon, sep, mb = value.partition(":")
    if not sep or not horizon.isdigit() or not mb.isdigit() or int(horizon) < 1:
        raise typer.BadParameter(f"expected HORIZON:MB with HORIZON >= 1, got {value!r}",
                                 param_hint="--storage")
    return RetentionPolicy(int(horizon), int(mb) * 1_000_000)


def _parse_unlearn(value: str) -> tuple[str, int]:
    node, sep, rnd = value.rpartition("@")
    if not sep or not node or not rnd.isdigit() or int(rnd) < 1:
        raise typer.BadParameter(f"expected NODE@ROUND with ROUND >= 1, got {value!r}",
                                 param_hint="--unlearn")
    return node, int(rnd)


def register(app: typer.Typer) -> None:
    app.command()(simulate)


def _profile_options(config: SimConfig, specs: list[str],
                     round_timeout: float | None) -> SimConfig:
    """``--profile NODES:PROFILE`` (a node or a group of the topology) and ``--round-timeout``
    (BadParameter for a malformed one)."""
    from p2pfed.sim.config import SLOWDOWN

    profiles: dict[str, str] = {}
    topo = config.topology
    for spec in specs:
        nodes, _, name = spec.rpartition(":")
        chosen = [n for n in topo.nodes if n == nodes or topo.groups.get(n) == nodes]
        if not chosen or name not in SLOWDOWN:
            raise typer.BadParameter(f"expected NODES:PROFILE with a node or group of "
                                     f"{topo.name} and one of {', '.join(SLOWDOWN)}, got "
                                     f"{spec!r}", param_hint="--profile")
        profiles.update(dict.fromkeys(chosen, name))
    if profiles and config.workload != "education":
        raise typer.BadParameter("needs --workload education", param_hint="--profile")
    timeout_ms = config.round_timeout_ms
    if round_timeout is not None:
        timeout_ms = round(round_timeout * 1000)
    elif profiles:  # (a node waits for no neighbour beyond its own pace)
        train_s = config.train_s or 1.0
        timeout_ms = round(((config.round_interval_s or 2.0 * train_s) - train_s) * 1000)
    return dataclasses.replace(config, profiles=profiles, round_timeout_ms=max(timeout_ms, 1))
