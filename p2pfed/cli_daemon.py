"""CLI commands of the federation lifecycle and the daemon (registered by :mod:`p2pfed.cli`)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gossip.errors import KeyFileError, LocalError
from gossip.identity import create_identity, load_identity
from p2pfed.config import Config
from p2pfed.home import CACHE_DIR, CONFIG_FILE, KEY_FILE, LEDGER_FILE, locked_home, resolve_home

out = Console()
err = Console(stderr=True)
log = logging.getLogger(__name__)

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Node home (default: $P2PFED_HOME or ~/.local/share/p2pfed)."),
]


ProfileOpt = Annotated[str | None, typer.Option(
    metavar="PROFILE", help="Hardware profile: server, laptop or phone (docs/operating.md; "
    "default: [node] profile, else server).")]


def check_profile(profile: str | None) -> str | None:
    """``--profile``: one of the profiles (a usage error otherwise)."""
    from p2pfed.profiles import PROFILE_NAMES

    if profile is not None and profile not in PROFILE_NAMES:
        raise typer.BadParameter(f"unknown profile {profile!r}; choose "
                                 f"{', '.join(PROFILE_NAMES)}", param_hint="--profile")
    return profile


def _now_ms() -> int:
    return int(time.time() * 1000)


def _load(home: Path | None) -> tuple[Path, Config]:
    root = resolve_home(home)
    return root, Config.from_toml(root / CONFIG_FILE)


def _addresses(config: Config, peer_id: str) -> list[str]:
    """Addresses others can dial: announce, else listen addresses that are concrete."""
    addrs = list(config.node.announce) or [
        a for a in config.node.listen if "/0.0.0.0/" not in a and not a.endswith("/tcp/0")
    ]
    return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in addrs]


def init(
    home: HomeOpt = None,
    listen: Annotated[list[str] | None, typer.Option(
        metavar="MULTIADDR",
        help="Listen address, repeatable (default: /ip4/0.0.0.0/tcp/4001).")] = None,
    announce: Annotated[list[str] | None, typer.Option(
        metavar="MULTIADDR",
        help="Address to advertise, repeatable (default: the listen addresses).")] = None,
    hold: Annotated[list[str] | None, typer.Option(
        metavar="COMPONENT", help="Component held, repeatable (default: backbone; with --data: "
        "the tasks' pipelines).")] = None,
    train: Annotated[list[str] | None, typer.Option(
        metavar="COMPONENT", help="Component trained, repeatable (default: every held one "
        "that local data trains).")] = None,
    interval: Annotated[float | None, typer.Option(
        help="Seconds between rounds (default: 5).")] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Round timeout in seconds (default: 20).")] = None,
    model: Annotated[str | None, typer.Option(
        help="consensus (mixing only) or m3t (the model trained on local data; default: "
        "consensus, or m3t with --data).")] = None,
    data: Annotated[list[str] | None, typer.Option(
        metavar="TASK:MODALITY:PATH", help="A local data file, repeatable (see 'p2pfed data "
        "sample' and docs/data.md).")] = None,
    profile: ProfileOpt = None,
) -> None:
    """Create this node's identity and p2pfed.toml."""
    check_profile(profile)
    root = resolve_home(home)
    key = root / KEY_FILE
    if key.exists():
        raise LocalError(f"{root} is already initialised (identity {load_identity(key).peer_id})")
    config = Config().with_overrides(
        node__listen=tuple(listen) if listen else None,
        node__announce=tuple(announce) if announce else None,
        components__hold=tuple(hold) if hold else None,
        components__train=tuple(train) if train else None,
        rounds__interval_s=interval, rounds__timeout_s=timeout, node__profile=profile,
    )
    if model is not None or data:
        from p2pfed.model.sources import with_model_data  # (loads torch: only when asked)

        config = with_model_data(config, model=model or "m3t", data=data or [],
                                 hold=tuple(hold) if hold else None)
        if config.model.kind == "m3t" and config.data:  # accuracy in 'status' from the start
            config = config.with_overrides(model__holdout=0.1)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    identity = create_identity(key)
    (root / CONFIG_FILE).write_text(config.to_toml(), encoding="utf-8")
    out.print(f"initialised {root}\npeer id: [bold]{identity.peer_id}[/bold]")


