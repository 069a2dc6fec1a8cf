"""``p2pfed bench --model``: a round on a tiny local model is measured and bounded; bad models
and devices are refused before anything loads (no timing thresholds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from gossip.errors import ConfigError
from p2pfed import bench_model, exitcodes
from p2pfed.bench_model import BATCH, resolve_device, run_model_bench
from p2pfed.cli import main
from p2pfed.model.m3t import TEXT_MAX_TOKENS, WIDTH
from tests.tiny_hf import save_tiny

HIDDEN, RANK = 32, 8
#: LoRA B of query and value on one layer (hidden × rank each) and the projection to WIDTH
ADAPTER = 2 * HIDDEN * RANK + HIDDEN * WIDTH + WIDTH


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "llama", "llama", layers=2)


def test_a_round_on_a_tiny_llama_is_measured_and_bounded(llama: Path) -> None:
    got = run_model_bench(str(llama), steps=2, neighbours=4, round_steps=8, rate_mb_s=1.0)
    assert (got["model_type"], got["family"], got["layers"]) == ("llama", "decoder", 2)
    assert got["lora_layers"] == [1] and got["lora_targets"] == ["q_proj", "v_proj"]
    assert got["batch_shape"] == [BATCH, TEXT_MAX_TOKENS]
    assert got["adapter_params"] == ADAPTER and got["adapter_bytes"] == 4 * ADAPTER
    assert 0 < got["train_step_min_s"] <= got["train_step_s"] <= got["train_step_max_s"] < 60
    assert got["round_compute_s"] == pytest.approx(8 * got["train_step_s"])
    assert got["round_network_s"] == pytest.approx(4 * ADAPTER * 4 / 1e6)
    assert got["bound"] == ("network" if got["round_network_s"] > got["round_compute_s"]
                            else "compute")
    assert got["device"] == "cpu" and got["rate_source"] == "given"
    assert got["network_bound_below_mb_s"] == pytest.approx(
        4 * ADAPTER * 4 / got["round_compute_s"] / 1e6)


def test_bf16_measures_the_same_adapter(llama: Path) -> None:
    got = run_model_bench(str(llama), steps=1, rate_mb_s=1.0, precision="bf16")
    assert got["precision"] == "bf16" and got["adapter_bytes"] == 4 * ADAPTER  # (float32)
    assert got["train_step_s"] > 0
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, not 'fp8'"):
        run_model_bench(str(llama), steps=1, rate_mb_s=1.0, precision="fp8")


def test_the_ab_mode_sends_a_too_and_a_slow_link_makes_a_round_network_bound(
        llama: Path) -> None:
    got = run_model_bench(str(llama), steps=1, rate_mb_s=1e-6, adapter_mode="ab")
    assert got["adapter_params"] == ADAPTER + 2 * RANK * HIDDEN  # (A: rank × hidden each)
    assert got["bound"] == "network"


def test_without_a_rate_the_payload_stream_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def net(size_mb: int, repeats: int) -> dict[str, float]:
        asked.append(size_mb)
        return {"payload_stream_mbps": 50.0}

    monkeypatch.setattr("p2pfed.bench_net.run_net_bench", net)
    got = run_model_bench("tiny", steps=1)
    assert asked == [1]  # (the adapter's size, at least 1 MiB)
    assert got["rate_mb_s"] == 50.0 and got["rate_source"].startswith("measured")
    assert math.isfinite(got["round_network_s"]) and got["model_type"] == "bert"


def test_bad_models_and_devices_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        run_model_bench(str(tmp_path / "missing"), rate_mb_s=1.0)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        run_model_bench(str(tmp_path), rate_mb_s=1.0)
    with pytest.raises(ConfigError, match=r'"auto", "cpu", "cuda" or "cuda:N".*not \'gpu\''):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="adapter mode"):
        run_model_bench("tiny", rate_mb_s=1.0, adapter_mode="both")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("argv", [["--model", "/nonexistent/model"],
                                  ["--model", "tiny", "--device", "tpu"],
                                  ["--model", "tiny", "--precision", "fp16"],
                                  ["--model", "tiny", "--sim"]])
def test_the_cli_refuses_before_loading(argv: list[str], capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_model, "run_model_bench", lambda *a, **k: pytest.fail("ran"))
    assert main(["bench", *argv]) == exitcodes.USAGE
    assert capsys.readouterr().err.strip()


def test_the_cli_writes_the_figures_as_json(llama: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(llama), "--rate-mb-s", "10", "--neighbours", "3",
                 "--json", str(out)]) == exitcodes.OK
    got = json.loads(out.read_text())
    assert got["neighbours"] == 3 and got["bound"] in ("compute", "network")
