"""An institution's own files: the :class:`Dataset` record and a loader per source kind.

Input keys are modality names (``"text"``, ``"image"``, ``"activity"``), as in
:mod:`p2pfed.model.m3t`.  Loaders raise :class:`~gossip.errors.ConfigError` with messages
``"PATH:LINE: reason"`` (or ``"PATH: reason"`` where no line applies).  They never unpickle
anything.
"""

from __future__ import annotations

import csv
import json
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gossip.errors import ConfigError, LocalError
from p2pfed.config import SOURCE_KINDS

InputArray = npt.NDArray[Any] | list[str]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples of one local dataset: ``inputs[modality][i]`` goes with ``labels[i]``.

    ``labels`` is coerced to a 1-D ``int64`` array; every input must have one entry per label.
    """

    name: str
    inputs: dict[str, InputArray]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise LocalError(f"dataset {self.name!r}: labels must be a 1-D integer array")
        object.__setattr__(self, "labels", labels.astype(np.int64, copy=False))
        n = labels.shape[0]
        for key, value in self.inputs.items():
            if len(value) != n:
                raise LocalError(
                    f"dataset {self.name!r}: input {key!r} has {len(value)} samples, "
                    f"labels have {n}"
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: npt.ArrayLike) -> Dataset:
        """The samples at ``indices`` (in that order), under the same name."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"dataset {self.name!r}: index out of range for {n} samples")
        inputs: dict[str, InputArray] = {}
        for key, value in self.inputs.items():
            if isinstance(value, list):
                inputs[key] = [value[i] for i in idx.tolist()]
            else:
                inputs[key] = value[idx]
        return Dataset(self.name, inputs, self.labels[idx])




def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def load_jsonl_text(
    path: Path | str, text_field: str = "text", label_field: str = "label"
) -> Dataset:
    """Text samples from JSON Lines: one object per line with a string and an integer label.

    Blank lines are skipped.  Input key ``"text"``; dataset name is the file's stem.
    """
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON: {exc.msg}") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in (text_field, label_field):
            if field not in record:
                raise ConfigError(f"{where}: missing field {field!r}")
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str):
            raise ConfigError(f"{where}: field {text_field!r} must be a string")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise ConfigError(f"{where}: field {label_field!r} must be a non-negative integer")
        texts.append(text)
        labels.append(label)
    if not labels:
        raise ConfigError(f"{path}: no samples")
    return Dataset(path.stem, {"text": texts}, np.array(labels, dtype=np.int64))


