"""``p2pfed simulate``'s summary: the tables printed after a run (from its JSON report)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

out = Console()


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def _print_sim_summary(report: dict[str, Any]) -> None:
    title = (f"{report['topology']}: {report['nodes']} nodes, {report['rounds']} rounds, "
             f"seed {report['seed']}, {report['wall_s']:.1f} s")
    components = report["components"]
    # a trained component's holders train apart between mixes: its consensus distance says
    # nothing about quality (the JSON report keeps it); its tasks' accuracy does
    trained = {n: c for n, c in components.items() if c.get("tasks")}
    mixed = {n: c for n, c in components.items() if n not in trained}
    if mixed:
        table = Table(title=title)
        for col in ("component", "holders", "SLEM", "to 1e-6", "bound", "distance", "drift"):
            table.add_column(col, justify="left" if col == "component" else "right",
                             no_wrap=True)
        for name, c in mixed.items():
            dist = c["consensus_distance"]
            table.add_row(
                name, str(c["holders"]), _fmt(c["slem"], ".4f"),
                str(c["rounds_to_1e-6"] or "—"), str(c["bound_rounds_to_1e-6"] or "—"),
                _fmt(dist[-1] if dist else None, ".2e"), _fmt(c["mean_drift"], ".1e"),
            )
        out.print(table)
    if trained:
        tasks = report.get("tasks", {})
        table = Table(title=title if not mixed else "trained components")
        for col in ("component", "holders", "SLEM", "trained for", "federated accuracy"):
            table.add_column(col, justify="right" if col in ("holders", "SLEM") else "left")
        for name, c in trained.items():
            accs = ", ".join(f"{t} {tasks[t]['federated']:.3f}" for t in c["tasks"]
                             if t in tasks)
            table.add_row(name, str(c["holders"]), _fmt(c["slem"], ".4f"),
                          ", ".join(c["tasks"]), accs or "—")
        out.print(table)
    if "tasks" in report:
        tasks = Table(title="test accuracy, mean over the holders of each task")
        for col in ("task", "holders", "federated", "local only", "centralized"):
            tasks.add_column(col, justify="left" if col == "task" else "right")
        for name, t in report["tasks"].items():
            tasks.add_row(name, str(t["holders"]), f"{t['federated']:.3f}",
                          _fmt(t.get("local_only"), ".3f"), _fmt(t.get("centralized"), ".3f"))
        out.print(tasks)
    if "honest_accuracy" in report:
        a = report["attack"]
        table = Table(title=f"{a['count']} × {a['kind']} ({', '.join(a['nodes'])}), "
                            f"defence {a['robust']}: accuracy of the honest nodes")
        for col in ("task", "attacked", "without attackers"):
            table.add_column(col, justify="left" if col == "task" else "right")
        for task, acc in report["honest_accuracy"].items():
            table.add_row(task, f"{acc:.3f}", f"{report['honest_accuracy_fault_free'][task]:.3f}")
        out.print(table)
    if "unlearning" in report:
        u = report["unlearning"]
        table = Table(title=f"unlearning {u['node']} after round {u['requested_at_round']} "
                            f"({u['mode']})")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in u.items():
            if isinstance(value, float):
                table.add_row(key, format(value, ".3g"))
            elif isinstance(value, list):
                table.add_row(key, ", ".join(value) or "—")
        out.print(table)
    _print_continual(report)
    if "provenance_study" in report:
        p = report["provenance_study"]
        table = Table(title=f"{p['scaled']}'s updates ×{p['scale']:g}: ρ(share of j at i, "
                            f"‖x_i − x_i without j‖ (unlearn) or with j's updates zero (contrib)); "
                            f"top: share of nodes where {p['scaled']}'s is the largest; agree: "
                            "same member largest", pad_edge=False)
        for col in ("component", "vs", "mean", "min", "pooled", "member level", "top share",
                    "top disp", "agree"):
            table.add_column(col, justify="left" if col in ("component", "vs") else "right",
                             max_width=6 if " " in col else None)  # (headers on two lines)
        for name, comp in p["components"].items():
            for label, c in (("unlearn", comp), ("contrib", comp.get("contribution"))):
                if c is not None:
                    table.add_row(name if label == "unlearn" else "", label,
                                  *(_fmt(c[k], ".3f") for k in (
                                      "mean", "min", "pooled", "member_level",
                                      "scaled_largest_share", "scaled_largest_displacement",
                                      "largest_share_is_largest_displacement")))
        out.print(table)
    _print_explain(report)
    _print_fairness(report)
    _print_hardware(report)
    if mixed:
        out.print("to 1e-6: rounds until the consensus distance fell below 1e-6 (— not yet)\n"
                  "bound: ⌈ln 1e-6 / ln SLEM⌉; drift: largest change of the holders' mean")
    if trained:
        out.print("trained components: federated accuracy is the test accuracy of each task "
                  "that trains the component, mean over the task's holders (SLEM: how fast "
                  "its holders' mixing alone would agree)")
    net = report["network"]
    out.print(
        f"network: {net['messages']} signed announcements, {net['fetches']} payload fetches "
        f"({net['fetch_bytes'] / 1e6:.1f} MB), {net['dropped']} dropped"
    )


def _print_continual(report: dict[str, Any]) -> None:
    """The continual and participation studies' tables (when the report has them)."""
    if "continual" in report:
        c = report["continual"]
        table = Table(title=f"continual {c['schedule']}: final accuracy (forgetting; gap to "
                            "joint training)")
        runs = c["runs"]
        table.add_column("task")
        for name in runs:
            table.add_column(name, justify="right")
        for task in next(iter(runs.values()))["final"]:
            cells = []
            for run in runs.values():
                cell = f"{run['final'][task]:.3f}"
                if task in run["forgetting"]:
                    cell += f" (−{run['forgetting'][task]:.3f}"
                    cell += f"; {run['new_task_gap'][task]:+.3f})" if "new_task_gap" in run \
                        else ")"
                elif "new_task_gap" in run:
                    cell += f" ({run['new_task_gap'][task]:+.3f})"
                cells.append(cell)
            table.add_row(task, *cells)
        out.print(table)
    if "participation" in report:
        p = report["participation"]
        table = Table(title=f"{len(p['nodes'])} nodes train part-time: rounds per simulated "
                            f"minute ({p['train_s']:g} s a training)")
        for col in ("nodes", "part-time run", "everyone trains"):
            table.add_column(col, justify="left" if col == "nodes" else "right")
        for group in ("fast", "slow"):
            table.add_row(group, _fmt(p["rounds_per_min"][group], ".2f"),
                          _fmt(p["rounds_per_min_everyone_trains"][group], ".2f"))
        out.print(table)


