"""Members agree on the text model: the identity, the genesis that carries it, the refusals
at join and at start, and the ledger entry that ties checkpoints to their base."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import trio

from gossip.identity import Identity, load_identity
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.config import Config
from p2pfed.fedstore import FederationStore
from p2pfed.journal import BaseModel, read
from p2pfed.ledger import Ledger
from p2pfed.model.agreement import POLICY, SUMMARY_POLICY, record_base, text_identity
from p2pfed.runtime.control import SOCKET_NAME, request
from p2pfed.runtime.daemon import Daemon
from p2pfed.runtime.localfed import free_ports
from p2pfed.runtime.systemd import Notifier
from tests.tiny_hf import save_tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny BERTs: ``a`` and ``a-again`` the same model saved twice, ``b`` the same shapes
    with other weights."""
    base = tmp_path_factory.mktemp("models")
    return {"a": save_tiny(base / "tiny-a", "bert", seed=1),
            "a-again": save_tiny(base / "tiny-a-again", "bert", seed=1),
            "b": save_tiny(base / "tiny-b", "bert", seed=2)}


def m3t_config(text_model: Path | str, lora_layers: list[int] | None = None) -> Config:
    return Config.from_dict({"model": {"kind": "m3t", "text_model": str(text_model),
                                       "lora_layers": lora_layers or [-1]}})


def test_same_shapes_other_weights_differ_and_the_same_model_agrees_however_it_is_named(
        models: dict[str, Path]) -> None:
    a, again, b = (text_identity(m3t_config(models[k])) for k in ("a", "a-again", "b"))
    assert a["digest"] == again["digest"]  # (another directory, the same model)
    assert a["digest"] != b["digest"]
    assert (a["hidden"], a["layers"]) == (b["hidden"], b["layers"])  # same shapes
    assert a["summary"].startswith("tiny-a: bert encoder, 2 layers of 32")
    top = text_identity(m3t_config(models["a"], [1]))
    assert top["digest"] == a["digest"]  # -1 is the top layer, 1, of this 2-layer model
    assert text_identity(m3t_config(models["a"], [0]))["digest"] != a["digest"]


