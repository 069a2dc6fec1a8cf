"""Hardware profiles (issue 18): the settings a profile gives and the explicit ones that win,
their checks, what ``init`` writes, the memory cap that stops training (mixing goes on), the
unit's limits and ``status``'s ``resources``."""

from __future__ import annotations

import logging
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gossip.errors import ConfigError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.config import Config, ModelSection
from p2pfed.profiles import PROFILE_NAMES, resources_of, trained_subset
from p2pfed.runtime.loading import node_config
from p2pfed.runtime.profile import ResourceMonitor, unit_limits
from p2pfed.runtime.service import render_unit
from tests.test_participation import _node, _path, _rounds
from tests.test_status_schema import errors, load_schema

HOLDS = ("backbone", "encoder.text.lora", "head.topic", "prompt.topic")


def test_the_default_is_a_server_as_before_profiles() -> None:
    res = resources_of(Config())
    assert (res.profile, res.threads, res.max_memory_mb) == ("server", 0, 0)
    assert (res.steps, res.batch_size) == (ModelSection().steps, ModelSection().batch_size)
    assert trained_subset(Config(), HOLDS) is None  # (every held one that local data trains)
    assert node_config(Config(), frozenset(), {}).schedule is None


@pytest.mark.parametrize(("profile", "expected"), [
    ("laptop", (2, 4096, 4, 16, None)),
    ("phone", (1, 1536, 2, 8, {"head.topic", "prompt.topic"})),
])
def test_a_profile_gives_defaults(profile: str, expected: tuple[Any, ...]) -> None:
    config = Config.from_dict({"node": {"profile": profile}})
    res = resources_of(config)
    subset = trained_subset(config, HOLDS)
    assert (res.threads, res.max_memory_mb, res.steps, res.batch_size,
            None if subset is None else set(subset)) == expected


def test_explicit_settings_win_over_the_profile() -> None:
    from_file = Config.from_dict({
        "node": {"profile": "phone", "threads": 3, "max_memory_mb": 900},
        "model": {"steps": 8},  # the server's value, given explicitly: it counts
        "components": {"hold": list(HOLDS), "train": ["encoder.text.lora"]},
    })
    res = resources_of(from_file)
    assert (res.threads, res.max_memory_mb, res.steps, res.batch_size) == (3, 900, 8, 8)
    assert trained_subset(from_file, HOLDS) == {"encoder.text.lora"}
    overridden = Config().with_overrides(node__profile="phone", model__batch_size=16)
    assert (resources_of(overridden).steps, resources_of(overridden).batch_size) == (2, 16)
    built = Config(model=ModelSection(steps=3)).with_overrides(node__profile="laptop")
    assert resources_of(built).steps == 3  # (a value other than the default is a setting)


def test_inference_only_trains_nothing_whatever_the_profile() -> None:
    for profile in PROFILE_NAMES:
        config = Config.from_dict({"node": {"profile": profile, "inference_only": True},
                                   "components": {"hold": list(HOLDS),
                                                  "train": ["head.topic"]}})
        assert trained_subset(config, HOLDS) == frozenset()


