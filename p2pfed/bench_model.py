"""``p2pfed bench --model``: is a round on this text model compute- or network-bound?

The text encoder (the frozen model with LoRA on its top layer, as ``[model] lora_layers``
defaults to) and the topic head are built as a member builds them, and measured:

* ``train_step_s``: the median of ``steps`` optimiser steps (Adam on the adapter, the
  projection and the head; after one step of warm-up) on a batch of :data:`BATCH` texts that
  each fill the tokenizer's limit, :data:`~p2pfed.model.m3t.TEXT_MAX_TOKENS` tokens
  (``batch_shape``: texts × tokens).  The texts first pass through the frozen layers below the
  adapter once, as a member's do when its data is loaded (a BERT-shaped model: every layer
  below the top one; any other model: only its input embeddings), so a step is what a round
  repeats: the adapted layers forward and back, and the optimiser.
* ``adapter_bytes``: what ``encoder.text.lora`` mixes and sends each round, its float32 flat
  buffer: LoRA ``B`` (and ``A`` with ``--adapter-mode ab``) and the projection.
* the round's estimate: ``round_compute_s`` = ``train_step_s`` × ``round_steps`` (``[model]
  steps``); ``round_network_s`` = ``adapter_bytes`` × ``neighbours`` ÷ ``rate_mb_s`` (every
  neighbour fetches the adapter); ``bound`` is the larger, and ``network_bound_below_mb_s``
  the rate under which the network would be.  The rate is given
  (``--rate-mb-s``: the member's real uplink) or measured here as
  :mod:`p2pfed.bench_net`'s ``payload_stream_mbps``, a payload of the adapter's size fetched
  over the bulk channel on 127.0.0.1 (the transport's own cost, with no real link's
  bandwidth or latency: a member should give its uplink).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from gossip.errors import ConfigError
from p2pfed.components import FlatLayout
from p2pfed.config_sections import ModelSection, OverlaySection
from p2pfed.model import device as placement
from p2pfed.model.m3t import (
    ENCODERS,
    TEXT,
    AdapterMode,
    M3TModel,
    ModelSpec,
    TextEncoder,
)
from p2pfed.model.questions import generate_questions
from p2pfed.model.tasks import TASKS
from p2pfed.model.textbase import BUILT_IN, check_text_model, resolve_layers

#: texts per measured batch (``[model] batch_size``'s default)
BATCH = ModelSection().batch_size
#: the adapted layers, as ``[model] lora_layers`` defaults to: the top one
LAYERS = ModelSection().lora_layers
def resolve_device(name: str, precision: str = "fp32") -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA where torch sees one, else the CPU),
    and ``precision``, as ``[model] device`` and ``precision`` take them
    (:meth:`~p2pfed.config_sections.ModelSection.check_device`,
    :func:`p2pfed.model.device.resolve_device`); ConfigError for another word, or a CUDA device
    torch does not see."""
    ModelSection(device=name, precision=precision).check_device()
    return placement.resolve_device(name)


