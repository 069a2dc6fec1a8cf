"""What ``p2pfed explain`` shows each reader of one explained prediction, and its HTML report.

One function per role returns a plain dict (what ``--json`` prints; the text and the HTML are
drawn from it), each adding to the one before:

* :func:`student_view` — the prediction (class, its name, its probability) and two or three
  of the strongest reasons in plain words; no member is named.
* :func:`instructor_view` — and every class's probability, each modality's share of the
  attribution, the attribution of every token / step, the strongest pixels of an image.
* :func:`admin_view` — and per component of the pipeline its attribution and the provenance
  of its state: each contributing member's share (by peer id) and the vector's flags.

:func:`render_html` writes one self-contained page: the role's content, its text escaped, and
matplotlib plots (Agg) embedded as ``data:image/png;base64`` URIs; nothing is fetched.

The numbers are those of :func:`p2pfed.model.explain.explain`; attributions are not causes.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (torch loads only to explain)
    from p2pfed.model.explain import Explanation

ROLES = ("student", "instructor", "admin")
CAVEAT = ("Attributions are not causes: they say which parts of this input moved the model's "
          "output from a blank baseline, not why the answer is right or what would change for "
          "a student.")
MODALITY_WORDS = {"text": "the text", "activity": "the activity trace", "image": "the image"}
TOWARDS, AGAINST = "#b2182b", "#2166ac"  # (the ends of the heat-maps' RdBu_r)
TOP = 8  # tokens, steps and pixels listed per modality


# ---------------------------------------------------------------------------- the numbers
def words_of(tokens: Sequence[str], attributions: Sequence[float]) -> list[tuple[str, float]]:
    """The text's words and their attributions: word pieces (``##…``) joined to the word
    before them (attributions summed), specials (``[CLS]``, ``[SEP]``, ``[PAD]``) left out."""
    words: list[tuple[str, float]] = []
    for token, value in zip(tokens, attributions, strict=True):
        if token.startswith("[") and token.endswith("]"):
            continue
        if token.startswith("##") and words:
            word, total = words[-1]
            words[-1] = (word + token[2:], total + value)
        else:
            words.append((token, value))
    return words


def _region(values: Sequence[float], shape: Sequence[int]) -> str | None:
    """Where an image's positive attribution lies most, in words ("top left", "centre"), or
    None when none is positive."""
    height, width = int(shape[0]), int(shape[1])
    cells = [[0.0] * 3 for _ in range(3)]
    for i, v in enumerate(values):
        if v > 0:
            row, col = divmod(i, width)
            cells[min(2, 3 * row // height)][min(2, 3 * col // width)] += v
    best = max(((r, c) for r in range(3) for c in range(3)), key=lambda rc: cells[rc[0]][rc[1]])
    if cells[best[0]][best[1]] <= 0:
        return None
    vertical = ("top", "middle", "bottom")[best[0]]
    horizontal = ("left", "centre", "right")[best[1]]
    if best == (1, 1):
        return "centre"
    return horizontal if vertical == "middle" else f"{vertical} {horizontal}".replace(
        " centre", "")


def _quoted(items: Sequence[str]) -> str:
    quoted = [f"'{w}'" for w in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def reasons(exp: Explanation, limit: int = 3) -> list[str]:
    """Up to ``limit`` of the strongest reasons for the prediction, in plain words."""
    found: list[str] = []
    against: list[str] = []  # (said after every reason for)
    shares = sorted(exp.modalities.items(), key=lambda ms: -ms[1])
    if len(shares) > 1 and shares[0][1] > 0:
        (top, share), (other, _) = shares[0], shares[1]
        found.append(f"{MODALITY_WORDS.get(top, top)} mattered more than "
                     f"{MODALITY_WORDS.get(other, other)} ({100 * share:.0f}% of the weight)")
    for modality, _share in shares:
        values = exp.inputs.get(modality, [])
        if modality == "text" and exp.tokens is not None:
            ranked = sorted(words_of(exp.tokens, values), key=lambda wv: wv[1])
            positive = [w for w, v in reversed(ranked) if v > 0][:3]
            negative = [w for w, v in ranked if v < 0][:2]
            if positive:
                noun = "word" if len(positive) == 1 else "words"
                found.append(f"the {noun} {_quoted(positive)} pointed to this answer most")
            if negative:
                noun = "word" if len(negative) == 1 else "words"
                against.append(f"the {noun} {_quoted(negative)} pointed away from it")
        elif modality == "activity":
            steps = [i + 1 for i, v in sorted(enumerate(values), key=lambda iv: -iv[1])
                     if v > 0][:2]
            if steps:
                which = " and ".join(str(s) for s in sorted(steps))
                found.append(f"step{'s' * (len(steps) > 1)} {which} of the activity trace "
                             f"pointed to this answer most")
        elif modality == "image":
            where = _region(values, exp.shapes.get("image", (1, len(values))))
            if where is not None:
                found.append(f"the {where} of the image pointed to this answer most")
    found += against
    if not found:
        found.append("nothing in this input stood out: the model leans to this answer even "
                     "for a blank input")
    return found[:limit]


def certainty(exp: Explanation, labels: Sequence[str] | None) -> str:
    """How sure the model is, in plain words (the runner-up named when it is close)."""
    p = exp.probability
    ranked = sorted(range(len(exp.probabilities)), key=lambda i: -exp.probabilities[i])
    runner = ranked[1] if len(ranked) > 1 else None
    words = "very sure" if p >= 0.9 else "fairly sure" if p >= 0.6 else "unsure"
    said = f"the model is {words} ({100 * p:.0f}%)"
    if runner is not None and p - exp.probabilities[runner] < 0.1:
        name = _label(labels, runner) or f"class {runner}"
        said += f"; {name} is almost as likely ({100 * exp.probabilities[runner]:.0f}%)"
    return said


def _label(labels: Sequence[str] | None, index: int) -> str | None:
    return labels[index] if labels is not None and 0 <= index < len(labels) else None


def student_view(exp: Explanation, labels: Sequence[str] | None, round_: int) -> dict[str, Any]:
    """The prediction and its strongest reasons in plain words; no member ids."""
    return {"role": "student", "task": exp.task, "round": round_,
            "prediction": {"class": exp.predicted, "label": _label(labels, exp.predicted),
                           "probability": exp.probability},
            "certainty": certainty(exp, labels), "reasons": reasons(exp), "caveat": CAVEAT}


def _ranked(values: Sequence[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -abs(values[i]))[:TOP]


def instructor_view(exp: Explanation, labels: Sequence[str] | None,
                    round_: int) -> dict[str, Any]:
    """The student's view, every class's probability, each modality's share, and the
    attributions of the tokens, steps and pixels."""
    view = student_view(exp, labels, round_)
    view["role"] = "instructor"
    view["probabilities"] = [{"class": i, "label": _label(labels, i), "probability": p}
                             for i, p in enumerate(exp.probabilities)]
    view["modalities"] = dict(exp.modalities)
    view["baseline_probability"] = exp.baseline_probability
    view["delta"] = exp.delta
    inputs: dict[str, Any] = {}
    for modality, values in exp.inputs.items():
        if modality == "text" and exp.tokens is not None:
            words = words_of(exp.tokens, values)
            inputs["text"] = {
                "tokens": [{"token": t, "attribution": v}
                           for t, v in zip(exp.tokens, values, strict=True)],
                "top_words": [{"word": w, "attribution": v}
                              for w, v in sorted(words, key=lambda wv: -abs(wv[1]))[:TOP]]}
        elif modality == "activity":
            inputs["activity"] = {
                "steps": list(values),
                "top_steps": [{"step": i + 1, "attribution": values[i]}
                              for i in _ranked(values)]}
        elif modality == "image":
            shape = exp.shapes.get("image", (1, len(values)))
            width = int(shape[-1])
            inputs["image"] = {
                "shape": list(shape),
                "region": _region(values, shape),
                "positive": sum(v for v in values if v > 0),
                "negative": sum(v for v in values if v < 0),
                "top_pixels": [{"row": i // width, "col": i % width, "attribution": values[i]}
                               for i in _ranked(values)]}
    view["inputs"] = inputs
    return view


def admin_view(exp: Explanation, labels: Sequence[str] | None, round_: int,
               provenance: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The instructor's view and, per component, its attribution and the provenance of its
    state (``provenance``: component → what :func:`p2pfed.cli_explain.provenance_of` gives)."""
    view = instructor_view(exp, labels, round_)
    view["role"] = "admin"
    view["components"] = [{"component": c, "attribution": a,
                           "provenance": dict(provenance.get(c, {"error": "not read"}))}
                          for c, a in exp.components.items()]
    return view


