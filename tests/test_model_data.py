"""Tests for p2pfed.model.data and p2pfed.model.questions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from gossip.errors import ConfigError
from p2pfed.model.data import (
    Dataset,
    dirichlet_split,
    load_csv_series,
    load_digits_images,
    load_image_array,
    load_jsonl_text,
    load_source,
    make_activity_traces,
)
from p2pfed.model.questions import BANK_VERSION, TOPICS, generate_questions

# --- questions -------------------------------------------------------------------------------


def test_questions_deterministic_and_seed_dependent() -> None:
    assert BANK_VERSION == "1"
    assert generate_questions(200, 7) == generate_questions(200, 7)
    assert generate_questions(200, 7) != generate_questions(200, 8)


def test_questions_balanced_and_varied() -> None:
    assert len(TOPICS) >= 8
    qs = generate_questions(1003, 1)
    assert len(qs) == 1003
    counts = Counter(t for _, t in qs)
    assert set(counts) == set(range(len(TOPICS)))
    assert max(counts.values()) - min(counts.values()) <= 1
    texts = [q for q, _ in qs]
    assert len(set(texts)) > 0.7 * len(texts)
    assert all(q[0].isupper() and q[-1] in ".?" for q in texts)


def test_questions_learnable_but_not_trivial() -> None:
    qs = generate_questions(2000, 0)
    texts = [q for q, _ in qs]
    y = np.array([t for _, t in qs])
    vec = CountVectorizer()
    xtr = vec.fit_transform(texts[:1500])
    xte = vec.transform(texts[1500:])
    model = LogisticRegression(max_iter=1000).fit(xtr, y[:1500])
    acc = model.score(xte, y[1500:])
    assert 0.7 < acc < 0.995


# --- activity traces -------------------------------------------------------------------------


def test_activity_shapes_and_determinism() -> None:
    x, notes, y = make_activity_traces(90, 3)
    assert x.shape == (90, 24, 4) and x.dtype == np.float32
    assert len(notes) == 90 and all(isinstance(n, str) and n for n in notes)
    assert y.dtype == np.int64 and np.bincount(y).tolist() == [30, 30, 30]
    x2, notes2, y2 = make_activity_traces(90, 3)
    assert np.array_equal(x, x2) and notes == notes2 and np.array_equal(y, y2)
    x3, _, _ = make_activity_traces(90, 4)
    assert not np.array_equal(x, x3)


def test_activity_needs_both_modalities() -> None:
    x, notes, y = make_activity_traces(1200, 0)
    tr, te = slice(0, 900), slice(900, None)
    feats = x.reshape(len(x), 4, 6, 4).mean(axis=2).reshape(len(x), -1)
    feats = (feats - feats[tr].mean(0)) / (feats[tr].std(0) + 1e-6)
    vec = CountVectorizer()
    ntr = vec.fit_transform(notes[:900]).toarray()
    nte = vec.transform(notes[900:]).toarray()

    def score(a: np.ndarray, b: np.ndarray) -> float:
        model = LogisticRegression(max_iter=2000).fit(a, y[tr])
        return float(model.score(b, y[te]))

    traces_only = score(feats[tr], feats[te])
    notes_only = score(ntr, nte)
    both = score(np.hstack([feats[tr], ntr]), np.hstack([feats[te], nte]))
    assert both > 0.8
    assert traces_only < both - 0.15
    assert notes_only < both - 0.15
    assert traces_only > 0.45 and notes_only > 0.45  # each modality carries signal


# --- digits ----------------------------------------------------------------------------------


def test_digits_images() -> None:
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


# --- dirichlet split -------------------------------------------------------------------------


def _skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of the client's most common label."""
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]))


def test_dirichlet_partition_and_determinism() -> None:
    labels = np.repeat(np.arange(10), 60)
    parts = dirichlet_split(labels, 8, 0.5, seed=1)
    assert len(parts) == 8
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(p.dtype == np.int64 for p in parts)
    again = dirichlet_split(labels, 8, 0.5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_split(labels, 8, 0.5, seed=2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = np.repeat(np.arange(10), 100)
    skews = [
        np.mean([_skew(labels, dirichlet_split(labels, 10, a, seed=s)) for s in range(3)])
        for a in (100.0, 1.0, 0.05)
    ]
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.25 and skews[2] > 0.6


@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0])
def test_dirichlet_min_size(alpha: float) -> None:
    labels = np.repeat(np.arange(3), 20)
    parts = dirichlet_split(labels, 12, alpha, seed=0, min_size=5)
    assert all(len(p) >= 5 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60))


def test_dirichlet_rejects_impossible() -> None:
    with pytest.raises(ConfigError):
        dirichlet_split(np.zeros(5, dtype=int), 3, 1.0, seed=0, min_size=2)
    with pytest.raises(ConfigError):
        dirichlet_split(np.zeros(5, dtype=int), 2, 0.0, seed=0)


# --- Dataset ---------------------------------------------------------------------------------


def test_dataset_subset() -> None:
    ds = Dataset("d", {"text": ["a", "b", "c"], "image": np.arange(3.0)}, np.array([0, 1, 2]))
    sub = ds.subset([2, 0])
    assert len(sub) == 2 and sub.inputs["text"] == ["c", "a"]
    assert np.array_equal(sub.labels, [2, 0]) and sub.labels.dtype == np.int64
    with pytest.raises(IndexError):
        ds.subset([3])


