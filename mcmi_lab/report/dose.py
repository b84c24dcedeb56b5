"""The report's dose-response sections (07, and 08 on the known posterior): the matched teachers' means, the slopes
per method and metric, MCMI − label smoothing at each matched dose, the collapsed teachers (a count per method and
dose, outside every mean, slope and pair), and the omitted-class mass of the teachers (its rank correlation with
zero-shot accuracy and the methods compared on it at matched CMI).
"""
from __future__ import annotations

import math
from typing import Mapping

from ..figures.plots import METHOD_LABELS
from .markdown import Text, markdown_table, md_escape
from .summary import (PAPER_EFFECTS, Report, SeedRows, cell, difference, fmt, format_interval, number,
                      paper_check, seed_rows, seeds_needed, trend, values, verdict)
from ..metrics.stats import slope_over_seeds, spearman

#: The dose-response metrics of 07: key -> (words, scale, unit, claimed sign of MCMI − label smoothing, the paper's
#: effect in points or None).
DOSE_METRICS = {"student_acc": ("KD student accuracy", 100.0, "points", 1, PAPER_EFFECTS["kd"]),
                "few_shot_acc": ("few-shot student accuracy", 100.0, "points", 1, PAPER_EFFECTS["few_shot"]),
                "zero_shot_omitted_acc": ("zero-shot accuracy on the omitted classes", 100.0, "points", 1,
                                          PAPER_EFFECTS["zero_shot"]),
                "test_acc": ("teacher test accuracy", 100.0, "points", 1, None)}
#: The dose-response metrics of 08 (known posterior): closer to P* is a lower KL, so the claimed sign is negative.
BAYES_DOSE_METRICS = {"kl_to_bayes": ("KL(P* ‖ teacher) on test", 1.0, "nats", -1, None),
                      "test_acc": ("teacher test accuracy", 100.0, "points", 1, None)}


def method_name(name: object) -> str:
    return METHOD_LABELS.get(name, md_escape(name)) if isinstance(name, str) else md_escape(name)


def working(rows: SeedRows) -> SeedRows:
    """The rows without the collapsed teachers (``collapsed: True``): they enter no mean, slope or pair."""
    return {seed: [r for r in rs if r.get("collapsed") is not True] for seed, rs in rows.items()}


def _counted(r: Mapping) -> bool:
    """A row that enters slopes: the control, or a matched dose; with a number for its train CMI."""
    return (r.get("method") == "control" or r.get("matched") is True) and number(r.get("train_cmi")) is not None


def dose_slopes(rows: SeedRows, method: str, metric: str, scale: float = 100.0) -> dict:
    """The slope of `metric` (×`scale`: points for accuracies) against train CMI (nats) for `method`, one
    least-squares slope per seed over its matched doses and its control (dose 0), then their mean with a 95% t
    interval over the seeds; plus ``span`` (the mean over seeds of the train-CMI range the slope was fitted over)
    and ``flat`` (every value of the metric equal: no signal). Collapsed rows are left out."""
    points = {seed: [(number(r["train_cmi"]), scale * number(r[metric])) for r in rs
                     if r.get("method") in (method, "control") and _counted(r) and number(r.get(metric)) is not None]
              for seed, rs in working(rows).items()}
    d = slope_over_seeds(points)
    used = [pts for pts in points.values() if len({x for x, _ in pts}) >= 2]
    spans = [max(x for x, _ in pts) - min(x for x, _ in pts) for pts in used]
    ys = {y for pts in used for _, y in pts}
    return {**d, "span": sum(spans) / len(spans) if spans else math.nan, "flat": len(ys) == 1}


def collapsed_counts(rows: SeedRows) -> dict[tuple[str, float], list[str]]:
    """``{(method, dose): [seed, ...]}`` of the collapsed teachers."""
    out: dict[tuple[str, float], list[str]] = {}
    for seed, rs in rows.items():
        for r in rs:
            if r.get("collapsed") is True:
                out.setdefault((r.get("method"), r.get("dose")), []).append(seed)
    return out


def _collapsed(rep: Report, rows: SeedRows, where: str) -> None:
    counts = collapsed_counts(rows)
    if not counts:
        return
    seeds = len(rows)
    table = [{"method": Text(method_name(m)), "dose (nats)": fmt(dose, "g"), "collapsed": f"{len(s)} of {seeds} seeds",
              "seeds": ", ".join(s)} for (m, dose), s in counts.items()]
    rep.add("Collapsed teachers (no epoch of the fine-tune kept its eval-mode accuracy above the floor): left out "
            "of every mean, slope and pair below.", "", markdown_table(table), "")
    total = sum(len(s) for s in counts.values())
    rep.notes.setdefault("collapsed", []).append(
        f"Left out: {total} collapsed teacher(s){where and ' (' + where.strip(', ') + ')'} — "
        + "; ".join(f"{method_name(m)} at {fmt(dose, 'g')} ({len(s)} of {seeds} seeds)"
                    for (m, dose), s in counts.items()) + ".")


