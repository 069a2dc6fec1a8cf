"""Example data files for a task: ``p2pfed data sample TASK DIR``.

Writes a small labelled data set in exactly the formats the ``[data]`` loaders read
(:mod:`p2pfed.model.data`), one file per modality, named ``<task>-<modality>.<suffix>``, and a
``README.md`` with the label meanings (from :data:`p2pfed.model.tasks.LABELS`) and the
``p2pfed.toml`` lines that use the files.  The same task, count and seed give the same bytes.

The examples come from the built-in generators: the digits are scikit-learn's bundled 8×8
images, the topic questions come from :func:`p2pfed.model.questions.generate_questions`, the
engagement traces and notes from :func:`p2pfed.model.data.make_activity_traces`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt

from gossip.errors import ConfigError, LocalError
from p2pfed.model.data import (
    ACTIVITY_FEATURES,
    MODALITY_FILES,
    load_digits_images,
    make_activity_traces,
)
from p2pfed.model.questions import generate_questions
from p2pfed.model.tasks import LABELS, task_by_name

DEFAULT_COUNT = 60
#: scikit-learn's bundled digits
DIGITS_AVAILABLE = 1797
#: a task in a few words (the README's title)
ABOUT = {
    "digits": "handwritten answers: an 8×8 grey-level image of one digit",
    "topic": "question topic tagging: a curriculum question and its subject",
    "engagement": "student engagement: an activity trace and a tutor's note per student",
}
_FORMATS = {
    "text": "JSON Lines: one object per line, `{\"text\": \"…\", \"label\": 1}`",
    "image": "NumPy `.npz` (no pickles) with `images` (N,8,8) `float32` in [0, 1] and "
             "`labels` (N,) integers",
    "activity": "CSV `sample_id,step," + ",".join(ACTIVITY_FEATURES) + ",label` (a header row, "
                "then one row per student and step)",
}


def sample_path(out: Path, task: str, modality: str) -> Path:
    """Where :func:`write_samples` puts ``task``'s ``modality`` file under ``out``."""
    return out / f"{task}-{modality}{MODALITY_FILES[modality][1]}"


def write_samples(task_name: str, out: Path, count: int = DEFAULT_COUNT,
                  seed: int = 0) -> list[Path]:
    """Write ``count`` labelled examples of ``task_name`` and a README under ``out``.

    ``out`` is created; it must not exist already with anything in it (:class:`LocalError`).
    An unknown task is a :class:`ConfigError`.  Returns the files written, README last.
    """
    task = task_by_name(task_name)
    most = DIGITS_AVAILABLE if task.name == "digits" else 100_000
    if not 1 <= count <= most:
        raise ConfigError(f"{task.name}: the count must be between 1 and {most}, got {count}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a directory with files in it" if out.is_dir() else "a file"
        raise LocalError(f"{out} is {what}: name a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    files = _WRITERS[task.name](out, count, seed)
    readme = out / "README.md"
    readme.write_text(_readme(task.name, count, files), encoding="utf-8")
    return [*files, readme]


def _digits(out: Path, count: int, seed: int) -> list[Path]:
    images, labels = load_digits_images()
    pick = np.random.default_rng(seed).permutation(len(labels))[:count]
    path = sample_path(out, "digits", "image")
    _write_npz(path, {"images": images[pick, 0], "labels": labels[pick]})
    return [path]


def _topic(out: Path, count: int, seed: int) -> list[Path]:
    path = sample_path(out, "topic", "text")
    _write_jsonl(path, generate_questions(count, seed))
    return [path]


def _engagement(out: Path, count: int, seed: int) -> list[Path]:
    traces, notes, labels = make_activity_traces(count, seed)
    activity = sample_path(out, "engagement", "activity")
    rows = ["sample_id,step," + ",".join(ACTIVITY_FEATURES) + ",label"]
    for i, (trace, label) in enumerate(zip(traces, labels.tolist(), strict=True)):
        rows += [f"s{i:04d},{t}," + ",".join(f"{v:g}" for v in step) + f",{label}"
                 for t, step in enumerate(trace.tolist())]
    activity.write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = sample_path(out, "engagement", "text")
    _write_jsonl(text, list(zip(notes, labels.tolist(), strict=True)))
    return [activity, text]


_WRITERS = {"digits": _digits, "topic": _topic, "engagement": _engagement}


def _write_jsonl(path: Path, examples: list[tuple[str, int]]) -> None:
    lines = [json.dumps({"text": text, "label": label}) for text, label in examples]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_npz(path: Path, arrays: dict[str, npt.NDArray[np.generic]]) -> None:
    """An ``.npz`` as :func:`numpy.savez` writes it, but with fixed timestamps (same bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                             buffer.getvalue())


def _readme(task_name: str, count: int, files: list[Path]) -> str:
    task = task_by_name(task_name)
    labels = LABELS[task.name]
    lines = [f"# Example data: `{task.name}` ({ABOUT[task.name]})", "",
             f"Written by `p2pfed data sample {task.name}`: {count} labelled examples, "
             "generated (nothing real). The files of a task are aligned by sample order and "
             "agree on every label.", "", "| file | modality | format |", "| --- | --- | --- |"]
    lines += [f"| `{path.name}` | {m} | {_FORMATS[m]} |"
              for path, m in zip(files, task.modalities, strict=True)]
    lines += ["", "## Labels", "", "| label | meaning |", "| --- | --- |"]
    lines += [f"| {i} | {name} |" for i, name in enumerate(labels)]
    lines += ["", "## Use them", "", "In `p2pfed.toml` (relative paths are read against the "
              "node's home, so these are absolute):", "", "```toml", "[components]",
              f"hold = [{', '.join(json.dumps(c) for c in task.pipeline())}]", "",
              "[model]", 'kind = "m3t"', ""]
    for path, m in zip(files, task.modalities, strict=True):
        lines += [f"[data.{task.name}.{m}]", f'kind = "{MODALITY_FILES[m][0]}"',
                  f"path = {json.dumps(str(path.resolve()))}", ""]
    lines[-1:] = ["```", "", "or, for a new home, `p2pfed init --model m3t` with "
              + " ".join(f"`--data {task.name}:{m}:{path.resolve()}`"
                         for path, m in zip(files, task.modalities, strict=True)) + ".", "",
              f"To ask the node's model about one example: `p2pfed predict {task.name} "
              + " ".join(f"--input {path.resolve()}" for path in files) + "`.", ""]
    return "\n".join(lines)