@pytest.mark.parametrize(("node", "message"), [
    ({"profile": "toaster"}, "node.profile must be one of server, laptop, phone, not 'toaster'"),
    ({"profile": 2}, "node.profile must be a string"),
    ({"threads": -1}, "node.threads must be 0 (the profile's) to 1024"),
    ({"threads": 1.5}, "node.threads must be an integer"),
    ({"max_memory_mb": -5}, "node.max_memory_mb must be 0 (the profile's) or a size in MB"),
    ({"inference_only": "yes"}, "node.inference_only must be true or false"),
])
def test_bad_profile_settings_are_refused_by_name(node: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_dict({"node": node})


def test_the_written_file_follows_its_profile_until_a_setting_is_given() -> None:
    text = Config().with_overrides(node__profile="phone").to_toml()
    assert 'profile = "phone"  # server | laptop | phone: trains heads and prompts' in text
    assert "threads = 0  # 0: the profile's (phone: 1)" in text
    assert "# steps = 2  # the phone profile's; uncomment to set it" in text
    assert "# batch_size = 8  # the phone profile's" in text
    read = Config.from_dict(tomllib.loads(text))
    assert resources_of(read).steps == 2 and not read.is_set("model.steps")
    # the operator changes the profile: the settings left to it follow
    laptop = Config.from_dict(tomllib.loads(text.replace('profile = "phone"',
                                                         'profile = "laptop"')))
    assert (resources_of(laptop).steps, resources_of(laptop).threads) == (4, 2)
    explicit = Config().with_overrides(node__profile="phone", model__steps=5).to_toml()
    assert "\nsteps = 5\n" in explicit
    assert Config.from_dict(tomllib.loads(explicit)).model.steps == 5


def test_init_writes_the_profile_and_a_bad_one_is_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "phone"
    assert main(["init", "--home", str(home), "--profile", "phone"]) == 0
    config = Config.from_toml(home / "p2pfed.toml")
    assert config.node.profile == "phone" and resources_of(config).batch_size == 8
    capsys.readouterr()
    assert main(["init", "--home", str(tmp_path / "x"), "--profile", "toaster"]) \
        == exitcodes.USAGE
    assert "unknown profile 'toaster'; choose server, laptop, phone" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["run", "--home", str(home), "--profile", "fridge"]) == exitcodes.USAGE


def test_run_profile_overrides_the_files_for_that_run_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfed.runtime.daemon import Daemon

    home = tmp_path / "home"
    assert main(["init", "--home", str(home)]) == 0
    seen: list[Config] = []

    async def fake_run(self: Daemon, **_kwargs: object) -> None:
        seen.append(self.config)

    monkeypatch.setattr(Daemon, "run", fake_run)
    assert main(["run", "--home", str(home), "--profile", "laptop"]) == 0
    assert main(["run", "--home", str(home)]) == 0
    assert [c.node.profile for c in seen] == ["laptop", "server"]
    assert resources_of(seen[0]).steps == 4  # (init left steps to the profile)
    assert Config.from_toml(home / "p2pfed.toml").node.profile == "server"


# ---------------------------------------------------------------- the memory cap
class FakeMemory:
    def __init__(self) -> None:
        self.mb = 100.0

    def __call__(self) -> float:
        return self.mb


def test_past_the_cap_training_stops_once_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    memory, ticks = FakeMemory(), iter(float(t) for t in range(100))
    res = resources_of(Config().with_overrides(node__profile="laptop"))
    monitor = ResourceMonitor(res, rss_mb=memory, clock=lambda: next(ticks))
    run = monitor.wrap(lambda _request: 0.5)
    assert run(None) == 0.5 and monitor.allows(0)
    assert math.isnan(monitor.wrap(lambda _request: float("nan"))(None))  # (not counted)
    memory.mb = 5000.0
    with caplog.at_level(logging.WARNING):
        run(None)
        assert not monitor.allows(0) and not monitor.allows(1)
    memory.mb = 100.0  # (the peak never falls: stopped until a restart)
    assert not monitor.allows(2)
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "training stops, mixing goes on" in caplog.records[0].message
    status = monitor.status()
    assert status["training"] == "stopped: memory cap" and status["max_memory_mb"] == 4096
    assert status["peak_rss_mb"] == 5000.0
    assert status["round_s"] == {"rounds": 2, "last": 1.0, "mean": 1.0}
    schema = load_schema()
    assert errors(status, {"$ref": "#/$defs/resources", "$defs": schema["$defs"]}) == []


