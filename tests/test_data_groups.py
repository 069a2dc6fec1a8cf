"""A group per example in a member's own files (the fairness attribute): each loader with and
without groups, bad group input, and a task's files agreeing on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gossip.errors import ConfigError, LocalError
from p2pfed.config import DataSource
from p2pfed.model.data import Dataset, load_csv_series, load_image_array, load_source
from p2pfed.model.tasks import load_task_data


def _jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_dataset_groups_are_codes_into_sorted_names() -> None:
    ds = Dataset("d", {"text": ["a", "b", "c"]}, np.array([0, 1, 0]), np.array([1, 0, 1]),
                 ("north", "south"))
    assert ds.group_of() == ["south", "north", "south"]
    sub = ds.subset([1, 2])
    assert sub.groups is not None and sub.groups.tolist() == [0, 1]
    assert sub.group_names == ("north", "south")
    plain = Dataset("d", {"text": ["a"]}, np.array([0]))
    assert plain.groups is None and plain.group_of() is None and plain.subset([0]).groups is None
    with pytest.raises(LocalError, match="groups must be 3"):
        Dataset("d", {"text": ["a", "b", "c"]}, np.array([0, 1, 0]), np.array([0, 1]), ("x", "y"))
    with pytest.raises(LocalError, match="sorted, distinct"):
        Dataset("d", {"text": ["a"]}, np.array([0]), np.array([0]), ("y", "x"))
    with pytest.raises(LocalError, match="sorted, distinct"):
        Dataset("d", {"text": ["a"]}, np.array([0]), np.array([2]), ("x", "y"))
    with pytest.raises(LocalError, match="without groups"):
        Dataset("d", {"text": ["a"]}, np.array([0]), None, ("x",))


def test_jsonl_group_field(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"text": "a", "label": 0, "region": "south"}, {"text": "b", "label": 1, "region": 3},
        {"text": "c", "label": 0, "region": "north "}]
    path = _jsonl(tmp_path / "notes.jsonl", rows)
    ds = load_source("text-jsonl", path, group_field="region")
    assert ds.group_names == ("3", "north", "south")
    assert ds.group_of() == ["south", "3", "north"]
    plain = load_source("text-jsonl", path)  # the field is there, but not asked for
    assert plain.groups is None and plain.group_names == ()


@pytest.mark.parametrize(("line3", "expect"), [
    ({"text": "c", "label": 0}, "missing field 'region'"),
    ({"text": "c", "label": 0, "region": ""}, "must be a non-empty string or an integer"),
    ({"text": "c", "label": 0, "region": True}, "must be a non-empty string or an integer"),
    ({"text": "c", "label": 0, "region": None}, "must be a non-empty string or an integer"),
])
def test_jsonl_bad_group_names_file_and_line(tmp_path: Path, line3: dict[str, object],
                                             expect: str) -> None:
    good = {"text": "a", "label": 0, "region": "north"}
    path = _jsonl(tmp_path / "notes.jsonl", [good, good, line3])
    with pytest.raises(ConfigError, match=expect) as info:
        load_source("text-jsonl", path, group_field="region")
    assert f"{path}:3:" in str(info.value)


def test_csv_group_column(tmp_path: Path) -> None:
    path = tmp_path / "activity.csv"
    path.write_text("sample_id,step,logins,minutes,group,label\n"
                    "b,1,3,30,rural,1\na,0,1,10,urban,0\nb,0,2,20,rural,1\na,1,4,40,urban,0\n",
                    encoding="utf-8")
    ds = load_csv_series(path)
    series = ds.inputs["activity"]
    assert isinstance(series, np.ndarray) and series.shape == (2, 2, 2)  # the group is no feature
    assert series[0].tolist() == [[2.0, 20.0], [3.0, 30.0]]
    assert ds.group_of() == ["rural", "urban"] and ds.labels.tolist() == [1, 0]
    no_header = tmp_path / "plain.csv"
    no_header.write_text("a,0,1,10,0\na,1,4,40,0\n", encoding="utf-8")
    assert load_csv_series(no_header).groups is None
    header = tmp_path / "header.csv"
    header.write_text("sample_id,step,logins,minutes,label\na,0,1,10,0\n", encoding="utf-8")
    assert load_csv_series(header).groups is None


@pytest.mark.parametrize(("body", "line", "expect"), [
    ("a,0,1,2,x,0\na,1,1,2,y,0\n", 3, "sample 'a' is in group 'y', earlier rows say 'x'"),
    ("a,0,1,2,x,0\na,1,1,2, ,0\n", 3, "column 5 .the group. must be a non-empty"),
    ("a,0,1,2,x,0\na,1,1,2,0\n", 3, "expected 6 columns, got 5"),
])
def test_csv_bad_group_names_file_and_line(tmp_path: Path, body: str, line: int,
                                           expect: str) -> None:
    path = tmp_path / "series.csv"
    path.write_text("sample_id,step,f1,f2,group,label\n" + body, encoding="utf-8")
    with pytest.raises(ConfigError, match=expect) as info:
        load_csv_series(path)
    assert f"{path}:{line}:" in str(info.value)


def test_csv_group_column_must_precede_the_label(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    path.write_text("sample_id,step,group,f1,label\na,0,x,1,0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="just before the label") as info:
        load_csv_series(path)
    assert f"{path}:1:" in str(info.value)


@pytest.mark.parametrize("groups", [np.array([2, 1, 2]), np.array(["b", "a", "b"])])
def test_npz_groups(tmp_path: Path, groups: np.ndarray) -> None:
    path = tmp_path / "scans.npz"
    np.savez(path, images=np.zeros((3, 4, 4)), labels=np.array([0, 1, 0]), groups=groups)
    ds = load_image_array(path)
    assert ds.groups is not None and ds.groups.tolist() == [1, 0, 1]
    assert ds.group_of() == [str(g) for g in groups.tolist()]
    plain = tmp_path / "plain.npz"
    np.savez(plain, images=np.zeros((3, 4, 4)), labels=np.array([0, 1, 0]))
    assert load_image_array(plain).groups is None


@pytest.mark.parametrize(("groups", "expect"), [
    (np.array([0, 1]), "2 groups but 3 labels"),
    (np.array([[0], [1], [2]]), "1-D array of integers or strings"),
    (np.array([0.5, 1.0, 2.0]), "1-D array of integers or strings"),
    (np.array([True, False, True]), "1-D array of integers or strings"),
    (np.array(["a", "", "b"]), "sample 2 has an empty group"),
])
def test_npz_bad_groups(tmp_path: Path, groups: np.ndarray, expect: str) -> None:
    path = tmp_path / "scans.npz"
    np.savez(path, images=np.zeros((3, 4, 4)), labels=np.array([0, 1, 0]), groups=groups)
    with pytest.raises(ConfigError, match=expect) as info:
        load_image_array(path)
    assert str(path) in str(info.value)


def _engagement(tmp_path: Path, csv_groups: list[str] | None,
                text_groups: list[str] | None) -> dict[str, dict[str, DataSource]]:
    """An engagement task of two students, groups in either file, both or none."""
    header = "sample_id,step,a,b,c,d" + (",group" if csv_groups else "") + ",label\n"
    rows = "".join(f"s{i},{t},1,1,1,1" + (f",{csv_groups[i]}" if csv_groups else "") + f",{i}\n"
                   for i in range(2) for t in range(2))
    (tmp_path / "act.csv").write_text(header + rows, encoding="utf-8")
    notes = [{"text": f"note {i}", "label": i, **({"g": text_groups[i]} if text_groups else {})}
             for i in range(2)]
    _jsonl(tmp_path / "notes.jsonl", notes)
    options = (("group_field", "g"),) if text_groups else ()
    return {"engagement": {"activity": DataSource("series-csv", "act.csv"),
                           "text": DataSource("text-jsonl", "notes.jsonl", options)}}


@pytest.mark.parametrize(("csv_groups", "text_groups"), [
    (["x", "y"], None), (None, ["x", "y"]), (["x", "y"], ["x", "y"])])
def test_a_task_takes_its_groups_from_any_of_its_files(
        tmp_path: Path, csv_groups: list[str] | None, text_groups: list[str] | None) -> None:
    data = load_task_data(_engagement(tmp_path, csv_groups, text_groups), tmp_path)
    task = data["engagement"]
    assert task.groups is not None and task.groups.tolist() == [0, 1]
    assert task.group_names == ("x", "y")
    held = task.subset(np.array([1]))
    assert held.groups is not None and held.groups.tolist() == [1]
    assert held.group_names == ("x", "y")


def test_a_task_without_groups_has_none(tmp_path: Path) -> None:
    task = load_task_data(_engagement(tmp_path, None, None), tmp_path)["engagement"]
    assert task.groups is None and task.group_names == ()


def test_a_tasks_files_must_agree_on_groups(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sample 2 is in group 'z' but 'y' in") as info:
        load_task_data(_engagement(tmp_path, ["x", "y"], ["x", "z"]), tmp_path)
    assert "notes.jsonl" in str(info.value) and "act.csv" in str(info.value)
