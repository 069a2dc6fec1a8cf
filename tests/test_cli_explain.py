"""``p2pfed explain TASK --input FILE``: one prediction explained to a student, an instructor or
an administrator, as JSON, text and a self-contained HTML report.

The home is real: made by ``init`` from sample data, in a federation, its daemon run for six
rounds (it checkpoints every five), as ``p2pfed predict``'s tests make theirs.  The role views'
plain words and the HTML's plots for the modalities that home lacks (an image, an activity
trace beside a text) are checked on hand-made explanations."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gossip.identity import load_identity
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.explain_report import admin_view, instructor_view, reasons, render_html, student_view
from p2pfed.model.explain import Explanation
from p2pfed.model.tasks import LABELS
from tests.test_daemon import run_daemon_rounds
from tests.test_predict import m3t_home

STUDENT_KEYS = {"role", "task", "round", "prediction", "certainty", "reasons", "caveat"}
INSTRUCTOR_KEYS = STUDENT_KEYS | {"probabilities", "modalities", "baseline_probability",
                                  "delta", "inputs"}
ADMIN_KEYS = INSTRUCTOR_KEYS | {"components"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A daemon's home with a checkpointed m3t topic model, its sample files, its peer id."""
    home, samples = m3t_home(tmp_path_factory.mktemp("explain"), "topic",
                             "--listen", "/ip4/127.0.0.1/tcp/0")
    run_daemon_rounds(home, 6)
    return home, samples, load_identity(home / "identity.key").peer_id


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    got = capsys.readouterr()
    return code, got.out, got.err


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def _images(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.sources


# ---------------------------------------------------------------------------- a daemon's home
@pytest.mark.network
@pytest.mark.slow
def test_each_role_gets_its_json_and_the_probability_is_predicts(
        trained: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    home, samples, me = trained
    example = ["--input", str(samples / "topic-text.jsonl"), "--index", "3", "--home", str(home)]
    code, out, _ = _run(capsys, "predict", "topic", *example, "--json")
    assert code == 0
    predicted = json.loads(out)
    views = {}
    for role in ("student", "instructor", "admin"):
        code, out, err = _run(capsys, "explain", "topic", *example, "--json", "--for", role)
        assert code == 0, err
        views[role] = json.loads(out)
        assert views[role]["role"] == role
        if role != "admin":
            assert me not in out and "12D3KooW" not in out  # (no member is named)
    student, instructor, admin = views["student"], views["instructor"], views["admin"]
    assert set(student) == STUDENT_KEYS
    assert set(instructor) == INSTRUCTOR_KEYS and set(admin) == ADMIN_KEYS
    code, out, _ = _run(capsys, "explain", "topic", *example, "--json")
    assert code == 0 and json.loads(out) == instructor  # (the default role)

    pred = student["prediction"]
    assert pred["class"] == predicted["label"] and pred["label"] == predicted["prediction"]
    assert pred["label"] == LABELS["topic"][pred["class"]]
    assert pred["probability"] == pytest.approx(
        predicted["probabilities"][predicted["prediction"]], abs=1e-6)
    assert student["round"] == predicted["round"] >= 5
    assert 1 <= len(student["reasons"]) <= 3 and all(isinstance(r, str)
                                                     for r in student["reasons"])
    assert student["caveat"].startswith("Attributions are not causes")

    assert instructor["modalities"] == {"text": 1.0}
    assert [p["label"] for p in instructor["probabilities"]] == list(LABELS["topic"])
    for p in instructor["probabilities"]:
        assert p["probability"] == pytest.approx(predicted["probabilities"][p["label"]],
                                                 abs=1e-6)
    text = instructor["inputs"]["text"]
    assert text["tokens"][0]["token"] == "[CLS]" and text["tokens"][-1]["token"] == "[SEP]"
    attributed = sum(t["attribution"] for t in text["tokens"])
    gap = pred["probability"] - instructor["baseline_probability"]
    assert abs(attributed - gap) < 1e-6 and abs(instructor["delta"]) < 1e-6  # (completeness)
    assert 1 <= len(text["top_words"]) <= 8

    components = {c["component"]: c for c in admin["components"]}
    assert set(components) == {"encoder.text.lora", "head.topic"}
    for c in components.values():
        prov = c["provenance"]
        assert prov["source"] == "checkpoint" and prov["round"] == student["round"]
        assert prov["flags"] == "exact" and prov["total_mass"] > 0
        assert sum(m["share"] for m in prov["members"]) == pytest.approx(1.0, abs=1e-9)
        mine = next(m for m in prov["members"] if m["self"])
        assert mine["peer_id"] == me and mine["share"] > 0  # (this node trained it)


@pytest.mark.network
@pytest.mark.slow
def test_the_html_report_embeds_its_plots_and_names_the_members_for_an_admin_only(
        trained: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    home, samples, me = trained
    example = ["--input", str(samples / "topic-text.jsonl"), "--home", str(home)]
    pages = {}
    for role in ("student", "admin"):
        out = tmp_path / f"{role}.html"
        code, said, err = _run(capsys, "explain", "topic", *example, "--for", role,
                               "--html", str(out))
        assert code == 0, err
        assert f"wrote {out}" in " ".join(said.split())
        pages[role] = out.read_text(encoding="utf-8")
    admin, student = pages["admin"], pages["student"]
    images = _images(admin)
    # modality bars, token heat-map, component bars, a member bar chart per component
    assert len(images) == 5
    assert all(src.startswith("data:image/png;base64,") for src in images)
    # no external assets: nothing but the embedded images names a link (a base64 image may
    # hold the letters "http" by chance, so those are cut out before looking)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", admin)
    assert "http" not in outside.lower().replace("<!doctype html>", "")
    assert me in admin and "this node" in admin
    assert "encoder.text.lora" in admin and "head.topic" in admin
    assert me not in student and "12D3KooW" not in student
    assert _images(student) == []  # (the student's page is words only)
    code, said, _ = _run(capsys, "explain", "topic", *example, "--for", "admin")
    said = " ".join(said.split())
    assert code == 0 and "head.topic: attribution" in said and me[:20] in said.replace(" ", "")


# ---------------------------------------------------------------------------- refusals
def test_bad_input_unknown_task_and_unwritable_report_are_refused_clearly(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, samples = m3t_home(tmp_path, "topic")  # (no daemon: refused before the model loads)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    code, _, err = _run(capsys, "explain", "topic", "--input", str(bad), "--home", str(home))
    assert code == exitcodes.CONFIG
    assert f"{bad}:2: invalid JSON" in " ".join(err.split()) and "Traceback" not in err

    csv = tmp_path / "bad.csv"
    csv.write_text("sample_id,step,logins,hours_on_task,submissions,forum_posts,label\n"
                   "0,0,1,2,3,4,0\n0,1,1,x,3,4,0\n", encoding="utf-8")
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "keeps up", "label": 0}\n', encoding="utf-8")
    code, _, err = _run(capsys, "explain", "engagement", "--input", str(csv), "--input",
                        str(notes), "--home", str(home))
    assert code == exitcodes.CONFIG and f"{csv}:3:" in " ".join(err.split())

    good = ["--input", str(samples / "topic-text.jsonl"), "--home", str(home)]
    code, _, err = _run(capsys, "explain", "maths", *good)
    assert code == exitcodes.CONFIG and "unknown task 'maths'" in err
    code, _, err = _run(capsys, "explain", "topic", *good, "--for", "parent")
    assert code == exitcodes.USAGE
    code, _, err = _run(capsys, "explain", "topic", "--input", str(samples / "topic-text.jsonl"),
                        "--home", str(tmp_path / "nowhere"))
    assert code == exitcodes.CONFIG and "no configuration" in err
    code, _, err = _run(capsys, "explain", "topic", *good, "--html",
                        str(tmp_path / "missing" / "r.html"))
    assert code == exitcodes.FAILURE and "cannot write" in err and "missing" in err
    code, _, err = _run(capsys, "explain", "topic", *good, "--html", str(tmp_path))
    assert code == exitcodes.FAILURE and "is a directory" in err
    code, _, err = _run(capsys, "explain", "topic", *good)  # (a home with no checkpoint yet)
    assert code == exitcodes.FAILURE and "no checkpoint of encoder.text.lora" in " ".join(
        err.split())


# ---------------------------------------------------------------------------- the views
def _explanation(**changes: Any) -> Explanation:
    base: dict[str, Any] = {
        "task": "engagement", "predicted": 1, "probability": 0.7,
        "probabilities": [0.2, 0.7, 0.1], "modalities": {"activity": 0.75, "text": 0.25},
        "inputs": {"activity": [0.01, 0.2, -0.05, 0.1], "text": [0.0, 0.05, -0.02, 0.03, 0.0]},
        "shapes": {"activity": (4,), "text": (5,)},
        "tokens": ["[CLS]", "<script>", "late", "##ly", "[SEP]"],
        "components": {"encoder.activity": 0.3, "head.engagement": -0.05},
        "baseline_probability": 0.33, "delta": 1e-8}
    base.update(changes)
    return Explanation(**base)


def test_the_plain_words_name_the_strongest_modality_words_and_steps() -> None:
    exp = _explanation()
    said = reasons(exp)
    assert said[0] == "the activity trace mattered more than the text (75% of the weight)"
    assert said[1] == "steps 2 and 4 of the activity trace pointed to this answer most"
    assert said[2] == "the words '<script>' and 'lately' pointed to this answer most"
    image = _explanation(
        task="digits", modalities={"image": 1.0}, tokens=None, shapes={"image": (3, 3)},
        inputs={"image": [0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.3]})
    assert reasons(image) == ["the top left of the image pointed to this answer most"]
    blank = _explanation(inputs={"activity": [0.0] * 4, "text": [0.0] * 5},
                         modalities={"activity": 0.0, "text": 0.0})
    assert reasons(blank)[0].startswith("nothing in this input stood out")


def test_each_view_adds_to_the_one_before_and_the_html_is_self_contained() -> None:
    exp = _explanation()
    labels = LABELS["engagement"]
    student = student_view(exp, labels, 7)
    assert student["prediction"] == {"class": 1, "label": labels[1], "probability": 0.7}
    assert student["certainty"] == "the model is fairly sure (70%)"
    instructor = instructor_view(exp, labels, 7)
    assert {k: instructor[k] for k in student if k != "role"} == {
        k: v for k, v in student.items() if k != "role"}
    assert instructor["inputs"]["activity"]["top_steps"][0] == {"step": 2, "attribution": 0.2}
    assert instructor["inputs"]["text"]["top_words"][0] == {"word": "<script>",
                                                            "attribution": 0.05}
    members = [{"peer_id": "12D3KooWpeerA", "tag": "aa", "share": 0.75, "mass": 3.0,
                "self": True, "forgotten": False},
               {"peer_id": "unknown:bb", "tag": "bb", "share": 0.25, "mass": 1.0,
                "self": False, "forgotten": False}]
    prov = {"encoder.activity": {"source": "checkpoint", "round": 7, "flags": "exact",
                                 "flags_text": "exact", "prov_flags": 0, "total_mass": 4.0,
                                 "members": members},
            "head.engagement": {"error": "no clean checkpoint of round 7 in the ledger"}}
    admin = admin_view(exp, labels, 7, prov)
    assert [c["component"] for c in admin["components"]] == ["encoder.activity",
                                                             "head.engagement"]
    assert admin["components"][0]["provenance"]["members"] == members
    page = render_html(admin, exp)
    images = _images(page)
    # modality bars, token heat-map, step bars, component bars, one member chart
    assert len(images) == 5 and all(s.startswith("data:image/png;base64,") for s in images)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "12D3KooWpeerA (this node)" in page and "no clean checkpoint of round 7" in page
    digits = _explanation(task="digits", modalities={"image": 1.0}, tokens=None,
                          shapes={"image": (2, 3)}, inputs={"image": [0.1, 0, 0, 0, 0, -0.2]},
                          probabilities=[0.1] * 9 + [0.1], predicted=0, probability=0.1)
    page = render_html(instructor_view(digits, LABELS["digits"], 1), digits)
    assert len(re.findall(r'<img src="data:image/png;base64,', page)) == 2  # modalities, image