@pytest.mark.parametrize("resettable", [True, False])
def test_the_cap_counts_from_the_end_of_start_up_where_the_peak_can_be_reset(
        resettable: bool) -> None:
    """Loading the model may peak past the cap once; training is stopped by its own peak only
    (where the kernel's high-water mark can be reset; elsewhere start-up still counts)."""
    memory = FakeMemory()
    res = resources_of(Config().with_overrides(node__profile="laptop"))  # (cap 4096 MB)
    monitor = ResourceMonitor(res, rss_mb=memory, clock=lambda: 0.0)
    monitor.start()
    memory.mb = 5000.0  # the model's loading peak

    def reset() -> bool:
        if resettable:
            memory.mb = 900.0  # what the process holds once loaded
        return resettable

    monitor.loaded(reset)
    status = monitor.status()
    assert status["startup_rss_mb"] == 5000.0
    assert monitor.allows(0) is resettable
    assert status["peak_rss_mb"] == (900.0 if resettable else 5000.0)
    schema = load_schema()
    assert errors(status, {"$ref": "#/$defs/resources", "$defs": schema["$defs"]}) == []
    if resettable:
        memory.mb = 4500.0  # training's own peak past the cap still stops it
        assert not monitor.allows(1)


def test_status_says_it_in_a_line() -> None:
    from p2pfed.cli_daemon import resources_line

    res = {"profile": "phone", "threads": {"configured": 1, "torch": 1, "interop": 1,
                                           "training": 1},
           "peak_rss_mb": 1700.4, "max_memory_mb": 1536, "training": "stopped: memory cap",
           "round_s": {"rounds": 4, "last": 2.5, "mean": 2.25}}
    assert resources_line(res) == (
        "profile phone: training [yellow]stopped: memory cap[/yellow]; threads 1 (torch 1); "
        "peak memory 1,700 MB of 1536 MB; training rounds took 2.50 s (mean 2.25 s over 4)")
    server = {**res, "profile": "server", "threads": {"configured": 0, "torch": 16,
                                                      "interop": 16, "training": None},
              "max_memory_mb": None, "training": "on",
              "round_s": {"rounds": 0, "last": None, "mean": None}}
    assert resources_line(server) == ("profile server: training on; threads torch's default "
                                      "(torch 16); peak memory 1,700 MB (no cap)")


def test_a_server_has_no_gate_and_an_inference_only_member_says_so() -> None:
    assert ResourceMonitor(resources_of(Config())).gate(5000) is None
    res = resources_of(Config().with_overrides(node__inference_only=True))
    assert ResourceMonitor(res, rss_mb=lambda: 1.0).status()["training"] == "inference-only"


def test_a_node_past_its_cap_records_untrained_rounds_and_goes_on_mixing() -> None:
    memory = FakeMemory()
    res = resources_of(Config().with_overrides(node__profile="phone"))
    monitor = ResourceMonitor(res, rss_mb=memory)
    gated = node_config(Config(), frozenset({"backbone"}), {}, gate=monitor.gate(5000))
    assert gated.schedule is not None
    nodes = [_node(0, schedule=gated.schedule), _node(1)]
    _path(nodes)
    trained: list[tuple[str, str, int]] = []
    _rounds(nodes, 3, trained)
    memory.mb = 2000.0  # (past phone's 1536 MB)
    _rounds(nodes, 6, trained, start=3)
    updates = [e.body for e in nodes[0].ledger.entries("local-update")]
    assert [u["trained"] for u in updates] == [True] * 3 + [False] * 3
    assert all(n.round_of("backbone") == 6 for n in nodes)  # (it mixed in every round)
    assert len(list(nodes[0].ledger.entries("mix"))) == 6


def test_hours_and_the_cap_both_decide() -> None:
    config = Config().with_overrides(rounds__train_hours="0-23")
    schedule = node_config(config, frozenset(), {}, gate=lambda _ms: False).schedule
    assert schedule is not None and not schedule(0)