def bench_texts(n: int = BATCH, seed: int = 0) -> list[str]:
    """``n`` texts that each reach the tokenizer's limit: curriculum questions run together
    (each text holds well over TEXT_MAX_TOKENS words)."""
    questions = [q for q, _ in generate_questions(n * 8, seed)]
    return [" ".join(questions[i * 8 : (i + 1) * 8]) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_steps(model: M3TModel, steps: int,
                  seed: int = 0) -> tuple[list[float], list[int]]:
    """Seconds of each of ``steps`` optimiser steps of the topic task (after one of warm-up)
    on a batch of BATCH texts, and the batch's shape (texts, tokens)."""
    encoder = model.modules[ENCODERS[TEXT]]
    assert isinstance(encoder, TextEncoder)
    with model.autocast():  # (the frozen layers run once per text, as at a member's start-up)
        cached = encoder.encode_prefix(bench_texts(BATCH, seed))
    width = int(cached.mask.sum(1).max())
    # (the model gives float32 logits on the CPU, whatever its device and precision)
    labels = torch.arange(BATCH) % model.spec.task("topic").classes
    params = [p for c in model.held for p in model.parameters_of(c).values()]
    opt = torch.optim.Adam(params, lr=1e-3)
    seconds = []
    for i in range(steps + 1):
        _sync(model.device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model.forward("topic", {TEXT: cached}), labels)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        _sync(model.device)
        if i:  # (the first step allocates the optimiser's state: warm-up)
            seconds.append(time.perf_counter() - start)
    return seconds, [len(cached), width]


def adapter_layout(model: M3TModel) -> FlatLayout:
    """The flat layout of ``encoder.text.lora``: what a member mixes and sends."""
    params = model.parameters_of(ENCODERS[TEXT])
    return FlatLayout.from_shapes({k: tuple(p.shape) for k, p in params.items()})


def measured_rate(adapter_bytes: int) -> float:
    """MB/s of a payload of about ``adapter_bytes`` (at least 1 MiB) fetched over the bulk
    channel between two processes on 127.0.0.1 (:func:`p2pfed.bench_net.run_net_bench`)."""
    from p2pfed.bench_net import run_net_bench

    size_mb = max(1, math.ceil(adapter_bytes / (1 << 20)))
    return float(run_net_bench(size_mb=size_mb, repeats=3)["payload_stream_mbps"])


def run_model_bench(model: str = "minilm", *, device: str = "cpu", precision: str = "fp32",
                    steps: int = 5,
                    neighbours: int = OverlaySection().degree,
                    round_steps: int = ModelSection().steps, rate_mb_s: float | None = None,
                    adapter_mode: str = AdapterMode.FROZEN_A.value) -> dict[str, Any]:
    """The measurements above on ``model`` (``minilm``, ``tiny`` or a local Hugging Face
    model directory; ConfigError for one that is not, or a device torch does not see)."""
    if steps < 1 or neighbours < 1 or round_steps < 1:
        raise ValueError("steps, neighbours and round steps must be at least 1")
    if rate_mb_s is not None and not (math.isfinite(rate_mb_s) and rate_mb_s > 0):
        raise ValueError("the rate must be a positive number of MB/s")
    check_text_model(model)
    on = resolve_device(device, precision)
    placement.check_precision(on, precision)
    try:
        mode = AdapterMode(adapter_mode)
    except ValueError:
        raise ConfigError(f"adapter mode {adapter_mode!r}: choose "
                          f"{' or '.join(m.value for m in AdapterMode)}") from None
    spec = ModelSpec(TASKS, text_model=model, lora_layers=LAYERS, adapter_mode=mode)
    import peft  # noqa: F401  (``load_s`` is the model's loading, not these imports')
    import transformers  # noqa: F401

    start = time.perf_counter()
    built = M3TModel.build(spec, [ENCODERS[TEXT], "head.topic"], device=on,
                           precision=precision)
    load_s = time.perf_counter() - start
    encoder = built.modules[ENCODERS[TEXT]]
    assert isinstance(encoder, TextEncoder)
    fam = encoder.family
    seconds, shape = measure_steps(built, steps)
    adapter_bytes = adapter_layout(built).nbytes
    rate = rate_mb_s if rate_mb_s is not None else measured_rate(adapter_bytes)
    step_s = statistics.median(seconds)
    compute_s = step_s * round_steps
    network_s = adapter_bytes * neighbours / (rate * 1e6)
    return {
        "model": model if model in BUILT_IN else str(check_text_model(model)),
        "model_type": fam.model_type, "family": fam.kind, "layers": fam.depth,
        "hidden": fam.hidden, "lora_layers": resolve_layers(LAYERS, fam.depth),
        "lora_targets": list(fam.targets), "lora_rank": spec.lora_rank,
        "adapter_mode": mode.value, "device": str(on), "precision": precision,
        "torch_threads": torch.get_num_threads(), "load_s": load_s,
        "batch_shape": shape, "steps_timed": steps, "train_step_s": step_s,
        "train_step_min_s": min(seconds), "train_step_max_s": max(seconds),
        "adapter_params": adapter_bytes // 4, "adapter_bytes": adapter_bytes,
        "neighbours": neighbours, "rate_mb_s": rate,
        "rate_source": "given" if rate_mb_s is not None else "measured: bulk channel, loopback",
        "round_steps": round_steps, "round_compute_s": compute_s,
        "round_network_s": network_s,
        "bound": "network" if network_s > compute_s else "compute",
        #: the rate under which this round would wait on the network
        "network_bound_below_mb_s": adapter_bytes * neighbours / compute_s / 1e6,
    }