def federation_create(
    name: Annotated[str, typer.Argument(help="Federation name.")],
    home: HomeOpt = None,
    component: Annotated[
        list[str] | None, typer.Option(help="Catalog component (repeat; default: held ones).")
    ] = None,
    round_period: Annotated[float | None, typer.Option(
        min=0.1, help="The federation's round period, seconds, signed into the genesis: no "
        "member runs rounds more often (default: this node's rounds.interval_s).")] = None,
) -> None:
    """Found a federation: this node becomes its first member and admin."""
    from p2pfed.fedstore import create_federation
    from p2pfed.ledger import Ledger

    root, config = _load(home)
    identity = load_identity(root / KEY_FILE)
    catalog = list(component) if component else list(config.components.hold)
    policies: tuple[tuple[str, Any], ...] = ()
    if config.model.kind == "m3t":  # the catalogue and what this node holds: the model's
        from p2pfed.model.agreement import genesis_policies
        from p2pfed.model.local import model_spec

        spec = model_spec(config, bytes(32))
        spec.check_holdings(config.components.hold)
        spec.check_components(catalog, "--component")
        policies = genesis_policies(config, catalog,  # (the text model members must share)
                                    root / CACHE_DIR)
    with locked_home(root, "federation create"), \
            Ledger.open(root / LEDGER_FILE, identity) as ledger:
        genesis = create_federation(
            root, identity, ledger, name=name, catalog=catalog,
            modules=list(config.components.hold), addresses=_addresses(config, identity.peer_id),
            round_period_ms=int(1000 * (round_period if round_period is not None
                                        else max(config.rounds.interval_s, 0.1))),
            now_ms=_now_ms(), policies=policies,
        )
    out.print(f"created federation [bold]{name}[/bold] ({genesis.federation_id.hex()[:16]}…) "
              f"with components {', '.join(s.name for s in genesis.catalog)}")


def invite(
    home: HomeOpt = None,
    for_peer: Annotated[str | None, typer.Option(
        "--for", help="Only this peer id may use it (recommended: the newcomer's 'p2pfed init' "
        "prints it).")] = None,
    module: Annotated[list[str] | None, typer.Option(help="Allowed module (repeat).")] = None,
    ttl_hours: Annotated[float, typer.Option(min=0.01, max=24 * 365)] = 24.0,
    uses: Annotated[int, typer.Option(
        min=1, max=10_000, help="How many institutions may join with it (default: one).")] = 1,
    bootstrap: Annotated[list[str] | None, typer.Option(help="Address to give (repeat).")]
    = None,
) -> None:
    """Print a signed, expiring, single-use invite token (admins only).

    The token is a secret: whoever holds it can join (once, or --uses times).  A member admits
    the newcomer when its daemon first reaches one; the invite's expiry is checked by that
    member's clock.
    """
    from p2pfed.fedstore import make_invite_token
    from p2pfed.runtime.control import SOCKET_NAME, ControlUnavailableError, request

    root, config = _load(home)
    identity = load_identity(root / KEY_FILE)
    addrs = list(bootstrap or [])
    if not addrs:
        try:
            addrs = [a for a in request(root / SOCKET_NAME, "status")["listen"]
                     if "/0.0.0.0/" not in a]
        except ControlUnavailableError:
            addrs = _addresses(config, identity.peer_id)
    token = make_invite_token(root, identity, invitee=for_peer, modules=list(module or []),
                              ttl_ms=int(ttl_hours * 3600_000), bootstrap=addrs, now_ms=_now_ms(),
                              uses=uses)
    print(token)


def join(
    token: Annotated[str, typer.Argument(help="Invite token (p2pfed1.…).")],
    home: HomeOpt = None,
) -> None:
    """Join a federation with an invite token (then start the daemon with 'p2pfed run')."""
    from p2pfed.fedstore import join_federation
    from p2pfed.ledger import Ledger

    root, config = _load(home)
    identity = load_identity(root / KEY_FILE)
    if config.model.kind == "m3t":  # the federation's text model, before anything is written
        from p2pfed.fedstore import usable_invite
        from p2pfed.model.agreement import check_joining

        check_joining(config, config.components.hold,
                      usable_invite(token, identity, _now_ms()).genesis, root / CACHE_DIR)
    with locked_home(root, "join"), Ledger.open(root / LEDGER_FILE, identity) as ledger:
        parsed = join_federation(root, identity, ledger, token,
                                 modules=list(config.components.hold),
                                 addresses=_addresses(config, identity.peer_id), now_ms=_now_ms())
    if parsed.already is not None:
        out.print(f"nothing to do: {parsed.already} [bold]{escape(parsed.genesis.name)}[/bold]; "
                  "no record was written")
        return
    out.print(f"ready to join [bold]{parsed.genesis.name}[/bold] ({identity.peer_id}); "
              f"bootstrap peers: {len(parsed.invite.bootstrap)}. Start the daemon with "
              "'p2pfed run': a member admits this node when the daemon first reaches one")