# ---------------------------------------------------------------- the systemd unit
def test_the_unit_gets_limits_only_with_a_cap() -> None:
    def limits(profile: str) -> list[str]:
        return unit_limits(resources_of(Config().with_overrides(node__profile=profile)))

    assert limits("server") == []
    assert limits("laptop") == ["MemoryMax=5120M", "CPUQuota=200%"]
    assert limits("phone") == ["MemoryMax=1920M", "CPUQuota=100%"]
    unit = render_unit(limits=limits("phone"))
    service = unit.split("[Service]")[1].split("[Install]")[0]
    assert "\nMemoryMax=1920M\nCPUQuota=100%\n" in service
    assert render_unit(limits=[]) == render_unit()


# ---------------------------------------------------------------- a phone's daemon
@pytest.mark.network
def test_a_phone_daemon_trains_only_its_heads_and_keeps_to_its_threads(tmp_path: Path) -> None:
    import torch
    import trio

    from gossip.identity import load_identity
    from p2pfed.ledger import Ledger
    from p2pfed.runtime.control import SOCKET_NAME, request
    from p2pfed.runtime.daemon import Daemon
    from p2pfed.runtime.systemd import Notifier
    from tests.test_daemon import tiny_topic_home

    home = tiny_topic_home(tmp_path / "home")
    config = Config.from_toml(home / "p2pfed.toml").with_overrides(node__profile="phone")
    daemon = Daemon(home, config, Notifier({}))
    statuses: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(120):
                while not statuses or statuses[-1]["rounds_completed"] < 3:
                    await trio.sleep(0.2)
                    statuses.append(await trio.to_thread.run_sync(request, home / SOCKET_NAME,
                                                                  "status"))
            nursery.cancel_scope.cancel()

    threads = torch.get_num_threads()
    try:
        trio.run(scenario)
    finally:
        torch.set_num_threads(threads)  # (the daemon ran in this process)
    status = statuses[-1]
    assert errors(status, load_schema()) == []
    res = status["resources"]
    assert res["profile"] == "phone" and res["training"] == "on"
    assert res["threads"]["configured"] == 1 and res["threads"]["torch"] <= 1
    assert res["threads"]["training"] == 1  # (as the training thread saw them)
    assert res["max_memory_mb"] == 1536 and res["round_s"]["rounds"] >= 1
    assert res["startup_rss_mb"] > 0
    model = status["model"]  # (where the model runs, and over which text model)
    assert (model["device"], model["precision"]) == ("cpu", "fp32")
    assert model["text_model"].startswith("tiny: bert encoder, 2 layers of 32")
    assert len(model["text_digest"]) == 64
    ident = load_identity(home / "identity.key")
    with Ledger.open(home / "ledger.sqlite3", ident) as ledger:
        updates = [e.body for e in ledger.entries("local-update")]
    assert {u["component"] for u in updates} == {"encoder.text.lora", "head.topic"}
    assert {u["component"] for u in updates if u["trained"]} == {"head.topic"}


def test_a_phone_whose_rounds_take_longer_than_the_interval_keeps_pace() -> None:
    """The measured mean training time decides: within the interval every round trains;
    past it, the next training waits until the last one is an interval behind it."""
    clock = iter([0.0, 6.0, 10.0, 16.0])  # two training rounds of 6 s each
    res = resources_of(Config().with_overrides(node__profile="phone"))
    monitor = ResourceMonitor(res, rss_mb=lambda: 1.0, clock=lambda: next(clock))
    gate = monitor.gate(2000)
    assert gate is not None and gate(0) and gate(1000)  # (no round measured: every round)
    run = monitor.wrap(lambda _request: 0.5)
    run(None)
    run(None)
    assert monitor.mean_ms() == 6000.0
    assert [gate(t) for t in (20_000, 21_000, 27_999, 28_000)] == [True, False, False, True]
    laptop = resources_of(Config().with_overrides(node__profile="laptop"))
    assert ResourceMonitor(laptop, rss_mb=lambda: 1.0).gate(2000) is not None
