"""Export a component: an adapter as a peft adapter directory, anything else as safetensors."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from p2pfed.model.m3t import ENCODERS, TEXT, M3TModel, TextEncoder

PROJECTION_FILE = "projection.safetensors"


def export_component(model: M3TModel, component: str, out: Path) -> list[Path]:
    """Write ``component`` under ``out``; returns the files written.

    ``encoder.text.lora`` becomes a peft adapter (``PeftModel.from_pretrained(base, out)``
    loads it onto the same base model) plus ``projection.safetensors`` for the projection to
    the shared width; other components become ``<component>.safetensors``.
    """
    out.mkdir(parents=True, exist_ok=True)
    module = model.modules[component]
    if component == ENCODERS[TEXT] and isinstance(module, TextEncoder):
        module.peft.save_pretrained(str(out))
        proj = module.proj.state_dict()
        tensors = {f"proj.{k}": v.detach().contiguous() for k, v in proj.items()}
        save_file(tensors, str(out / PROJECTION_FILE))
        return sorted(p for p in out.iterdir() if p.is_file())
    path = out / f"{component}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.parameters_of(component).items()},
              str(path), metadata={"component": component})
    return [path]