def dose_tables(rep: Report, rows: SeedRows, metrics: Mapping[str, tuple], where: str) -> None:
    """Collapsed counts, the matched teachers' means, slopes per method and metric, what was not matched, how high
    each method reached, and MCMI − label smoothing at each matched dose (each one a claim, labelled `where`)."""
    _collapsed(rep, rows, where)
    all_rows, rows = rows, working(rows)
    methods = [m for m in dict.fromkeys(r.get("method") for rs in rows.values() for r in rs)
               if m != "control" and isinstance(m, str)]
    doses = sorted({d for rs in rows.values() for r in rs if r.get("method") != "control"
                    and (d := number(r.get("dose"))) is not None})
    means = []  # the numbers behind the slopes: every matched (method, dose), mean ± std over its seeds
    for method, dose in [("control", 0.0)] + [(m, d) for d in doses for m in methods]:
        match = dict(method=method, dose=dose, matched=True)
        reached = values(rows, "train_cmi", **match)
        if reached:
            means.append({"method": Text(method_name(method)), "dose (nats)": f"{dose:g}",
                          "train CMI (nats)": cell(reached),
                          **{f"{words} ({'%' if scale > 1 else unit})": cell(values(rows, metric, **match), scale,
                                                                             1 if scale > 1 else 3)
                             for metric, (words, scale, unit, *_) in metrics.items()}})
    rep.add("#### Matched teachers", "", "Mean ± std over the seeds that reached the dose.", "",
            markdown_table(means), "")
    table = []
    for method in methods:
        for metric, (words, scale, unit, _, effect) in metrics.items():
            d = dose_slopes(rows, method, metric, scale)
            if d["n"]:
                table.append({"method": Text(method_name(method)), "metric": f"{words} ({unit} per nat)",
                              "slope (95% CI)": format_interval(d),
                              "dose span (nats)": fmt(d["span"]), "verdict": trend(d, d["span"]),
                              "paper's effect over the span": paper_check(d, effect, d["span"]) or "—"})
    rep.add("#### Slopes against the dose", "", "One least-squares slope per seed over its matched doses and the "
            "control, then the mean over seeds; for metrics the paper reports, whether the change over the dose span "
            "(slope × span) excludes the paper's effect." if table else "No slope: no method reached a matched dose "
            "in any seed.", "", markdown_table(table), "")
    unmatched: dict[tuple, list[str]] = {}  # (method, dose) -> "seed s: train CMI reached"
    for seed, rs in rows.items():
        for r in rs:
            if r.get("method") != "control" and r.get("matched") is not True:
                unmatched.setdefault((method_name(r.get("method")), fmt(r.get("dose"), "g")), []).append(
                    f"seed {md_escape(seed)}: {fmt(r.get('train_cmi'))}")
    if unmatched:
        table = [{"method": Text(m), "dose (nats)": d, "train CMI reached (nats)": Text("; ".join(v))}
                 for (m, d), v in unmatched.items()]
        rep.add("<details>", f"<summary>Not matched within ±25% of the dose: "
                f"{sum(map(len, unmatched.values()))} teacher(s), left out of slopes and pairs</summary>", "",
                markdown_table(table), "", "</details>", "")
    reach = {m: max((c for rs in rows.values() for r in rs if r.get("method") == m
                     and (c := number(r.get("train_cmi"))) is not None), default=math.nan) for m in methods}
    rep.add("Highest train CMI each method reached (nats, any seed): "
            + ", ".join(f"{method_name(m)} {fmt(c)}" for m, c in reach.items()) + ".", "")
    _pairs(rep, rows, metrics, doses, where, reach)