def run(home: HomeOpt = None, profile: ProfileOpt = None) -> None:
    """Run the daemon in the foreground (what the systemd unit starts)."""
    import trio

    from p2pfed.runtime.daemon import Daemon
    from p2pfed.runtime.systemd import Notifier

    check_profile(profile)
    root, config = _load(home)
    config = config.with_overrides(node__profile=profile)  # (for this run only)
    if not (root / KEY_FILE).exists():
        raise KeyFileError(f"no key file at {root / KEY_FILE}; run 'p2pfed init' first")
    load_identity(root / KEY_FILE)  # refuse an unsafe key before anything starts
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    trio.run(Daemon(root, config, Notifier()).run)


def _control(home: Path | None, cmd: str, **args: Any) -> Any:
    from p2pfed.runtime.control import SOCKET_NAME, request

    return request(resolve_home(home) / SOCKET_NAME, cmd, **args)


def status(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Ask the running daemon how it is doing."""
    st = _control(home, "status")
    if as_json:
        print(json.dumps(st, indent=2))
        return
    fed = escape(st["federation"])
    standing = st.get("standing", "member" if st["member"] else "joining")
    where = {"member": f"member of {fed}", "joining": f"asking to join {fed}",
             "left": f"left {fed}", "removed": f"removed from {fed} by an admin",
             }.get(standing, f"not a member of {fed}")
    out.print(f"[bold]{st['peer_id']}[/bold] {where} — {st['members']} members, "
              f"{st['peers']} connected, ledger {'ok' if st['ledger_ok'] else 'BROKEN'} "
              f"({st['ledger_entries']} entries), up {st['uptime_s']:.0f} s")
    if st.get("forgotten"):
        out.print("the federation has forgotten this node's data (an unlearning request)")
    if st.get("rounds_halted"):
        out.print("no new rounds start: this node is not a member (join again with a new "
                  "invite: stop the daemon, 'p2pfed join TOKEN', start it)")
    table = Table("component", "round", "phase", "neighbours", "consensus distance")
    for name, c in st["components"].items():
        hist = c["consensus_distance"]
        table.add_row(name, str(c["round"]), c["phase"], str(len(c["neighbours"])),
                      f"{hist[-1]:.2e}" if hist else "—")
    out.print(table)
    if st.get("model"):
        m = st["model"]
        out.print(f"model on {m['device']} in {m['precision']}"
                  + (f", text model {m['text_model']}" if m["text_model"] else ""),
                  soft_wrap=True, highlight=False)
    if st.get("training"):
        out.print(training_table(st["training"]))
    if "storage" in st:
        out.print(storage_line(st["storage"]))
    if "resources" in st:
        out.print(resources_line(st["resources"]))
    catalogue = st.get("catalogue") or {}
    if catalogue.get("version"):
        active = [n for n, t in sorted(catalogue["tasks"].items()) if t["phase"] == "active"]
        out.print(f"task catalogue version {catalogue['version']}: "
                  f"{escape(', '.join(active)) or 'no active task'} ('p2pfed task list')")
    for u in st.get("unlearning", []):
        if u["done"]:
            state = "done"
        else:
            state = "re-running " + ", ".join(f"{c} {r}/{until}" for c, (r, until)
                                              in sorted(u["replaying"].items()))
        out.print(f"forgetting {u['target']} ({u['mode']}, from round {u['from_round']}): "
                  f"{state}; rolled back {', '.join(u['rolled_back']) or 'nothing'}")


def training_table(training: dict[str, Any]) -> Table:
    """``status``'s training: per task its last round's loss and the held-out accuracy."""
    table = Table("task", "round", "training loss", "held-out accuracy", "examples",
                  title="local training")
    for task, t in sorted(training.items()):
        acc = "—" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
        if t.get("worst_group_gap") is not None:  # (held-out examples with groups; data.md)
            acc += f" (worst-group gap {t['worst_group_gap']:.3f})"
        loss = "—" if t["loss"] is None else f"{t['loss']:.4f}"
        table.add_row(task, str(t["round"]), loss, acc,
                      f"{t['examples']} (+{t['heldout']} held out)")
    if not any(t["heldout"] for t in training.values()):
        table.caption = "no held-out examples: set [model] holdout = 0.1 to measure accuracy"
    return table


def resources_line(res: dict[str, Any]) -> str:
    """``status``'s resources, in words."""
    threads = res["threads"]
    configured = threads["configured"] or "torch's default"
    cap = f" of {res['max_memory_mb']} MB" if res["max_memory_mb"] else " (no cap)"
    rounds = res["round_s"]
    took = (f"; training rounds took {rounds['last']:.2f} s (mean {rounds['mean']:.2f} s over "
            f"{rounds['rounds']})" if rounds["rounds"] else "")
    training = res["training"]
    if training != "on":
        training = f"[yellow]{training}[/yellow]"
    startup = (f" (start-up {res['startup_rss_mb']:,.0f} MB)"
               if res.get("startup_rss_mb") is not None else "")
    return (f"profile {res['profile']}: training {training}; threads {configured} (torch "
            f"{threads['torch']}); peak memory {res['peak_rss_mb']:,.0f} MB{cap}{startup}{took}")


def storage_line(storage: dict[str, Any]) -> str:
    """``status``'s storage, in words."""
    used = f"storage {storage['bytes'] / 1e6:,.1f} MB"
    if storage["max_bytes"]:
        used += f" of {storage['max_bytes'] / 1e6:,.1f} MB"
    if storage["full"]:
        used += " [red]FULL: no new rounds start[/red] (raise max_bytes, or lower the horizon)"
    if not storage["horizon_rounds"]:
        return used + "; all history kept"
    since = (f"back to round {storage['oldest_round']}" if storage["oldest_round"] is not None
             else "back to the first checkpoint (nothing pruned yet)")
    return (f"{used}; history kept for {storage['horizon_rounds']} rounds: a member can be "
            f"forgotten exactly {since}")


def peers(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the federation's other members and whether they are connected."""
    rows = _control(home, "peers")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("peer id", "connected", "neighbour", "modules", "admin")
    for r in rows:
        table.add_row(r["peer_id"], "yes" if r["connected"] else "no",
                      "yes" if r["neighbour"] else "", ", ".join(r["modules"]),
                      "yes" if r["admin"] else "")
    out.print(table)


ModeOpt = Annotated[str, typer.Option(help="exact (roll back and re-run without the member) or "
                                           "fast (re-run every 4th round, calibrated).")]


def _check_mode(mode: str) -> None:
    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"unknown mode {mode!r}; choose exact or fast",
                                 param_hint="--mode")


def leave(
    home: HomeOpt = None,
    reason: Annotated[str, typer.Option(help="Recorded in the signed leave record.")] = "",
    forget: Annotated[bool, typer.Option(
        "--forget", help="Also ask the federation to forget this member's data.")] = False,
    mode: ModeOpt = "exact",
) -> None:
    """Sign and gossip a leave record; the others recompute their mixing weights."""
    _check_mode(mode)
    result = _control(home, "leave", reason=reason, forget=forget, mode=mode)
    if not result.get("left"):
        out.print(f"nothing to do: this node is not a member ({result.get('standing', '?')}); "
                  "no record was signed")
        return
    told = "asked to forget our data and told" if forget else "told"
    out.print(f"left the federation; the other members have been {told}. The daemon runs no "
              "more rounds: stop it now ('systemctl disable --now p2pfed', or Ctrl-C).")


def unlearn(
    peer: Annotated[str, typer.Argument(help="Peer id of the member whose data to forget.")],
    home: HomeOpt = None,
    mode: ModeOpt = "exact",
    reason: Annotated[str, typer.Option(help="Recorded in the signed request.")] = "",
) -> None:
    """Ask the federation to forget PEER's data (only PEER itself or an admin may ask)."""
    _check_mode(mode)
    result = _control(home, "unlearn", peer=peer, mode=mode, reason=reason)
    if result.get("already"):
        out.print(f"nothing to do: {peer} is forgotten already (see 'p2pfed status'); no "
                  "request was signed")
        return
    out.print(f"asked to forget {peer} ({mode}); rolled back here: "
              f"{', '.join(result['rolled_back']) or 'nothing'}. "
              "Follow it with 'p2pfed status'.")


def register(app: typer.Typer) -> None:
    app.command()(init)
    app.command()(invite)
    app.command()(join)
    app.command()(run)
    app.command()(status)
    app.command()(peers)
    app.command()(leave)
    app.command()(unlearn)
    federation = typer.Typer(help="Create a federation.", no_args_is_help=True)
    federation.command("create")(federation_create)
    app.add_typer(federation, name="federation")
