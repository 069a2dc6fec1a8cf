"""The multi-modal multi-task (M3T) model, built from components a node holds.

Components (each a named group of parameters, mixed on its own):

* ``encoder.text.lora`` — a frozen BERT-style text model (all-MiniLM-L6-v2 in production, a tiny
  random BERT in unit tests) with LoRA adapters on ``query`` and ``value`` through peft, plus a
  projection to the shared width.  **Exact aggregation** (default, ``AdapterMode.FROZEN_A``):
  every member draws the LoRA ``A`` matrices from the same federation-wide seed and never trains
  them; only ``B`` (and the projection) are trained and mixed.  Since ΔW = (α/r)·B·A is linear in
  ``B``, mixing ``B`` mixes ΔW exactly.  ``AdapterMode.AB`` trains and averages ``A`` and ``B``
  separately (what most systems do; the mix of B·A is then not B̄·Ā) — kept for comparison.
* ``encoder.image`` — a small CNN; ``encoder.activity`` — a GRU over activity traces;
* ``backbone`` — a residual fusion block shared by tasks that use it;
* ``head.<task>`` — a linear classifier; ``prompt.<task>`` — an optional learned prompt vector
  added to the fused representation.

A task's *pipeline* is the list of components its forward pass uses; a node that holds a head
must hold its whole pipeline, and builds nothing else.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gossip.errors import ConfigError
from p2pfed.model.device import CPU, autocast
from p2pfed.model.textbase import adapted_modules, family, load_text_base, resolve_layers

__all__ = ["load_text_base"]  # (where the model's users have always found it)

log = logging.getLogger(__name__)

WIDTH = 64
TEXT_MAX_TOKENS = 32
TEXT = "text"
IMAGE = "image"
ACTIVITY = "activity"
ENCODERS = {TEXT: "encoder.text.lora", IMAGE: "encoder.image", ACTIVITY: "encoder.activity"}


class AdapterMode(enum.StrEnum):
    FROZEN_A = "frozen-a"  # exact: shared frozen A, mixed B
    AB = "ab"  # A and B both trained and averaged separately (inexact)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modalities: tuple[str, ...]
    classes: int
    backbone: bool = False
    prompt: bool = False

    def pipeline(self) -> list[str]:
        names = [ENCODERS[m] for m in self.modalities]
        if self.backbone:
            names.append("backbone")
        if self.prompt:
            names.append(f"prompt.{self.name}")
        return [*names, f"head.{self.name}"]


@dataclass(frozen=True)
class ModelSpec:
    tasks: tuple[TaskSpec, ...]
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_seed: int = 0  # federation-wide: every member draws the same A
    adapter_mode: AdapterMode = AdapterMode.FROZEN_A
    activity_features: int = 4
    text_model: str = "minilm"  # or "tiny" (tests), or a local model directory
    #: transformer layers that get LoRA (None: all; -1: the top one).  With only top layers
    #: of a BERT-shaped model adapted, the frozen layers below are computed once per text and
    #: cached (see TextEncoder.encode_prefix).
    lora_layers: tuple[int, ...] | None = None
    #: the projections that get LoRA (): the architecture's query and value ones
    lora_targets: tuple[str, ...] = ()

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"unknown task {name!r}")

    def components(self) -> list[str]:
        return sorted({c for t in self.tasks for c in t.pipeline()})

    def tasks_using(self, component: str) -> list[TaskSpec]:
        return [t for t in self.tasks if component in t.pipeline()]

    def forward_deps(self, held: Sequence[str]) -> dict[str, frozenset[str]]:
        """Per held component, the other held components in the forward passes that train it."""
        deps: dict[str, frozenset[str]] = {}
        for c in held:
            together = {x for t in self.tasks_using(c) if t.name in self.trained_tasks(held)
                        for x in t.pipeline()}
            deps[c] = frozenset(together - {c})
        return deps

    def trained_tasks(self, held: Sequence[str]) -> list[str]:
        """Tasks whose whole pipeline this node holds."""
        return [t.name for t in self.tasks if set(t.pipeline()) <= set(held)]

    def check_components(self, names: Sequence[str], where: str) -> None:
        """ConfigError (naming ``where``) unless every one of ``names`` is the model's."""
        unknown = sorted(set(names) - set(self.components()))
        if unknown:
            raise ConfigError(f"{where}: not components of this model: {', '.join(unknown)} "
                              f"(its components: {', '.join(self.components())})")

    def check_holdings(self, held: Sequence[str]) -> None:
        """ConfigError unless every component of ``held`` is one of the model's, each head
        with the rest of its pipeline."""
        self.check_components(held, "components.hold")
        for c in held:
            if c.startswith("head."):
                task = self.task(c.removeprefix("head."))
                missing = set(task.pipeline()) - set(held)
                if missing:
                    raise ConfigError(
                        f"holding {c} needs the rest of its pipeline: {sorted(missing)}")


