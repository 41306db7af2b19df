"""A run's outcome in one dict, the source of ``summary.json``, ``summary.txt`` and the console's last lines.

``summary.txt`` and the console are rendered from the very dict ``summary.json`` holds, when it is
written, so no figure can differ between them: a figure the text shows is a field of the JSON.
Light on purpose (no plotting, no torch): ``fedapp.server.results`` renders the text with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedapp.server.stopping import best_round, round_score


def strategy_label(
    strategy: str,
    fusion_fn: str | None = None,
    dp: str | None = None,
    personalization: str | None = None,
    secagg: bool = False,
) -> str:
    """``fedavg``, ``fusion (krum)``, ``fedavg + dp server-side``, ``fedavg + fedper``, ``fedavg +
    secagg``: the aggregation rule (personalization, privacy) in a few words."""
    label = f"{strategy} ({fusion_fn})" if strategy == "fusion" and fusion_fn else strategy
    if personalization not in (None, "", "none"):
        label += f" + {personalization}"
    if secagg:
        label += " + secagg"
    return label if dp in (None, "", "none") else f"{label} + dp {dp}"


def _listed(record: Mapping[str, Any], section: str, key: str) -> int | None:
    """Length of the list ``record[section][key]``; None when the phase did not run."""
    block = record.get(section)
    value = block.get(key) if isinstance(block, Mapping) else None
    return len(value) if isinstance(value, list) else None


def history_figures(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary's figures that come from the round history (``rounds.jsonl``'s records).

    Best is over the trained rounds (round 0, the initial model, is not a result of training), as
    the best checkpoint is chosen; the initial model's score is given beside it, so a run whose
    training only made the model worse says so. Scores: central video accuracy, else the clients'.
    """
    trained = [r for r in rounds if r.get("round", 0) >= 1]
    last = rounds[-1] if rounds else {}
    initial = round_score(rounds[0]) if rounds and rounds[0].get("round") == 0 else None
    best = best_round(rounds)
    accepted = [n for n in (_listed(r, "train-clients", "clients") for r in trained) if n is not None]
    figures: dict[str, Any] = {
        "rounds-completed": int(last.get("round", 0)),
        "rounds-without-update": sum(1 for r in trained if (r.get("train-clients") or {}).get("skipped")),
        "final-central": dict(last.get("central") or {}),
        "final-evaluate": dict(last.get("evaluate") or {}),
        "initial-video-accuracy": initial,
        "best-round": best[0] if best else None,
        "best-video-accuracy": best[1] if best else None,
        "clients-per-round": (
            {"mean": sum(accepted) / len(accepted), "min": min(accepted), "max": max(accepted)} if accepted else None
        ),
    }
    for phase in ("train", "evaluate"):
        for outcome in ("rejected", "failed"):
            figures[f"{phase}-{outcome}"] = sum(_listed(r, f"{phase}-clients", outcome) or 0 for r in trained)
    figures["final-sites"] = site_figures(trained)
    return figures