def load_image_array(path: Path | str) -> Dataset:
    """Images from a ``.npz`` with arrays ``images`` (N,C,H,W) or (N,H,W) and ``labels`` (N,).

    Loaded with ``allow_pickle=False``.  Images become ``float32`` (``uint8`` is scaled by
    1/255); (N,H,W) gains a channel axis.  Input key ``"image"``.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ConfigError(f"{path}: not an .npz archive")
            missing = [k for k in ("images", "labels") if k not in archive.files]
            if missing:
                raise ConfigError(f"{path}: missing array(s) {', '.join(missing)}")
            images = np.asarray(archive["images"])
            labels = np.asarray(archive["labels"])
    except ConfigError:
        raise
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ConfigError(f"{path}: not a readable .npz archive ({exc})") from exc
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4:
        raise ConfigError(f"{path}: images must have shape (N,C,H,W) or (N,H,W)")
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.number):
        raise ConfigError(f"{path}: images must be numeric, got {images.dtype}")
    if np.issubdtype(images.dtype, np.complexfloating):
        raise ConfigError(f"{path}: images must be real, got {images.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{path}: labels must be a 1-D integer array")
    if labels.shape[0] != images.shape[0]:
        raise ConfigError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ConfigError(f"{path}: no samples")
    if labels.min() < 0:
        raise ConfigError(f"{path}: labels must be non-negative")
    scale = np.float32(1 / 255) if images.dtype == np.uint8 else np.float32(1)
    data = images.astype(np.float32) * scale
    if not np.all(np.isfinite(data)):
        raise ConfigError(f"{path}: images contain NaN or infinite values")
    return Dataset(path.stem, {"image": data}, labels.astype(np.int64))


def load_csv_series(path: Path | str) -> Dataset:
    """Time series from CSV rows ``sample_id,step,feature1..featureK,label``.

    An optional header row starting with ``sample_id`` is skipped; blank rows are skipped.
    Rows are grouped by ``sample_id`` (samples kept in order of first appearance) and ordered by
    the integer ``step``.  Every row has the same K, every sample the same number of steps,
    one label, and no repeated step.  Input key ``"activity"``, shape (N, T, K) ``float32``.
    """
    path = Path(path)
    text = _read_text(path)
    width: int | None = None
    samples: dict[str, list[tuple[int, list[float]]]] = {}
    sample_label: dict[str, int] = {}
    first_line: dict[str, int] = {}
    reader = csv.reader(text.splitlines())
    for row in reader:
        lineno = reader.line_num
        where = f"{path}:{lineno}"
        if not row or all(not cell.strip() for cell in row):
            continue
        if width is None and not samples and row[0].strip() == "sample_id":
            continue
        if len(row) < 4:
            raise ConfigError(
                f"{where}: expected sample_id,step,feature1..featureK,label "
                f"(at least 4 columns), got {len(row)}"
            )
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ConfigError(f"{where}: expected {width} columns, got {len(row)}")
        sample_id, step, features, label = _series_row(row, where)
        if sample_id not in samples:
            samples[sample_id] = []
            sample_label[sample_id] = label
            first_line[sample_id] = lineno
        elif sample_label[sample_id] != label:
            raise ConfigError(
                f"{where}: sample {sample_id!r} has label {label}, "
                f"earlier rows say {sample_label[sample_id]}"
            )
        if any(s == step for s, _ in samples[sample_id]):
            raise ConfigError(f"{where}: sample {sample_id!r} repeats step {step}")
        samples[sample_id].append((step, features))
    return _series_dataset(path, samples, sample_label, first_line)


def _series_row(row: list[str], where: str) -> tuple[str, int, list[float], int]:
    """One CSV row of :func:`load_csv_series`: sample id, step, features, label."""
    sample_id = row[0].strip()
    try:
        step = int(row[1])
    except ValueError as exc:
        raise ConfigError(f"{where}: step {row[1]!r} is not an integer") from exc
    features: list[float] = []
    for col, cell in enumerate(row[2:-1], start=3):
        try:
            value = float(cell)
        except ValueError as exc:
            raise ConfigError(f"{where}: column {col}: {cell!r} is not a number") from exc
        if not np.isfinite(value):
            raise ConfigError(f"{where}: column {col}: {cell!r} is not finite")
        features.append(value)
    try:
        label = int(row[-1])
    except ValueError as exc:
        raise ConfigError(f"{where}: label {row[-1]!r} is not an integer") from exc
    if label < 0:
        raise ConfigError(f"{where}: label must be non-negative, got {label}")
    return sample_id, step, features, label


def _series_dataset(path: Path, samples: dict[str, list[tuple[int, list[float]]]],
                    sample_label: dict[str, int], first_line: dict[str, int]) -> Dataset:
    """The samples of :func:`load_csv_series`, each ordered by step, as one Dataset."""
    if not samples:
        raise ConfigError(f"{path}: no samples")
    ids = list(samples)
    length = len(samples[ids[0]])
    for sid in ids:
        if len(samples[sid]) != length:
            raise ConfigError(
                f"{path}:{first_line[sid]}: sample {sid!r} has {len(samples[sid])} steps, "
                f"expected {length} like sample {ids[0]!r}"
            )
    series = np.array(
        [[feats for _, feats in sorted(samples[sid], key=lambda r: r[0])] for sid in ids],
        dtype=np.float32,
    )
    labels = np.array([sample_label[sid] for sid in ids], dtype=np.int64)
    return Dataset(path.stem, {"activity": series}, labels)


def load_source(kind: str, path: Path | str, **options: str) -> Dataset:
    """Load a local data source of ``kind`` (one of :data:`SOURCE_KINDS`).

    ``options`` are passed on: ``text-jsonl`` takes ``text_field`` and ``label_field``; the
    other kinds take none.
    """
    path = Path(path)
    if kind == "text-jsonl":
        unknown = sorted(set(options) - {"text_field", "label_field"})
        if unknown:
            raise ConfigError(f"{path}: unknown option(s) for {kind}: {', '.join(unknown)}")
        return load_jsonl_text(path, **options)
    if kind not in SOURCE_KINDS:
        raise ConfigError(
            f"{path}: unknown data source kind {kind!r}; expected one of {_join(SOURCE_KINDS)}"
        )
    if options:
        raise ConfigError(f"{path}: {kind} takes no options, got {', '.join(sorted(options))}")
    if kind == "image-npz":
        return load_image_array(path)
    return load_csv_series(path)


def _join(items: Sequence[str]) -> str:
    return ", ".join(items)