# ---------------------------------------------------------------------------- text
def share_frozen(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose module tree is new but whose (frozen) tensors are shared.

    peft replaces adapted modules in place, so every node needs its own module tree; the
    weights themselves never change, so the nodes of one simulation can share them.
    """
    import copy

    memo: dict[int, Any] = {id(t): t for t in base.parameters()}
    memo.update({id(t): t for t in base.buffers()})
    for p in base.parameters():
        p.requires_grad_(False)
    return copy.deepcopy(base, memo)


class TextEncoder(nn.Module):
    def __init__(self, base: nn.Module, tokenizer: Any, spec: ModelSpec) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        for p in base.parameters():
            p.requires_grad_(False)
        self.family = family(base, spec.lora_targets)
        layers = resolve_layers(spec.lora_layers, self.family.depth)
        config = LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha,
                            target_modules=adapted_modules(base, self.family.targets, layers),
                            lora_dropout=0.0)
        # (a BERT runs its frozen layers below the first adapted one once per text; any
        # other model caches only its input embeddings)
        self.cache_from = min(layers) if layers and self.family.bert_layers else 0
        with warnings.catch_warnings():  # transformers' own deprecation, raised inside peft
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            self.peft = get_peft_model(base, config)
        self.peft.eval()  # the base is frozen: no dropout, so outputs are deterministic
        self.tokenizer = tokenizer
        self.mode = spec.adapter_mode
        self.alpha = spec.lora_alpha
        gen = torch.Generator().manual_seed(spec.lora_seed)
        with torch.no_grad():
            for name, p in self.peft.named_parameters():
                if "lora_A" in name:
                    bound = 1 / p.shape[1] ** 0.5
                    p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
                    p.requires_grad_(self.mode is AdapterMode.AB)
                elif "lora_B" in name:
                    p.zero_()
                    p.requires_grad_(True)
        hidden = self.family.output
        self.proj = nn.Linear(hidden, WIDTH)
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        self.peft.eval()
        return self

    def trainable(self) -> dict[str, nn.Parameter]:
        params = {f"proj.{n}": p for n, p in self.proj.named_parameters()}
        for name, p in self.peft.named_parameters():
            if "lora_B" in name or ("lora_A" in name and self.mode is AdapterMode.AB):
                params[name] = p
        return params

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=TEXT_MAX_TOKENS, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @torch.no_grad()
    def encode_prefix(self, texts: Sequence[str], batch_size: int = 128) -> CachedTexts:
        """Run the frozen layers below the first adapted one, once (padded to TEXT_MAX_TOKENS),
        each batch back to the CPU's memory as it is done; a model that is not BERT-shaped
        keeps its token ids only (its whole model runs at each step anyway, and ids take a
        thousandth of the memory of its embeddings)."""
        base: Any = self.peft.get_base_model()
        hiddens, masks = [], []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding="max_length",
                                   truncation=True, max_length=TEXT_MAX_TOKENS,
                                   return_tensors="pt")
            masks.append(batch["attention_mask"])
            if not self.family.bert_layers:
                hiddens.append(batch["input_ids"])
                continue
            ids = batch["input_ids"].to(self.proj.weight.device)
            attention = batch["attention_mask"].to(ids.device)
            hidden = base.embeddings(input_ids=ids)
            for layer in base.encoder.layer[: self.cache_from]:
                hidden = _layer(layer, hidden, attention)
            hiddens.append(hidden.float().to(CPU))
        # kept in the CPU's memory (a forward pass moves its batch to the model's device)
        return CachedTexts(torch.cat(hiddens), torch.cat(masks))

    def forward(self, texts: Sequence[str] | CachedTexts) -> torch.Tensor:
        if isinstance(texts, CachedTexts):
            # padding is on the right: drop the columns no text in this batch reaches
            width = max(int(texts.mask.sum(1).max()), 1) if len(texts) else 1
            hidden, attention = texts.hidden[:, :width], texts.mask[:, :width]
            if self.family.bert_layers:
                bert: Any = self.peft.get_base_model()
                for layer in bert.encoder.layer[self.cache_from :]:
                    hidden = _layer(layer, hidden, attention)
            else:  # (token ids)
                hidden = self.peft(input_ids=hidden, attention_mask=attention).last_hidden_state
        else:
            batch = self.tokenize(texts)
            device = self.proj.weight.device
            attention = batch["attention_mask"].to(device)
            hidden = self.peft(input_ids=batch["input_ids"].to(device),
                               attention_mask=attention).last_hidden_state
        out: torch.Tensor = self.proj(pool(hidden, attention, self.family.pooling))
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """ΔW = (α/r)·B·A per adapted matrix (what exact aggregation must preserve)."""
        params = dict(self.peft.named_parameters())
        out = {}
        for name, b in params.items():
            if "lora_B" in name:
                a = params[name.replace("lora_B", "lora_A")]
                scale = self.alpha / a.shape[0]
                out[name.replace(".lora_B.default.weight", "")] = scale * (b @ a)
        return out


@dataclass(frozen=True)
class CachedTexts:
    """Hidden states of texts below the adapted layers (N, T, H), or for a model that is not
    BERT-shaped their token ids (N, T); and their attention masks."""

    hidden: torch.Tensor  # (N, T, H) or (N, T)
    mask: torch.Tensor  # (N, T)

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def select(self, index: Any) -> CachedTexts:
        idx = torch.as_tensor(index)
        return CachedTexts(self.hidden[idx], self.mask[idx])

    def to(self, device: torch.device) -> CachedTexts:
        """These texts on ``device`` (themselves when they are there already)."""
        if self.hidden.device == device:
            return self
        return CachedTexts(self.hidden.to(device), self.mask.to(device))


def pool(hidden: torch.Tensor, attention: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per text: the mean over its real tokens ("mean", an encoder's) or its last
    real token ("last", a decoder's: only that one has seen the whole text).  Padding is on
    the right."""
    if how == "last":
        last = (attention.sum(1) - 1).clamp(min=0).long()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One BERT layer; the feed-forward part runs on real tokens only (padding is left zero).

    Padding positions are masked out of every attention and of the pooling, so what they hold
    never reaches a real token: skipping their feed-forward (two thirds of a layer's work) is
    exact for every output that is used.
    """
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    attended = layer.attention(hidden, additive)
    attended = attended[0] if isinstance(attended, tuple) else attended
    real = mask.bool()
    tokens = attended[real]  # (real tokens, H)
    out = layer.output(layer.intermediate(tokens), tokens)
    result: torch.Tensor = attended.new_zeros(attended.shape).masked_scatter(
        real.unsqueeze(-1), out)
    return result


# ---------------------------------------------------------------------------- other parts
class ImageEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(2),
            nn.Flatten(), nn.Linear(128, WIDTH),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class ActivityEncoder(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, 32, batch_first=True)
        self.proj = nn.Linear(32, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        out: torch.Tensor = self.proj(h[-1])
        return out


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, WIDTH), nn.GELU(),
                                   nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.block(x)
        return out


class Prompt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.vector


@dataclass
class M3TModel:
    """The parts of the model one node holds; nothing else is ever built.

    ``device``: where its modules are (:func:`p2pfed.model.device.resolve_device`);
    ``precision``: "fp32", or "bf16" for a forward pass under bfloat16 autocast.  Either way
    :meth:`forward` takes its inputs wherever they are and returns float32 logits on the CPU."""

    spec: ModelSpec
    held: tuple[str, ...]
    modules: dict[str, nn.Module] = field(default_factory=dict)
    device: torch.device = CPU
    precision: str = "fp32"

    @classmethod
    def build(cls, spec: ModelSpec, held: Sequence[str], *, init_seed: int = 0,
              text_base: tuple[nn.Module, Any] | None = None,
              device: torch.device = CPU, precision: str = "fp32") -> M3TModel:
        """The components ``held``, initialised from ``init_seed`` (on the CPU, so the same on
        every member whatever its device), then moved to ``device``."""
        spec.check_holdings(held)
        model = cls(spec, tuple(sorted(held)), device=device, precision=precision)
        for name in model.held:
            # every member initialises a component the same way (federation-wide seed)
            torch.manual_seed(init_seed * 7919 + sum(map(ord, name)))
            if name == ENCODERS[TEXT]:
                base, tok = text_base if text_base is not None else load_text_base(spec.text_model)
                model.modules[name] = TextEncoder(base, tok, spec)
            elif name == ENCODERS[IMAGE]:
                model.modules[name] = ImageEncoder()
            elif name == ENCODERS[ACTIVITY]:
                model.modules[name] = ActivityEncoder(spec.activity_features)
            elif name == "backbone":
                model.modules[name] = Backbone()
            elif name.startswith("prompt."):
                model.modules[name] = Prompt()
            elif name.startswith("head."):
                task = spec.task(name.removeprefix("head."))
                model.modules[name] = nn.Linear(WIDTH, task.classes)
        if device != CPU:
            for module in model.modules.values():
                module.to(device)
        return model

    def parameters_of(self, component: str) -> dict[str, nn.Parameter]:
        """The trainable (and mixed) parameters of a component."""
        module = self.modules[component]
        if isinstance(module, TextEncoder):
            return module.trainable()
        return dict(module.named_parameters())

    def tasks(self) -> list[str]:
        return self.spec.trained_tasks(self.held)

    def autocast(self) -> AbstractContextManager[None]:
        """The context of this model's forward passes: bfloat16 autocast for "bf16"."""
        return autocast(self.device, self.precision)

    def forward(self, task: str, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The logits of ``task`` for a batch of ``inputs`` (tensors and cached texts wherever
        they are, lists of texts): float32, on the CPU, whatever the model's device and
        precision, so that losses, labels and predictions stay where they always were."""
        spec = self.spec.task(task)
        with self.autocast():
            parts = [self.modules[ENCODERS[m]](self._on_device(inputs[m]))
                     for m in spec.modalities]
            x = torch.stack(parts).mean(0)
            if spec.backbone:
                x = self.modules["backbone"](x)
            if spec.prompt:
                x = self.modules[f"prompt.{task}"](x)
            out: torch.Tensor = self.modules[f"head.{task}"](x)
        return out.float().to(CPU)  # (itself, on the CPU in float32)

    def _on_device(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(self.device)
        if isinstance(value, CachedTexts):
            return value.to(self.device)
        return value  # (texts: the text encoder tokenizes them onto its device)