# --- loaders ---------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "essays.jsonl"
    rows = [{"text": f"question {i}", "label": i % 3, "extra": True} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    ds = load_jsonl_text(path)
    assert ds.name == "essays" and len(ds) == 5
    assert ds.inputs["text"] == [r["text"] for r in rows]
    assert ds.labels.tolist() == [0, 1, 2, 0, 1]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"q": "x", "y": 4}) + "\n", encoding="utf-8")
    ds2 = load_source("text-jsonl", other, text_field="q", label_field="y")
    assert ds2.inputs["text"] == ["x"] and ds2.labels.tolist() == [4]


@pytest.mark.parametrize(
    ("line3", "expect"),
    [
        ('{"text": "a", "label": ', "invalid JSON"),
        ('{"label": 1}', "missing field 'text'"),
        ('{"text": "a"}', "missing field 'label'"),
        ('{"text": 5, "label": 1}', "must be a string"),
        ('{"text": "a", "label": "1"}', "non-negative integer"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line3: str, expect: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "ok", "label": 0})
    path.write_text(f"{good}\n{good}\n{line3}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=expect) as info:
        load_jsonl_text(path)
    assert f"{path}:3:" in str(info.value)


def test_npz_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "scans.npz"
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.savez(path, images=images, labels=np.array([1, 0]))
    ds = load_source("image-npz", path)
    arr = ds.inputs["image"]
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (2, 1, 3, 4) and arr.dtype == np.float32
    assert np.allclose(arr[:, 0], images / 255.0)
    assert ds.labels.tolist() == [1, 0]
    path4 = tmp_path / "rgb.npz"
    rgb = np.random.default_rng(0).random((3, 3, 5, 5)).astype(np.float64)
    np.savez_compressed(path4, images=rgb, labels=np.array([0, 1, 2]))
    ds4 = load_image_array(path4)
    assert np.allclose(ds4.inputs["image"], rgb.astype(np.float32))


def test_npz_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(ConfigError, match=r"corrupt\.npz"):
        load_image_array(corrupt)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 random bytes")
    with pytest.raises(ConfigError, match=r"garbage\.npz"):
        load_image_array(garbage)
    with pytest.raises(ConfigError, match=r"missing\.npz.*cannot read"):
        load_image_array(tmp_path / "missing.npz")
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([None, 1], dtype=object), labels=np.array([0, 1]))
    with pytest.raises(ConfigError, match=r"objects\.npz"):
        load_image_array(objects)
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, images=np.zeros((2, 3, 3)))
    with pytest.raises(ConfigError, match="labels"):
        load_image_array(no_labels)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, images=np.zeros((2, 3, 3)), labels=np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="2 images but 3 labels"):
        load_image_array(mismatch)


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "activity.csv"
    path.write_text(
        "\n".join(
            [
                "sample_id,step,logins,minutes,label",
                "b,1,3,30.5,1",
                "a,0,1,10,0",
                "b,0,2,20,1",
                "",
                "a,1,4,40,0",
            ]
        ),
        encoding="utf-8",
    )
    ds = load_source("series-csv", path)
    series = ds.inputs["activity"]
    assert isinstance(series, np.ndarray)
    assert series.shape == (2, 2, 2) and series.dtype == np.float32
    assert series[0].tolist() == [[2.0, 20.0], [3.0, 30.5]]  # sample b, ordered by step
    assert series[1].tolist() == [[1.0, 10.0], [4.0, 40.0]]
    assert ds.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("body", "line", "expect"),
    [
        ("a,0,1,2,0\na,1,1,x,0\n", 2, "'x' is not a number"),
        ("a,0,1,2,0\na,one,1,2,0\n", 2, "not an integer"),
        ("a,0,1,2,0\na,1,1,0\n", 2, "expected 5 columns"),
        ("a,0,1,2,0\na,1,1,2,1\n", 2, "has label 1"),
        ("a,0,1,2,0\na,0,1,2,0\n", 2, "repeats step 0"),
        ("a,0,1,2,0\na,1,1,2,0\nb,0,1,2,1\n", 3, "has 1 steps, expected 2"),
        ("a,0,1,nan,0\n", 1, "not finite"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path: Path, body: str, line: int, expect: str) -> None:
    path = tmp_path / "series.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ConfigError, match=expect) as info:
        load_csv_series(path)
    assert f"{path}:{line}:" in str(info.value)


def test_missing_files_and_unknown_kind(tmp_path: Path) -> None:
    for kind in ("text-jsonl", "image-npz", "series-csv"):
        missing = tmp_path / f"nowhere-{kind}.dat"
        with pytest.raises(ConfigError, match=f"nowhere-{kind}"):
            load_source(kind, missing)
    with pytest.raises(ConfigError, match="unknown data source kind"):
        load_source("audio-wav", tmp_path / "x.wav")
    with pytest.raises(ConfigError, match="takes no options"):
        load_source("image-npz", tmp_path / "x.npz", text_field="t")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no samples"):
        load_jsonl_text(empty)