def _print_explain(report: dict[str, Any]) -> None:
    """``--explain``'s faithfulness table (when the report has it)."""
    if "explain" not in report:
        return
    e = report["explain"]
    table = Table(title=f"explaining {e['examples']} held-out examples per task: drops of the "
                        "predicted class's probability when deleting")
    for col in ("task", "node", "top modality > least", "top 20% words", "random 20% words"):
        table.add_column(col, justify="left" if col in ("task", "node") else "right")
    f = e["faithfulness"]
    for task, row in [*f["per_task"].items(), ("overall", f["overall"])]:
        text = row["text_top_vs_random"] or {}
        table.add_row(task, row.get("node", ""), _fmt(row["modality_top_beats_least"], ".3f"),
                      _fmt(text.get("top"), ".4f"), _fmt(text.get("random"), ".4f"))
    out.print(table)
    out.print(f"provenance max error {_fmt(e['provenance_max_error'], '.1e')}; attributions "
              "are not causes")


def _rule_label(rule: dict[str, Any]) -> str:
    """The fairness rule as ``--fairness`` names it (``group-dro+loss-mixing`` ...)."""
    parts = [rule["objective"]] if rule["objective"] != "erm" else []
    if rule.get("mixing") == "loss":
        parts.append("loss-mixing")
    return "+".join(parts) or "erm"


def _print_fairness(report: dict[str, Any]) -> None:
    """The group study's table (when the report has it): per task and run the mean, the worst
    and 10th-percentile node, each group and the worst-group gap."""
    if "fairness" not in report:
        return
    f = report["fairness"]
    table = Table(title="groups: accuracy per task (mean weighs the groups by their training "
                        "shares; gap: best group − worst group)")
    for col in ("task", "run", "mean", "worst node", "p10 node", "majority", "minority", "gap"):
        table.add_column(col, justify="left" if col in ("task", "run") else "right")
    rule = f.get("rule")
    label = "" if rule is None else _rule_label(rule)
    for task, runs in f["tasks"].items():
        rows = list(runs.items())
        if rule is not None:
            rows.append((label, rule["tasks"][task]))
            if "centralized" in rule:
                rows.append((f"centralized, {rule['objective']}",
                             rule["centralized"]["tasks"][task]))
        for name, m in rows:
            table.add_row(task, name, *(_fmt(m[k], ".3f") for k in (
                "mean", "worst_node", "p10_node")),
                *(_fmt(m["groups"].get(g), ".3f") for g in ("majority", "minority")),
                _fmt(m["worst_group_gap"], ".3f"))
    out.print(table)
    if rule is not None:
        for name, part in (("federated", rule), ("centralized", rule.get("centralized"))):
            if part is not None:
                out.print(f"{label if part is rule else rule['objective']}, {name}: " + ", ".join(
                    f"{t}: gap narrowed {part['gap_narrowed'][t]:+.0%}, mean "
                    f"{part['mean_change'][t]:+.3f}" for t in part["tasks"]))


def _print_hardware(report: dict[str, Any]) -> None:
    """The hardware study's table (when the report has it): per group the pace of the
    furthest and the slowest component and each task's accuracy, with the profiles and with
    everyone a server."""
    if "hardware" not in report:
        return
    h = report["hardware"]
    runs = {"profiles": h["with_profiles"], "servers": h["everyone_server"]}
    tasks = sorted(h["with_profiles"].get("accuracy", {}))
    table = Table(title=f"hardware: rounds per simulated minute (furthest / slowest "
                        f"component) and accuracy per group; round timeout "
                        f"{h['round_timeout_s']:g} s")
    for col in ("group", "run", "r/min", "r/min slowest", *tasks):
        table.add_column(col, justify="left" if col in ("group", "run") else "right")
    for group in runs["profiles"]["rounds_per_min"]:
        for name, run in runs.items():
            table.add_row(group, name, _fmt(run["rounds_per_min"].get(group), ".2f"),
                          _fmt(run["rounds_per_min_slowest_component"].get(group), ".2f"),
                          *(_fmt(run["accuracy"][t].get(group), ".3f") for t in tasks))
    out.print(table)
    share = h["with_profiles"]["profiled_states_mixed"]
    out.print(f"profiled members' states in their neighbours' mixes: {_fmt(share, '.0%')} "
              f"(everyone a server: {_fmt(h['everyone_server']['profiled_states_mixed'], '.0%')})")