def _pairs(rep: Report, rows: SeedRows, metrics: Mapping[str, tuple], doses: list[float], where: str,
           reach: Mapping[str, float]) -> None:
    pairs, compared = [], {}
    for dose in doses:
        for metric, (words, scale, unit, sign, effect) in metrics.items():
            d = difference(values(rows, metric, method="mcmi", dose=dose, matched=True),
                           values(rows, metric, method="label_smoothing", dose=dose, matched=True), scale)
            if d is None:
                continue
            compared[dose] = d["n"]
            digits = 2 if scale > 1 else 3
            need = seeds_needed(d) if unit == "points" else None
            pairs.append({"dose (nats)": f"{dose:g}", "metric": f"{words} ({unit})",
                          "MCMI − label smoothing (95% CI)": format_interval(d, digits),
                          "verdict": verdict(d, sign), "paper's effect": paper_check(d, effect) or "—",
                          "seeds for ±2 points": str(need) if need else "—"})
            rep.claim(f"{where}dose {dose:g}: MCMI − label smoothing, {words} ({unit})", d, sign, digits, effect,
                      unit == "points", short=f"{where}{words} at {dose:g}, MCMI − label smoothing")
    if pairs:
        rep.add("#### MCMI against label smoothing at the same dose", "", "Paired by seed.", "",
                markdown_table(pairs), "")
    low = {m: c for m, c in reach.items() if m != "mcmi" and c == c and doses and c < 0.75 * max(doses)}
    if low:  # a control that cannot reach the doses leaves MCMI without a comparison there: say so first
        notes = rep.notes.setdefault("reach", [])
        notes.insert(0 if not where else len(notes),  # 07's first: the study's own doses
            f"{where[:1].upper()}{where[1:]}" + " and ".join(method_name(m) for m in low) + " reach only "
            + " / ".join(fmt(c) for c in low.values()) + " nats of train CMI, so MCMI is compared with label "
            + (f"smoothing at {', '.join(f'{d:g}' for d in compared)} alone, with "
               + ", ".join(f"{n} seed(s)" for n in dict.fromkeys(compared.values())) + "." if compared
               else "smoothing at no dose of this study."))


def dose_response(rep: Report) -> None:
    rows = seed_rows(rep.results, "07_dose_response", "dose_response")
    if not rows:
        return
    rep.add("## Dose-response", "", "The dose is the teacher's train CMI in nats. Slopes: change of the metric per "
            "nat of train CMI (accuracies in points), one least-squares line per seed over its matched doses and the "
            "λ = 0 control, then the mean over seeds with its 95% interval.", "")
    dose_tables(rep, rows, DOSE_METRICS, "")
    omitted_mass(rep)


def _pooled(rows: list[Mapping], x: str, y: str) -> tuple[float, int]:
    pts = [(a, b) for r in rows if (a := number(r.get(x))) is not None and (b := number(r.get(y))) is not None]
    return (spearman([p[0] for p in pts], [p[1] for p in pts]) if len(pts) >= 3 else math.nan), len(pts)


def omitted_mass(rep: Report) -> None:
    """The teachers' omitted-class mass (rows of 06 and 07): its Spearman ρ with zero-shot accuracy on the omitted
    classes across teachers and seeds (pooled), next to train CMI's; and MCMI − label smoothing on it at each matched
    dose, paired by seed."""
    zero = [r for rs in working(seed_rows(rep.results, "06_zero_shot", "zero_shot")).values() for r in rs]
    zero = [{**r, "zero_shot_omitted_acc": sum(a) / len(a)} for r in zero
            if isinstance(r.get("omitted_acc"), Mapping) and (a := [v for v in map(number, r["omitted_acc"].values())
                                                                    if v is not None])]
    dosed = working(seed_rows(rep.results, "07_dose_response", "dose_response"))
    sources = [("06 zero-shot teachers", zero), ("07 dose-response teachers", [r for rs in dosed.values() for r in rs])]
    table = []
    for name, rows in sources:
        rho, n = _pooled(rows, "omitted_mass", "zero_shot_omitted_acc")
        if n:
            table.append({"teachers": name, "n (teacher × seed)": str(n), "ρ omitted mass": fmt(rho, "+.2f"),
                          "ρ train CMI": fmt(_pooled(rows, "train_cmi", "zero_shot_omitted_acc")[0], "+.2f")})
    if not table:
        return
    rep.add("### Omitted-class mass", "", "The teacher's mean probability of the omitted classes on the other "
            "classes' training images, softmax(z/T) at the KD temperature: all a zero-shot student can learn those "
            "classes from. Spearman ρ with the zero-shot accuracy on the omitted classes, pooled over teachers and "
            "seeds (— : fewer than 3 or constant).", "", markdown_table(table), "")
    pairs = []
    for dose in sorted({d for rs in dosed.values() for r in rs if (d := number(r.get("dose"))) and d > 0}):
        for other in ("label_smoothing", "temperature"):
            d = difference(values(dosed, "omitted_mass", method="mcmi", dose=dose, matched=True),
                           values(dosed, "omitted_mass", method=other, dose=dose, matched=True))
            if d is not None:
                pairs.append({"dose (nats)": f"{dose:g}", "MCMI − other": Text(f"MCMI − {method_name(other)}"),
                              "difference (95% CI)": format_interval(d, 4), "verdict": verdict(d)})
    if pairs:
        rep.add("At matched train CMI, paired by seed (held: MCMI puts more mass on the omitted classes):", "",
                markdown_table(pairs), "")