def site_figures(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Per-site video accuracy of the last round with client evaluation, its unweighted mean over
    the sites and the worst site: the weighted client mean is the central figure again (the test
    split is spread over the sites), the worst site is what a skewed federation hides. With
    personalization, the same of each site's personal model (``personal``) beside the global one's.
    None when no round evaluated on the clients."""
    for record in reversed(rounds):
        clients = (record.get("evaluate-clients") or {}).get("clients") or []
        sites = [
            {
                "partition-id": c.get("partition-id"),
                "node-id": c.get("node-id"),
                "video-accuracy": c["video-accuracy"],
                "num-videos": c.get("num-videos"),
                **(
                    {"personal-video-accuracy": c["personal-video-accuracy"]}
                    if isinstance(c.get("personal-video-accuracy"), int | float)
                    else {}
                ),
            }
            for c in clients
            if isinstance(c.get("video-accuracy"), int | float)
        ]
        if sites:
            figures = {"round": record.get("round"), "sites": sites, **_mean_worst(sites, "video-accuracy")}
            personal = [site for site in sites if "personal-video-accuracy" in site]
            if personal:
                figures["personal"] = {"sites": len(personal), **_mean_worst(personal, "personal-video-accuracy")}
            return figures
    return None


def _mean_worst(sites: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    worst = min(sites, key=lambda site: site[key])
    return {"mean": sum(site[key] for site in sites) / len(sites), "worst": worst[key], "worst-site": _site_name(worst)}


def _site_name(site: Mapping[str, Any]) -> str:
    pid = site.get("partition-id")
    return f"partition {pid}" if pid is not None else f"node {site.get('node-id')}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _scores(metrics: Mapping[str, Any]) -> str:
    """``video-acc 0.8750 clip-acc 0.8125 loss 0.4210`` of whichever of them ``metrics`` holds."""
    shown = (("video-accuracy", "video-acc"), ("clip-accuracy", "clip-acc"), ("loss", "loss"))
    return " ".join(f"{label} {metrics[key]:.4f}" for key, label in shown if metrics.get(key) is not None)


def _label(summary: Mapping[str, Any]) -> str | None:
    if not summary.get("strategy"):
        return None
    privacy = summary.get("privacy") or {}
    return strategy_label(
        summary["strategy"], summary.get("fusion-fn"), privacy.get("mode"), summary.get("personalization"),
        bool(summary.get("secagg")),
    )  # fmt: skip


def _best(summary: Mapping[str, Any]) -> str | None:
    if summary.get("best-video-accuracy") is None:
        return None
    text = f"best video-acc {summary['best-video-accuracy']:.4f} at round {summary['best-round']}"
    if summary.get("initial-video-accuracy") is not None:
        text += f" (initial model {summary['initial-video-accuracy']:.4f})"
    return text


def _sites(summary: Mapping[str, Any]) -> str | None:
    sites = summary.get("final-sites")
    if not sites:
        return None
    text = (
        f"sites video-acc mean {sites['mean']:.4f}, worst {sites['worst']:.4f} ({sites['worst-site']}) "
        f"over {len(sites['sites'])}"
    )
    personal = sites.get("personal")
    if personal:
        text += (
            f"; personal models mean {personal['mean']:.4f}, worst {personal['worst']:.4f} "
            f"({personal['worst-site']}) over {personal['sites']}"
        )
    return text


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The few lines the console ends a run with: outcome, accuracy, where the results are."""
    if summary.get("status") != "completed":
        lines = [
            f"run failed after {summary.get('rounds-completed', 0)} rounds ({summary.get('wall-time-s', 0.0):.1f} s): "
            f"{summary.get('error', 'unknown error')}"
        ]
    else:
        rounds = summary.get("rounds-completed", 0)
        head = [f"run completed: {rounds} round{'' if rounds == 1 else 's'}"]
        head += [label] if (label := _label(summary)) else []
        head += [f"stop: {summary.get('stop-reason')}", f"{summary.get('wall-time-s', 0.0):.1f} s"]
        lines = [" · ".join(head)]
        accuracy = []
        if scores := _scores(summary.get("final-central") or {}):
            accuracy.append(f"final central {scores}")
        elif scores := _scores(summary.get("final-evaluate") or {}):
            accuracy.append(f"final client-evaluate {scores}")
        accuracy += [best] if (best := _best(summary)) else []
        accuracy += [sites] if (sites := _sites(summary)) else []
        lines.append(" · ".join(accuracy) or "video accuracy: not measured (central and client evaluation off)")
    if summary.get("results-dir"):
        lines.append(f"results: {summary['results-dir']}")
    return lines


def _result_lines(summary: Mapping[str, Any]) -> list[str]:
    """``summary.txt``'s accuracy lines of a completed run: final scores, best round, sites."""
    lines = []
    measured = False
    for name, key in (("central", "final-central"), ("client-evaluate", "final-evaluate")):
        if scores := _scores(summary.get(key) or {}):
            lines.append(f"final {name}: {scores}")
            measured = True
    if best := _best(summary):
        lines.append(best)
    if sites := _sites(summary):
        per_site = ", ".join(
            f"{_site_name(site)} {site['video-accuracy']:.4f}" for site in summary["final-sites"]["sites"]
        )
        lines.append(f"{sites} (round {summary['final-sites']['round']}: {per_site})")
    if not measured and not best:
        lines.append("video accuracy: not measured (central and client evaluation off)")
    return lines


def _privacy_line(privacy: Mapping[str, Any]) -> str:
    epsilon = privacy.get("epsilon")
    return (
        f"privacy: {privacy.get('mode')}, noise multiplier {privacy.get('noise-multiplier')}, clipping norm "
        f"{privacy.get('clipping-norm')}, "
        + (
            f"epsilon {epsilon:.4f} at delta {privacy.get('delta')}"
            if epsilon is not None
            else f"epsilon n/a ({privacy.get('accounting', 'not accounted')})"
        )
    )


def summary_text(summary: Mapping[str, Any]) -> str:
    """``summary.txt``: the summary dict for people, every figure one of its fields."""
    status = summary.get("status", "unknown")
    lines = [f"status: {status}"]
    if summary.get("error"):
        lines.append(f"error: {summary['error']}")
    if label := _label(summary):
        lines.append(f"strategy: {label}")
    if summary.get("model"):
        lines.append(f"model: {summary['model']}")
    classes = summary.get("classes") or []
    if classes:
        shown = ", ".join(map(str, classes[:10])) + (", ..." if len(classes) > 10 else "")
        lines.append(f"classes: {len(classes)} ({shown})")
    rounds = f"rounds: {summary.get('rounds-completed', 0)} completed"
    if summary.get("rounds-without-update"):
        rounds += f", {summary['rounds-without-update']} without a global update"
    lines.append(rounds)
    if summary.get("stop-reason"):
        lines.append(f"stop reason: {summary['stop-reason']}")
    if status == "completed":
        lines += _result_lines(summary)
    if clients := summary.get("clients-per-round"):
        lines.append(
            f"clients per round (train, accepted): mean {clients['mean']:.1f}, min {clients['min']}, "
            f"max {clients['max']}"
        )
    for phase in ("train", "evaluate"):
        if f"{phase}-rejected" in summary:
            rejected, failed = summary[f"{phase}-rejected"], summary.get(f"{phase}-failed", 0)
            lines.append(f"{phase} replies rejected: {rejected}, clients failed: {failed}")
    if privacy := summary.get("privacy"):
        lines.append(_privacy_line(privacy))
    if summary.get("wall-time-s") is not None:
        wall = summary["wall-time-s"]
        lines.append(f"wall time: {wall:.1f} s" + (f" ({_duration(wall)})" if wall >= 60 else ""))
    if summary.get("run-id") is not None:
        lines.append(f"run id: {summary['run-id']}")
    if summary.get("results-dir"):
        lines.append(f"results: {summary['results-dir']}")
    return "\n".join(lines) + "\n"
