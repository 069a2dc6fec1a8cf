"""``p2pfed export``: a pipeline from one checkpoint round, a portable adapter, no overwrites."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gossip.errors import LocalError
from gossip.identity import load_identity
from p2pfed import exitcodes
from p2pfed.blobs import BlobStore
from p2pfed.cli import main
from p2pfed.codec import encode_payload_bytes
from p2pfed.config import Config
from p2pfed.fedstore import FederationStore
from p2pfed.journal import Checkpoint, Stored, write
from p2pfed.ledger import Ledger
from p2pfed.lineage import Lineage
from p2pfed.model.local import build_model
from p2pfed.model.predict import common_round
from p2pfed.model.train import LocalTrainer

TEXT = "encoder.text.lora"


def ck(index: int, component: str, round_: int, lineage: tuple[str, ...] = ("me",),
       ) -> Stored[Checkpoint]:
    return Stored(index, 0, Checkpoint(component, round_, bytes([index]) * 32,
                                       Lineage.of(lineage)))


def test_a_pipeline_is_read_from_the_latest_round_all_of_it_has_clean() -> None:
    entries = [ck(1, TEXT, 0), ck(2, "head.topic", 0), ck(3, TEXT, 5), ck(4, "head.topic", 5),
               ck(5, "head.topic", 10), ck(6, TEXT, 10, ("me", "gone")), ck(7, "head.topic", 15),
               ck(8, TEXT, 5)]  # round 5 again, after a rollback: the later entry counts
    round_, found = common_round(entries, {"gone"}, [TEXT, "head.topic"])
    assert round_ == 5 and found[TEXT].digest == bytes([8]) * 32
    assert found["head.topic"].digest == bytes([4]) * 32
    assert common_round(entries, set(), [TEXT, "head.topic"])[0] == 10
    assert common_round(entries, {"gone"}, ["head.topic"])[0] == 15  # a component alone
    with pytest.raises(LocalError, match="no checkpoint of backbone yet"):
        common_round(entries, set(), [TEXT, "backbone"])
    apart = [ck(1, TEXT, 5), ck(2, "head.topic", 10)]
    with pytest.raises(LocalError, match=r"no checkpoint of one round in common .latest: "
                                         r"encoder\.text\.lora round 5, head\.topic round 10"):
        common_round(apart, set(), [TEXT, "head.topic"])


def checkpointed_home(tmp_path: Path, rounds: dict[str, list[int]],
                      ) -> tuple[Path, dict[tuple[str, int], torch.Tensor]]:
    """An m3t home (tiny text model) whose ledger has checkpoints of random states at
    ``rounds`` per component; returns it and the states, per (component, round)."""
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--hold", TEXT, "--hold", "head.topic"]) == 0
    config = Config.from_toml(home / "p2pfed.toml").with_overrides(
        model__kind="m3t", model__text_model="tiny", model__lora_layers=(1,))
    (home / "p2pfed.toml").write_text(config.to_toml(), encoding="utf-8")
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    identity = load_identity(home / "identity.key")
    states = {}
    with Ledger.open(home / "ledger.sqlite3", identity) as ledger:
        fid = FederationStore(home).view(ledger).federation_id
        flats = LocalTrainer(build_model(config, [TEXT, "head.topic"], fid), {}, 0).flats
        blobs = BlobStore(home / "blobs")
        gen = torch.Generator().manual_seed(0)
        for component, numbers in rounds.items():
            layout = flats[component].layout
            for r in numbers:
                state = torch.randn(layout.numel, generator=gen) * 0.1
                digest = blobs.put(encode_payload_bytes(component, r, state, layout))
                write(ledger, Checkpoint(component, r, digest, Lineage.of([identity.peer_id])),
                      now_ms=1000 + r)
                states[component, r] = state
    return home, states


def test_export_of_a_head_writes_its_pipeline_from_one_round_and_never_overwrites(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, states = checkpointed_home(tmp_path, {TEXT: [0, 5], "head.topic": [0, 5, 10]})
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", "head.topic", str(out), "--home", str(home)]) == 0
    assert "exported head.topic (round 5)" in " ".join(capsys.readouterr().out.split())
    head = load_file(str(out / "head.topic.safetensors"))
    expected = states["head.topic", 5]
    flat = torch.cat([head["bias"], head["weight"].reshape(-1)])  # slots in name order
    assert torch.equal(flat, expected) and not torch.equal(flat, states["head.topic", 10])
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "round 5" in readme and "PeftModel.from_pretrained" in readme
    # the adapter alone: its own latest round
    assert main(["export", TEXT, str(tmp_path / "adapter"), "--home", str(home)]) == 0
    assert "exported encoder.text.lora (round 5)" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "adapter" / "head.topic.safetensors").exists()

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    for place in (out, tmp_path / "file"):
        assert main(["export", "head.topic", str(place), "--home", str(home)]) \
            == exitcodes.FAILURE
        err = capsys.readouterr().err
        assert "add --force to write over it" in " ".join(err.split()) and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp_path / "file").read_text(encoding="utf-8") == "mine"
    for place in (out, tmp_path / "file"):
        assert main(["export", "head.topic", str(place), "--home", str(home), "--force"]) == 0
        assert load_file(str(place / "head.topic.safetensors")).keys() == head.keys()
    assert main(["export", "head.digits", str(tmp_path / "d"), "--home", str(home)]) \
        == exitcodes.FAILURE
    assert "no checkpoint of encoder.image, backbone, head.digits yet" in " ".join(
        capsys.readouterr().err.split())


def test_an_exported_minilm_adapter_names_its_base_and_loads_from_anywhere(
        tmp_path: Path) -> None:
    from peft import PeftModel

    from p2pfed.model.export import export_parts
    from p2pfed.model.m3t import M3TModel, ModelSpec, load_text_base
    from p2pfed.model.tasks import TASKS

    base, tokenizer = load_text_base("minilm")
    model = M3TModel.build(ModelSpec(TASKS, lora_layers=(5,)), [TEXT, "head.topic"],
                           text_base=(base, tokenizer))
    flats = LocalTrainer(model, {}, node_seed=0).flats
    flats[TEXT].flat.copy_(torch.randn(flats[TEXT].flat.shape,
                                       generator=torch.Generator().manual_seed(1)) * 0.05)
    export_parts(model, [TEXT, "head.topic"], tmp_path / "out", 7)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    shutil.move(tmp_path / "out", tmp_path / "moved")
    fresh, _ = load_text_base("minilm")
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "moved")).eval()
    batch = model.modules[TEXT].tokenize(["Which gas do plants take in?"])  # type: ignore[operator]
    with torch.no_grad():
        ours = model.modules[TEXT].peft(**batch).last_hidden_state  # type: ignore[operator]
        theirs = loaded(**batch).last_hidden_state
        with loaded.disable_adapter():
            untouched = loaded(**batch).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, untouched, atol=1e-3)  # the adapter did something