def view_for(role: str, exp: Explanation, labels: Sequence[str] | None, round_: int,
             provenance: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    if role == "student":
        return student_view(exp, labels, round_)
    if role == "instructor":
        return instructor_view(exp, labels, round_)
    if role == "admin":
        return admin_view(exp, labels, round_, provenance)
    raise ValueError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


# ---------------------------------------------------------------------------- text
def headline(view: Mapping[str, Any]) -> str:
    pred = view["prediction"]
    name = f"{pred['label']} (class {pred['class']})" if pred["label"] else f"class {pred['class']}"
    return (f"{view['task']}: {name}, p = {pred['probability']:.3f} "
            f"(model of round {view['round']})")


def member_short(m: Mapping[str, Any]) -> str:
    """A member as a plot names it: the end of its peer id (as ``p2pfed provenance`` does)."""
    peer = str(m["peer_id"])
    name = peer[:16] if peer.startswith("unknown:") else f"…{peer[-8:]}"
    marks = [w for w, on in (("this node", m.get("self")), ("forgotten", m.get("forgotten")))
             if on]
    return f"{name} ({', '.join(marks)})" if marks else name


def member_name(m: Mapping[str, Any]) -> str:
    marks = [w for w, on in (("this node", m.get("self")), ("forgotten", m.get("forgotten")))
             if on]
    return f"{m['peer_id']} ({', '.join(marks)})" if marks else str(m["peer_id"])


# ---------------------------------------------------------------------------- HTML
def _png(fig: Any) -> str:
    """The figure as a data URI (and closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bars(names: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1))
    colours = [TOWARDS if v >= 0 else AGAINST for v in values]
    ax.barh(list(range(len(names))), list(values), color=colours)
    ax.set_yticks(list(range(len(names))), labels=list(names))
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.axvline(0, color="black", linewidth=0.5)
    return _png(fig)


def _steps(values: Sequence[float]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(12.0, 2 + 0.3 * len(values)), 2.8))
    steps = list(range(1, len(values) + 1))
    ax.bar(steps, list(values), color=[TOWARDS if v >= 0 else AGAINST for v in values])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xlabel("step of the activity trace")
    ax.set_ylabel("attribution")
    ax.set_title("attribution per step (red: towards the answer, blue: against)")
    return _png(fig)


def _token_heatmap(tokens: Sequence[str], values: Sequence[float]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    per_row = 8
    rows = (len(tokens) + per_row - 1) // per_row
    grid = np.full((rows, per_row), np.nan)
    for i, v in enumerate(values):
        grid[i // per_row, i % per_row] = v
    bound = float(np.nanmax(np.abs(grid))) if len(values) else 0.0
    fig, ax = plt.subplots(figsize=(per_row * 1.2, rows * 0.5 + 0.6))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound or -1, vmax=bound or 1, aspect="auto")
    for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
        dark = bound > 0 and abs(value) > 0.6 * bound
        ax.text(i % per_row, i // per_row, token, ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("attribution per token (red: towards the answer, blue: against)")
    fig.colorbar(image, ax=ax, fraction=0.03)
    return _png(fig)


def _saliency(values: Sequence[float], shape: Sequence[int]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.asarray(values, dtype=float).reshape(int(shape[0]), int(shape[1]))
    bound = float(np.abs(grid).max()) or 1.0
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("image saliency (attribution per pixel)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
         "text-align:left}img{max-width:100%}.caveat{color:#555;font-style:italic}")


def render_html(view: Mapping[str, Any], exp: Explanation) -> str:
    """One self-contained page for ``view`` (from ``exp``): escaped text, PNG data URIs."""
    import matplotlib

    matplotlib.use("Agg")
    e = html.escape
    parts = [f"<h1>Why the model says this: {e(headline(view))}</h1>",
             f"<p>{e(view['certainty'])}.</p>",
             "<h2>Reasons</h2><ul>" + "".join(f"<li>{e(r)}</li>" for r in view["reasons"])
             + "</ul>"]
    if "modalities" in view:
        parts.append("<h2>Probabilities</h2>" + _table(
            ["class", "label", "probability"],
            [(p["class"], p["label"] or "", f"{p['probability']:.4f}")
             for p in view["probabilities"]]))
        parts.append("<h2>What each input contributed</h2>")
        mods = view["modalities"]
        parts.append(_img(_bars(list(mods), [100 * v for v in mods.values()],
                                "share of the attribution per modality", "%"),
                          "share per modality"))
        inputs = view["inputs"]
        if "text" in inputs and exp.tokens is not None:
            parts.append("<h3>Text</h3>")
            parts.append(_img(_token_heatmap(exp.tokens, exp.inputs["text"]),
                              "attribution per token"))
            parts.append(_table(["word", "attribution"],
                                [(w["word"], f"{w['attribution']:+.4g}")
                                 for w in inputs["text"]["top_words"]]))
        if "activity" in inputs:
            steps = inputs["activity"]["steps"]
            parts.append("<h3>Activity trace</h3>")
            parts.append(_img(_steps(steps), "attribution per step"))
        if "image" in inputs:
            image = inputs["image"]
            parts.append("<h3>Image</h3>")
            parts.append(_img(_saliency(exp.inputs["image"], image["shape"]), "image saliency"))
            parts.append(f"<p>Most positive attribution: {e(image['region'] or 'none')}.</p>")
        parts.append(f"<p>Baseline probability {view['baseline_probability']:.4f}; "
                     f"integration error (delta) {view['delta']:.3g}.</p>")
    if "components" in view:
        parts.append("<h2>Components and the members behind them</h2>")
        comps = view["components"]
        parts.append(_img(_bars([c["component"] for c in comps],
                                [c["attribution"] for c in comps],
                                "probability drop with the component at its initial values",
                                "attribution"), "attribution per component"))
        for c in comps:
            prov = c["provenance"]
            parts.append(f"<h3>{e(c['component'])}</h3>")
            if "error" in prov:
                parts.append(f"<p>Provenance not available: {e(str(prov['error']))}</p>")
                continue
            parts.append(f"<p>State of round {e(str(prov['round']))} ({e(prov['source'])}): "
                         f"{e(prov['flags_text'])}; total mass {prov['total_mass']:.6g}.</p>")
            members = prov["members"]
            if members:
                parts.append(_img(_bars([member_short(m) for m in members],
                                        [100 * m["share"] for m in members],
                                        f"members' shares of {c['component']}", "%"),
                                  f"members' shares of {c['component']}"))
            parts.append(_table(["member", "share", "mass"],
                                [(member_name(m), f"{100 * m['share']:.2f}%",
                                  f"{m['mass']:.6g}") for m in members]))
    parts.append(f'<p class="caveat">{e(view["caveat"])}</p>')
    title = e(f"p2pfed explain {view['task']} ({view['role']})")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")
