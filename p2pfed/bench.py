"""Micro-benchmarks of the data path (copy, mix, encode, decode, hash, sign, verify) and of
the daemon's cost at a long ledger (start-up, ``status``), and of starting the command.

:func:`run_bench` measures each step in one process (best of ``repeats`` with
:func:`time.perf_counter`) and returns plain numbers, so the CLI or a report can print them.
``memcpy_gbps`` is the reference: mixing, encoding and decoding are meant to run near it.
Big buffers are freed between sections to keep the peak near ``(neighbours + 2) * 4 * params``
bytes (about 2 GB at the defaults).  :func:`run_ledger_bench` builds a node home whose ledger
holds what a node writes over many rounds, then starts the real daemon on it.
:func:`cli_start_seconds` is the CPU a command that trains nothing costs before it starts.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gossip.catalog import ComponentKind, ComponentSpec
from gossip.envelope import digest
from gossip.identity import Identity, verify_signature
from p2pfed.codec import decode_payload, encode_payload, encode_payload_bytes, encoded_size
from p2pfed.components import FlatLayout
from p2pfed.consensus import mix_into
from p2pfed.lineage import Lineage

logger = logging.getLogger(__name__)

BENCH_COMPONENT = ComponentSpec("backbone.bench", ComponentKind.BACKBONE)
SIGNED_MESSAGE_BYTES = 200


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _rate(fn: Callable[[], object], min_seconds: float) -> float:
    """Operations per second of ``fn``, run in growing batches for at least ``min_seconds``."""
    fn()
    ops = 0
    batch = 1
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_seconds:
        for _ in range(batch):
            fn()
        ops += batch
        batch *= 2
        elapsed = time.perf_counter() - start
    return ops / max(elapsed, 1e-9)


def bench_layout(params: int) -> FlatLayout:
    """A two-tensor layout of ``params`` float32 elements (a weight matrix and a vector)."""
    cols = 1024 if params >= 1024 else 1
    rows = params // cols
    return FlatLayout.from_shapes({"bias": (params - rows * cols,), "weight": (rows, cols)})


def bench_memcpy(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats)
    return nbytes / seconds / 1e9


def bench_mix(params: int, neighbours: int, repeats: int) -> float:
    inputs = [torch.full((params,), float(k + 1)) for k in range(neighbours + 1)]
    out = torch.empty(params)
    weight = 1.0 / len(inputs)
    terms = [(weight, x) for x in inputs]
    seconds = _best_seconds(lambda: mix_into(out, terms), repeats)
    read = sum(x.numel() * x.element_size() for x in inputs)
    return read / seconds / 1e9


def _encode_decode(layout: FlatLayout, repeats: int) -> tuple[float, float, float, bytes]:
    """Encode into a reusable buffer, then decode it in place; returns seconds and wire bytes."""
    name = BENCH_COMPONENT.name
    flat = torch.randn(layout.numel)
    out = bytearray(encoded_size(layout, name, 1))
    encode_s = _best_seconds(lambda: encode_payload(name, 1, flat, layout, out), repeats)
    wire = encode_payload(name, 1, flat, layout, out)
    decode_s = _best_seconds(
        lambda: decode_payload(wire, expected_component=name, expected_layout=layout), repeats
    )
    digest_s = _best_seconds(lambda: digest(wire), repeats)
    return encode_s, decode_s, digest_s, bytes(wire)


def bench_codec(params: int, repeats: int) -> dict[str, float]:
    layout = bench_layout(params)
    encode_s, decode_s, digest_s, frozen = _encode_decode(layout, repeats)
    gc.collect()
    decode_copy_s = _best_seconds(lambda: decode_payload(frozen), repeats)
    nbytes = layout.nbytes
    return {
        "encode_gbps": nbytes / encode_s / 1e9,
        "decode_gbps": nbytes / decode_s / 1e9,
        "decode_copy_gbps": nbytes / decode_copy_s / 1e9,
        "digest_gbps": len(frozen) / digest_s / 1e9,
    }


def bench_signatures(min_seconds: float) -> dict[str, float]:
    identity = Identity.generate()
    message = bytes(range(256))[:SIGNED_MESSAGE_BYTES]
    signature = identity.sign(message)
    public_key = identity.public_key
    return {
        "sign_per_s": _rate(lambda: identity.sign(message), min_seconds),
        "verify_per_s": _rate(
            lambda: verify_signature(public_key, message, signature), min_seconds
        ),
    }


def run_bench(
    *,
    memcpy_mb: int = 256,
    mix_params: int = 50_000_000,
    neighbours: int = 8,
    repeats: int = 3,
    crypto_seconds: float = 0.5,
) -> dict[str, float]:
    """Measure the data path; every ``*_gbps`` value is GB (1e9 bytes) per second.

    ``mix_gbps`` counts the bytes of every input read (self and ``neighbours``);
    ``encode_gbps``/``decode_gbps`` count tensor bytes (decode from a writable buffer, zero
    copy, with validation); ``decode_copy_gbps`` decodes from immutable ``bytes`` (one copy);
    ``digest_gbps`` counts wire bytes.
    """
    if memcpy_mb <= 0 or mix_params <= 0 or neighbours < 0 or repeats <= 0:
        raise ValueError("bench sizes must be positive")
    results: dict[str, float] = {
        "params": float(mix_params),
        "neighbours": float(neighbours),
        "torch_threads": float(torch.get_num_threads()),
        "cpu_count": float(os.cpu_count() or 1),
    }
    logger.info("bench: memcpy of %d MB", memcpy_mb)
    results["memcpy_gbps"] = bench_memcpy(memcpy_mb * 1_000_000, repeats)
    gc.collect()
    logger.info("bench: mixing %d params over %d neighbours", mix_params, neighbours)
    results["mix_gbps"] = bench_mix(mix_params, neighbours, repeats)
    gc.collect()
    logger.info("bench: payload codec and digest")
    results.update(bench_codec(mix_params, repeats))
    gc.collect()
    logger.info("bench: ed25519 sign/verify")
    results.update(bench_signatures(crypto_seconds))
    return results


# ---------------------------------------------------------------------------- the command
def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_cpu_seconds(argv: Sequence[str]) -> float:
    """CPU seconds (user + system) of ``python -m p2pfed ARGV`` in a child process.

    A failing command counts too (its exit code is not checked): ``status`` without a daemon
    costs what any client costs.  Not thread-safe: the children of other threads would count.
    """
    before = _children_cpu()
    subprocess.run([sys.executable, "-m", "p2pfed", *argv], stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return _children_cpu() - before


def cli_start_seconds(runs: int = 5) -> float:
    """``cli_start_s``: median CPU seconds of ``python -m p2pfed --help`` over ``runs`` runs
    (interpreter start, the command line's imports and its help; the model is never loaded)."""
    if runs < 1:
        raise ValueError("cli_start_seconds needs at least one run")
    return statistics.median(child_cpu_seconds(["--help"]) for _ in range(runs))


# ---------------------------------------------------------------------------- long ledgers
BENCH_LISTEN = "/ip4/127.0.0.1/tcp/0"
_APPEND_BATCH = 2000


def _round_entries(name: str, rnd: int, peers: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """What a node training and mixing ``name`` writes in one round (checkpoints aside)."""
    from p2pfed.journal import Contribution, LocalUpdate, Mix, MixInputRef, Record

    state, lineage = digest(b"%d" % rnd), Lineage.of(peers)
    records: list[Record] = [LocalUpdate(name, rnd, state, True, digest(state), lineage, 0)]
    records += [Contribution(p, name, rnd, digest(p.encode() + state), 0.2, lineage)
                for p in peers]
    records.append(Mix(name, rnd, 0.2, tuple(MixInputRef(p, 0.2, digest(p.encode() + state))
                                             for p in peers), (), lineage, 0, "mh"))
    return [(r.KIND, r.to_body()) for r in records]


def build_bench_home(home: Path, entries: int, *, neighbours: int = 4) -> Any:
    """A member's home whose ledger holds about ``entries`` entries of the kinds a node writes.

    Per round and held component: a local update, one contribution per neighbour and a mix;
    every few rounds a checkpoint whose blob is really stored (start-up loads the newest).
    Appended in large transactions (as fast as the ledger allows); returns the config.
    """
    from gossip.identity import create_identity
    from p2pfed.blobs import BlobStore
    from p2pfed.config import Config
    from p2pfed.fedstore import create_federation
    from p2pfed.home import BLOBS_DIR, KEY_FILE, LEDGER_FILE
    from p2pfed.journal import Checkpoint
    from p2pfed.ledger import Ledger
    from p2pfed.runtime.daemon import CHECKPOINT_EVERY

    config = Config().with_overrides(node__listen=(BENCH_LISTEN,), rounds__interval_s=3600.0,
                                     rounds__timeout_s=3600.0)
    identity = create_identity(home / KEY_FILE)
    peers = [Identity.generate().peer_id for _ in range(neighbours)]
    blobs = BlobStore(home / BLOBS_DIR, fsync=False)
    layout = FlatLayout.from_shapes({"flat": (config.components.dim,)})
    names = list(config.components.hold)
    with Ledger.open(home / LEDGER_FILE, identity, timestamp_ms=1) as ledger:
        create_federation(home, identity, ledger, name="bench", catalog=names, modules=names,
                          addresses=[], round_period_ms=1000, now_ms=1)
        pending: list[tuple[str, dict[str, Any], int]] = []
        rnd = 0
        while len(ledger) + len(pending) < entries:
            rnd += 1
            for name in names:
                pending += [(k, b, rnd) for k, b in _round_entries(name, rnd, peers)]
                if rnd % CHECKPOINT_EVERY == 0:
                    flat = torch.full((config.components.dim,), float(rnd))
                    key = blobs.put(encode_payload_bytes(name, rnd, flat, layout))
                    ck = Checkpoint(name, rnd, key, Lineage.of(peers), {"radius": 0.0})
                    pending.append((ck.KIND, ck.to_body(), rnd))
            if len(pending) >= _APPEND_BATCH:
                ledger.append_many(pending)
                pending = []
        ledger.append_many(pending)
    return config


def _daemon_figures(home: Path, config: Any, statuses: int) -> tuple[float, float, float]:
    """(seconds from start to READY, CPU seconds of the cheapest of ``statuses`` status calls,
    CPU seconds of the cheapest ``p2pfed status --json`` client process) of the real daemon
    started on ``home``."""
    import trio

    from gossip.transport import libp2p  # noqa: F401  (imported once, outside the timing)
    from p2pfed.runtime.control import SOCKET_NAME, request
    from p2pfed.runtime.daemon import Daemon
    from p2pfed.runtime.systemd import Notifier

    figures: dict[str, float] = {}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            start = time.perf_counter()
            await nursery.start(Daemon(home, config, Notifier({})).run)
            figures["startup"] = time.perf_counter() - start
            best = float("inf")
            for _ in range(statuses):
                cpu = time.process_time()
                await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
                best = min(best, time.process_time() - cpu)
            figures["status"] = best
            client = ["status", "--json", "--home", str(home)]
            figures["client"] = min([await trio.to_thread.run_sync(child_cpu_seconds, client)
                                     for _ in range(statuses)])
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    return figures["startup"], figures["status"], figures["client"]


def run_ledger_bench(entries: int = 100_000, *, statuses: int = 3) -> dict[str, float]:
    """Start-up and ``status`` of the daemon at a ledger of ``entries`` entries.

    ``ledger_verify_s_<n>k``: CPU seconds to verify every entry (what each ``status`` and each
    start-up cost before the verified mark; ``p2pfed ledger verify`` still does it);
    ``startup_s_<n>k``: seconds from starting the daemon to READY (the ledger verified up to
    its mark, as after a clean stop); ``status_s_<n>k``: CPU seconds of one ``status`` over
    the control socket, in the daemon; ``status_client_s_<n>k``: CPU seconds of the
    ``p2pfed status --json`` process that asks for it; ``startup_s_new``: the same start-up at
    a new member's ledger.
    """
    from gossip.identity import load_identity
    from p2pfed.home import KEY_FILE, LEDGER_FILE
    from p2pfed.ledger import Ledger

    if entries < 10:
        raise ValueError("the ledger bench needs at least 10 entries")
    tag = f"{entries // 1000}k" if entries >= 1000 else str(entries)
    results: dict[str, float] = {"ledger_entries": float(entries)}
    with tempfile.TemporaryDirectory(prefix="p2pfed-bench-") as tmp:
        fresh = Path(tmp) / "new"
        fresh.mkdir(mode=0o700)
        results["startup_s_new"] = _daemon_figures(fresh, build_bench_home(fresh, 10), 1)[0]
        home = Path(tmp) / "long"
        home.mkdir(mode=0o700)
        logger.info("bench: building a ledger of %d entries", entries)
        config = build_bench_home(home, entries)
        with Ledger.open(home / LEDGER_FILE, load_identity(home / KEY_FILE)) as ledger:
            cpu = time.process_time()
            report = ledger.verify_new()  # every entry: the ledger was never verified
            results[f"ledger_verify_s_{tag}"] = time.process_time() - cpu
            results["ledger_entries"] = float(report.entries)
        logger.info("bench: starting the daemon on it")
        startup, status, client = _daemon_figures(home, config, statuses)
        results[f"startup_s_{tag}"] = startup
        results[f"status_s_{tag}"] = status
        results[f"status_client_s_{tag}"] = client
    return results


# ---------------------------------------------------------------------------- the simulator
#: (nodes, rounds) of ``bench --sim``: a random 4-regular graph, one component of SIM_PARAMS
SIM_SIZES = ((100, 20), (1000, 20))
SIM_PARAMS = 100_000
#: ``bench --sim --quick``: small enough for a test
SIM_QUICK_SIZES = ((16, 4), (24, 4))
SIM_QUICK_PARAMS = 1_000
SIM_DEGREE = 4
SIM_GRAPH_SEED = 3
SIM_HORIZON = 1  # rounds of history kept (see p2pfed.node._retention)
SIM_CHECKPOINT_EVERY = 2
SIM_DTYPE = "float32"  # (as a model's parameters: 400 KB a state at 100K)


def sim_scale_run(nodes: int, rounds: int, params: int, seed: int = 0) -> dict[str, Any]:
    """One consensus simulation on a random 4-regular graph of ``nodes`` nodes, in this process:
    its CPU per node-round (the run, not the set-up), this process's peak RSS and the consensus
    distance per round (the same seed gives the same numbers)."""
    from p2pfed.node import RetentionPolicy
    from p2pfed.sim.simulator import SimConfig, Simulation
    from p2pfed.sim.topology import parse_topology

    topology = parse_topology({
        "name": f"random-regular-{nodes}",
        "graph": {"kind": "random-regular", "n": nodes, "d": SIM_DEGREE, "seed": SIM_GRAPH_SEED},
        "components": {"backbone": "all"},
    })
    rss_start = _peak_rss_mb()
    cpu = time.process_time()
    # memory is bounded by what the nodes keep, not by the rounds: the shortest unlearning
    # horizon (each node keeps the updates since its last checkpoint but one)
    sim = Simulation(SimConfig(topology, rounds=rounds, seed=seed, dim=params, dtype=SIM_DTYPE,
                               checkpoint_every=SIM_CHECKPOINT_EVERY,
                               retention=RetentionPolicy(SIM_HORIZON)))
    setup = time.process_time() - cpu
    cpu = time.process_time()
    report = sim.run()
    run = time.process_time() - cpu
    return {
        "nodes": nodes,
        "rounds": rounds,
        "params": params,
        "dtype": SIM_DTYPE,
        "seed": seed,
        "sim_node_round_ms": 1000 * run / (nodes * rounds),
        "sim_peak_rss_mb": _peak_rss_mb(),
        "sim_start_rss_mb": rss_start,
        "sim_setup_s": setup,
        "sim_trace_peak_states": sim.trace.peak_states,
        "consensus_distance": report["components"]["backbone"]["consensus_distance"],
        "messages": report["network"]["messages"],
        "fetch_bytes": report["network"]["fetch_bytes"],
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (kilobytes on Linux)


def run_sim_bench(*, quick: bool = False, sizes: Sequence[tuple[int, int]] | None = None,
                  params: int | None = None, seed: int = 0) -> dict[str, Any]:
    """``bench --sim``: :func:`sim_scale_run` for each size, each in a fresh child process so
    that each peak RSS is its own.  ``sim_node_round_ms`` and ``sim_peak_rss_mb`` at the top
    are the largest size's; ``sim_sizes`` holds every size's figures."""
    sizes = sizes or (SIM_QUICK_SIZES if quick else SIM_SIZES)
    params = params or (SIM_QUICK_PARAMS if quick else SIM_PARAMS)
    runs = []
    for nodes, rounds in sizes:
        logger.info("bench: simulating %d nodes x %d rounds x %d parameters",
                    nodes, rounds, params)
        argv = [sys.executable, "-m", "p2pfed.bench", "--sim-child",
                str(nodes), str(rounds), str(params), str(seed)]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"simulation of {nodes} nodes failed: {done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout))
    largest = runs[-1]
    return {"sim_node_round_ms": largest["sim_node_round_ms"],
            "sim_peak_rss_mb": largest["sim_peak_rss_mb"],
            "sim_sizes": runs}


def main(argv: Sequence[str]) -> int:
    """``python -m p2pfed.bench --sim-child NODES ROUNDS PARAMS SEED``: one size of
    :func:`run_sim_bench`, its figures as JSON on stdout."""
    if len(argv) != 5 or argv[0] != "--sim-child":
        print("usage: python -m p2pfed.bench --sim-child NODES ROUNDS PARAMS SEED",
              file=sys.stderr)
        return 2
    nodes, rounds, params, seed = (int(a) for a in argv[1:])
    torch.set_num_threads(1)  # (CPU per node-round, not per core; the numbers need a fixed count)
    json.dump(sim_scale_run(nodes, rounds, params, seed), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