def test_the_identity_is_hashed_once_per_model_files_and_settings(
        models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import shutil

    from p2pfed.model import textbase

    model = shutil.copytree(models["a"], tmp_path / "model")
    cache = tmp_path / "home" / "cache"
    first = text_identity(m3t_config(model), cache)

    def no_load(kind: str) -> None:
        raise AssertionError("loaded the model again")

    monkeypatch.setattr(textbase, "load_text_base", no_load)
    assert text_identity(m3t_config(model), cache) == first  # (from the cache: not loaded)
    monkeypatch.undo()
    assert text_identity(m3t_config(model, [0]), cache)["digest"] != first["digest"]
    # new weights in the same place (another time stamp): hashed again, not taken on trust
    weights = model / "model.safetensors"
    shutil.copyfile(models["b"] / "model.safetensors", weights)
    os.utime(weights, ns=(1, 1))
    assert text_identity(m3t_config(model), cache)["digest"] != first["digest"]
    (cache / "text-identity.json").write_text("{not json")  # a damaged cache: only slower
    assert text_identity(m3t_config(models["a"]), cache)["digest"] == first["digest"]


def make_home(home: Path, text_model: Path | str, *, hold: str = "encoder.text.lora",
              listen: str = "/ip4/127.0.0.1/tcp/0") -> Path:
    assert main(["init", "--home", str(home), "--listen", listen, "--hold", hold,
                 "--interval", "0.5", "--timeout", "2"]) == 0
    data = tomllib.loads((home / "p2pfed.toml").read_text(encoding="utf-8"))
    data["model"] = {"kind": "m3t", "text_model": str(text_model), "lora_layers": [-1]}
    (home / "p2pfed.toml").write_text(Config.from_dict(data).to_toml(), encoding="utf-8")
    return home


def invite(founder: Path, capsys: pytest.CaptureFixture[str], *bootstrap: str) -> str:
    """A token for three members (the bootstrap address: its running daemon's, or one given)."""
    capsys.readouterr()
    args = [a for b in bootstrap for a in ("--bootstrap", b)]
    assert main(["invite", "--home", str(founder), "--uses", "3", *args]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_the_genesis_carries_the_founders_text_model_and_a_member_with_another_is_refused(
        tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    founder = make_home(tmp_path / "founder", models["a"])
    assert main(["federation", "create", "school", "--home", str(founder)]) == 0
    genesis = FederationStore(founder).genesis()
    expected = text_identity(m3t_config(models["a"]))
    assert genesis.policy(POLICY) == expected["digest"]
    assert genesis.policy(SUMMARY_POLICY) == expected["summary"]
    token = invite(founder, capsys, "/ip4/127.0.0.1/tcp/4001")

    other = make_home(tmp_path / "other", models["b"])
    assert main(["join", token, "--home", str(other)]) == exitcodes.CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "refusing to join 'school'" in err
    assert expected["summary"] in err and "tiny-b: bert encoder" in err
    assert "[model] text_model, lora_layers and lora_targets" in err
    assert not (other / "federation").exists() and not (other / "ledger.sqlite3").exists()

    same = make_home(tmp_path / "same", models["a-again"])
    assert main(["join", token, "--home", str(same)]) == 0
    assert FederationStore(same).genesis() == genesis

    # a member that does not hold the text adapter is not asked about it
    image = make_home(tmp_path / "image", models["b"], hold="encoder.image")
    assert main(["join", token, "--home", str(image)]) == 0

    # the member changes its text model after joining: its daemon refuses to start, and
    # writes nothing
    toml = (same / "p2pfed.toml").read_text(encoding="utf-8")
    (same / "p2pfed.toml").write_text(toml.replace(str(models["a-again"]), str(models["b"])),
                                      encoding="utf-8")
    ident = load_identity(same / "identity.key")
    with Ledger.open(same / "ledger.sqlite3", ident) as ledger:
        before = len(ledger)
    capsys.readouterr()
    assert main(["run", "--home", str(same)]) == exitcodes.CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "refusing to start in 'school'" in err and "put [model] text_model" in err.lower()
    with Ledger.open(same / "ledger.sqlite3", ident) as ledger:
        assert len(ledger) == before


def test_a_federation_without_a_text_model_records_none(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--hold", "encoder.text.lora"]) == 0  # (the consensus workload: no model)
    assert main(["federation", "create", "plain", "--home", str(home)]) == 0
    assert FederationStore(home).genesis().policies == ()


def test_the_base_model_entry_is_written_once_per_base(tmp_path: Path) -> None:
    ident = {"digest": "ab" * 32, "summary": "tiny: bert encoder"}
    with Ledger.open(tmp_path / "ledger.sqlite3", Identity.generate()) as ledger:
        assert record_base(ledger, ident, 1)
        assert not record_base(ledger, ident, 2)
        assert record_base(ledger, {**ident, "digest": "cd" * 32}, 3)
        bases = [s.record for s in read(ledger.entries(BaseModel.KIND), BaseModel)]
        assert [b.digest[:2] for b in bases] == ["ab", "cd"]
        assert ledger.verify().ok


@pytest.mark.network
@pytest.mark.slow
def test_real_daemons_admit_the_member_with_the_same_model_and_the_other_is_refused(
        tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    ports = free_ports(3)
    homes = [make_home(tmp_path / f"node-{i}", model, listen=f"/ip4/127.0.0.1/tcp/{ports[i]}")
             for i, model in enumerate((models["a"], models["b"], models["a-again"]))]
    assert main(["federation", "create", "school", "--home", str(homes[0])]) == 0
    founder = load_identity(homes[0] / "identity.key").peer_id
    token = invite(homes[0], capsys, f"/ip4/127.0.0.1/tcp/{ports[0]}/p2p/{founder}")
    assert main(["join", token, "--home", str(homes[1])]) == exitcodes.CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "refusing to join 'school'" in err and "tiny-a:" in err and "tiny-b:" in err
    assert main(["join", token, "--home", str(homes[2])]) == 0
    admitted: list[dict[str, object]] = []

    async def federation() -> None:  # (both daemons in this process: no second start-up)
        async with trio.open_nursery() as nursery:
            for home in (homes[0], homes[2]):
                daemon = Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({}))
                await nursery.start(daemon.run)
            with trio.fail_after(30):
                while not admitted:
                    st = await trio.to_thread.run_sync(request, homes[2] / SOCKET_NAME,
                                                       "status")
                    if st["member"] and st["members"] == 2 and st["rounds_completed"] >= 1:
                        admitted.append(st)
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(federation)
    for home in (homes[0], homes[2]):
        with Ledger.open(home / "ledger.sqlite3", load_identity(home / "identity.key"),
                         create=False) as ledger:
            bases = [s.record.summary for s in read(ledger.entries(BaseModel.KIND), BaseModel)]
            assert ledger.verify().ok
        assert len(bases) == 1 and "bert encoder, 2 layers of 32" in bases[0]
        assert main(["ledger", "verify", "--home", str(home)]) == 0  # (its schema too)
    # the text adapter's checkpoint is exported with its base named, and never loaded onto
    # another one
    member = homes[2]
    assert main(["export", "encoder.text.lora", str(tmp_path / "out"), "--home", str(member)]) == 0
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert f"identity `{text_identity(m3t_config(models['a']))['digest']}`" in readme
    toml = (member / "p2pfed.toml").read_text(encoding="utf-8")
    (member / "p2pfed.toml").write_text(toml.replace(str(models["a-again"]), str(models["b"])),
                                        encoding="utf-8")
    capsys.readouterr()
    assert main(["export", "encoder.text.lora", str(tmp_path / "out2"),
                 "--home", str(member)]) == exitcodes.CONFIG
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint was trained over 'tiny-a-again:" in err and "now gives 'tiny-b:" in err
