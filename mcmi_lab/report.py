"""The report of a run: ``report.md`` and a self-contained ``report.html`` built from the merged ``results.json``.

What was run, the teacher table, students per KD method, per few-shot fraction and per omitted class, each as
mean ± std over seeds (n), the paired difference MCMI − control with its 95% interval, the known-BCPD table, the
key figures, and a plain "which claims held" list computed from the same numbers. A claim *held* when the whole
interval lies on its side of zero, is *reversed* when the whole interval lies on the other side, and is *not
shown* otherwise (or with one seed, where there is no interval).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .cam import CAM_STATISTICS
from .plots import (METHOD_LABELS, TEACHER_LABELS, plot_cmi_bars, plot_dose_response, plot_fraction_curve,
                    plot_student_vs_teacher_cmi, plot_training_curves)
from .report_card import STUDENT_METRICS, TEACHER_METRICS, metric_correlations
from .runs import RESULTS, collect_results, parameter_differences, seed_dirs
from .stats import format_mean_std, mean_std, paired_difference, slope_over_seeds
from .utils import write_json, write_text



# ---- tables -----------------------------------------------------------------------------------------------------

def _cell_text(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell_text(v, digits) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_cell_text(v, digits)}" for k, v in value.items())
    return "—" if value is None else str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3,
                   headers: Sequence[str] | None = None) -> str:
    """Rows of dicts as a Markdown table: `columns` (default: the first row's keys) in order, floats with `digits`."""
    if not rows:
        return ""
    columns = list(columns if columns is not None else rows[0])
    headers = list(headers if headers is not None else columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(_cell_text(r.get(c), digits) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---- per-seed values --------------------------------------------------------------------------------------------

SeedRows = dict[str, list[dict]]


def seed_rows(results: Mapping[str, Any], notebook: str, key: str) -> SeedRows:
    """``{seed: results[seed][notebook][key]}`` for the seeds that have it."""
    out = {}
    for seed, notebooks in results.get("seeds", {}).items():
        rows = notebooks.get(notebook, {}).get(key)
        if rows:
            out[seed] = rows
    return out


def values(rows: SeedRows, metric: str | Callable[[dict], Any], **match: Any) -> dict[str, float]:
    """``{seed: metric}`` of the first row in each seed whose fields equal `match` (numbers only)."""
    get = metric if callable(metric) else (lambda r: r.get(metric))
    out = {}
    for seed, seed_list in rows.items():
        for r in seed_list:
            if all(r.get(k) == v for k, v in match.items()):
                v = get(r)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[seed] = float(v)
                break
    return out


def cell(vals: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """"84.2 ± 1.3 (n=3)" over seeds, or "—" without values."""
    if not vals:
        return "—"
    mean, std = mean_std([scale * v for v in vals.values()])
    return format_mean_std(mean, std, len(vals), digits)


def difference(a: Mapping[str, float], b: Mapping[str, float], scale: float = 1.0) -> dict | None:
    """Paired difference a − b over the seeds both have (stats.paired_difference), scaled; None without pairs."""
    common = [s for s in a if s in b]
    if not common:
        return None
    return paired_difference([scale * a[s] for s in common], [scale * b[s] for s in common])


def format_difference(d: dict | None, digits: int = 2) -> str:
    if d is None:
        return "—"
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (n=1, no interval)"
    return f"{d['mean']:+.{digits}f} (95% CI {d['low']:+.{digits}f} .. {d['high']:+.{digits}f}, n={d['n']})"


def verdict(d: dict | None, sign: int = 1) -> str:
    """"held" when the interval lies on the side `sign` of 0, "reversed" on the other side, else "not shown"."""
    if d is None:
        return "not measured"
    if d["n"] < 2 or math.isnan(d["low"]):
        return "not shown (one seed: no interval)"
    low, high = (d["low"], d["high"]) if sign > 0 else (-d["high"], -d["low"])
    return "held" if low > 0 else "reversed" if high < 0 else "not shown"


def trend(d: dict) -> str:
    """A slope's verdict: "rises" / "falls" when its 95% interval is above / below 0, else "no trend shown"."""
    if not d["n"]:
        return "not measured"
    if d["n"] < 2 or math.isnan(d["low"]):
        return "no trend shown (one seed: no interval)"
    return "rises" if d["low"] > 0 else "falls" if d["high"] < 0 else "no trend shown"


# ---- the report -------------------------------------------------------------------------------------------------

class _Report:
    """Builds the Markdown text section by section; collects the claims as it goes."""

    def __init__(self, results: Mapping[str, Any], out: Path):
        self.results, self.out = results, out
        self.lines: list[str] = []
        self.claims: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def claim(self, text: str, d: dict | None, sign: int = 1, digits: int = 2) -> None:
        """Add a claim with its interval and verdict; a comparison without data is left out."""
        if d is not None:
            self.claims.append(f"- {text}: {format_difference(d, digits)} — **{verdict(d, sign)}**")

    def figure(self, path: Path | None, caption: str) -> None:
        if path is not None and path.is_file():
            caption = caption.replace("*", "∗")  # P* inside the italic caption would end it: the operator sign
            self.add(f"![{caption}]({path.relative_to(self.out).as_posix()})", "", f"*{caption}*", "")


def _acc(v: Mapping[str, float]) -> str:
    return cell(v, 100.0, 1)


def _teachers(rep: _Report) -> None:
    rows = seed_rows(rep.results, "01_teachers", "teachers")
    if not rows:
        return
    names = list(dict.fromkeys(r["teacher"] for rs in rows.values() for r in rs))
    cols = [("test_acc", "test acc (%)", 100.0, 1), ("train_acc", "train acc (%)", 100.0, 1),
            ("train_cmi", "train CMI", 1.0, 3), ("test_cmi", "test CMI", 1.0, 3),
            ("train_ncmi", "train NCMI", 1.0, 3), ("test_ncmi", "test NCMI", 1.0, 3), ("test_ece", "test ECE", 1.0, 3)]
    table = [{"teacher": TEACHER_LABELS.get(n, n),
              **{h: cell(values(rows, k, teacher=n), s, d) for k, h, s, d in cols}} for n in names]
    rep.add("## Teachers", "", "Mean ± std over seeds (n). CMI and NCMI in nats; train = the teachers' training data.",
            "", markdown_table(table, ["teacher"] + [h for _, h, _, _ in cols]), "")
    diffs = [("test accuracy (points)", "test_acc", 100.0), ("train CMI", "train_cmi", 1.0),
             ("test CMI", "test_cmi", 1.0)]
    rep.add("MCMI − control, paired by seed:", "")
    for label, key, scale in diffs:
        d = difference(values(rows, key, teacher="mcmi"), values(rows, key, teacher="control"), scale)
        rep.add(f"- {label}: {format_difference(d, 3 if scale == 1.0 else 2)}")
    rep.add("")
    rep.claim("MCMI raises the teacher's train CMI over the λ = 0 control (MCMI − control)",
              difference(values(rows, "train_cmi", teacher="mcmi"), values(rows, "train_cmi", teacher="control")),
              digits=3)
    d = difference(values(rows, "test_acc", teacher="mcmi"), values(rows, "test_acc", teacher="control"), 100.0)
    if d is not None:
        rep.claims.append(f"- MCMI teacher test accuracy vs control (points; the paper reports a small cost): "
                          f"{format_difference(d)}")


def _students(rep: _Report) -> None:
    rows = seed_rows(rep.results, "03_distill", "students")
    if not rows:
        return
    methods = list(dict.fromkeys(r["method"] for rs in rows.values() for r in rs if r["teacher"] != "none"))
    teachers = list(dict.fromkeys(r["teacher"] for rs in rows.values() for r in rs))
    table = [{"teacher": TEACHER_LABELS.get(t, t),
              **{m: _acc(values(rows, "student_acc", teacher=t, method=("ce" if t == "none" else m)))
                 for m in methods}} for t in teachers]
    rep.add("## Students by KD method", "", "Student test accuracy (%), mean ± std over seeds (n). The no-teacher "
            "row is the same student trained on the labels alone.", "",
            markdown_table(table, ["teacher"] + methods), "")
    rep.add("MCMI − control, paired by seed (points):", "")
    for m in methods:
        d = difference(values(rows, "student_acc", teacher="mcmi", method=m),
                       values(rows, "student_acc", teacher="control", method=m), 100.0)
        rep.add(f"- {m}: {format_difference(d)}")
        rep.claim(f"{m} student: an MCMI teacher gives a better student than the control (points)", d)
    rep.add("")


def _few_shot(rep: _Report) -> None:
    rows = seed_rows(rep.results, "05_few_shot", "few_shot")
    if not rows:
        return
    fractions = sorted({r["fraction"] for rs in rows.values() for r in rs})
    teachers = list(dict.fromkeys(r["teacher"] for rs in rows.values() for r in rs))
    table = [{"teacher": TEACHER_LABELS.get(t, t),
              **{f"{f:g}": _acc(values(rows, "student_acc", teacher=t, fraction=f)) for f in fractions}}
             for t in teachers]
    rep.add("## Few-shot students", "", "KD student test accuracy (%) by the fraction of the training data it saw "
            "(stratified; the teachers saw all of it).", "",
            markdown_table(table, ["teacher"] + [f"{f:g}" for f in fractions]), "", "MCMI − control (points):", "")
    for f in fractions:
        d = difference(values(rows, "student_acc", teacher="mcmi", fraction=f),
                       values(rows, "student_acc", teacher="control", fraction=f), 100.0)
        rep.add(f"- fraction {f:g}: {format_difference(d)}")
        if f == fractions[0]:
            rep.claim(f"few-shot (fraction {f:g}): MCMI − control student accuracy (points)", d)
    rep.add("")


def omitted_mean(r: dict) -> float | None:
    accs = list(r.get("omitted_acc", {}).values())
    return sum(accs) / len(accs) if accs else None


def _zero_shot(rep: _Report) -> None:
    rows = seed_rows(rep.results, "06_zero_shot", "zero_shot")
    if not rows:
        return
    sets = list(dict.fromkeys(tuple(r["omitted"]) for rs in rows.values() for r in rs))
    teachers = list(dict.fromkeys(r["teacher"] for rs in rows.values() for r in rs))
    classes = next(iter(rep.results["seeds"].values())).get("06_zero_shot", {}).get("classes")
    rep.add("## Zero-shot students", "", "The student never saw the omitted classes; the teacher did. Test accuracy "
            "(%) overall and on each omitted class.", "")
    for s in sets:
        names = [classes[c] if classes else str(c) for c in s]
        cols = ["overall"] + [f"class {c} ({n})" for c, n in zip(s, names)]
        table = []
        for t in teachers:
            row = {"teacher": TEACHER_LABELS.get(t, t),
                   "overall": _acc(values(rows, "student_acc", teacher=t, omitted=list(s)))}
            for c, col in zip(s, cols[1:]):
                row[col] = _acc(values(rows, lambda r, c=c: r["omitted_acc"].get(str(c)), teacher=t, omitted=list(s)))
            table.append(row)
        rep.add(f"### Omitted: {', '.join(names)}", "", markdown_table(table, ["teacher"] + cols), "")
        d = difference(values(rows, omitted_mean, teacher="mcmi", omitted=list(s)),
                       values(rows, omitted_mean, teacher="control", omitted=list(s)), 100.0)
        rep.add(f"MCMI − control on the omitted classes (points): {format_difference(d)}", "")
        rep.claim(f"zero-shot ({', '.join(names)} omitted): MCMI − control accuracy on the omitted classes "
                  "(points)", d)


#: The student metrics of the dose-response study, with the words the report uses for them.
#: The dose-response metrics of 07: key -> (words, scale, unit, claimed sign of MCMI − label smoothing).
DOSE_METRICS = {"student_acc": ("KD student accuracy", 100.0, "points", 1),
                "few_shot_acc": ("few-shot student accuracy", 100.0, "points", 1),
                "zero_shot_omitted_acc": ("zero-shot accuracy on the omitted classes", 100.0, "points", 1),
                "test_acc": ("teacher test accuracy", 100.0, "points", 1)}
#: The dose-response metrics of 08 (known posterior): closer to P* is a lower KL, so the claimed sign is negative.
BAYES_DOSE_METRICS = {"kl_to_bayes": ("KL(P* ‖ teacher) on test", 1.0, "nats", -1),
                      "test_acc": ("teacher test accuracy", 100.0, "points", 1)}


def dose_slopes(rows: SeedRows, method: str, metric: str, scale: float = 100.0) -> dict:
    """The slope of `metric` (×`scale`: points for accuracies) against train CMI (nats) for `method`, one
    least-squares slope per seed over its matched doses and its control (dose 0), then their mean with a 95% t
    interval over the seeds."""
    points = {seed: [(r["train_cmi"], scale * r[metric]) for r in rs
                     if ((r["method"] == method and r.get("matched")) or r["method"] == "control")
                     and isinstance(r.get(metric), (int, float))]
              for seed, rs in rows.items()}
    return slope_over_seeds(points)


def _method(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def _dose_tables(rep: _Report, rows: SeedRows, metrics: Mapping[str, tuple], where: str) -> None:
    """Slopes per method and metric, what was not matched, how high each method reached, and the paired
    difference MCMI − label smoothing at each matched dose (each one a claim, labelled with `where`)."""
    methods = [m for m in dict.fromkeys(r["method"] for rs in rows.values() for r in rs) if m != "control"]
    doses = sorted({r["dose"] for rs in rows.values() for r in rs if r["method"] != "control"})
    means = []  # the numbers behind the slopes: every matched (method, dose), mean ± std over its seeds
    for method, dose in [("control", 0.0)] + [(m, d) for d in doses for m in methods]:
        match = dict(method=method, dose=dose, matched=True)
        reached = values(rows, "train_cmi", **match)
        if reached:
            means.append({"method": _method(method), "dose (nats)": f"{dose:g}", "train CMI (nats)": cell(reached),
                          **{f"{words} ({'%' if scale > 1 else unit})": cell(values(rows, metric, **match), scale,
                                                                             1 if scale > 1 else 3)
                             for metric, (words, scale, unit, _) in metrics.items()}})
    rep.add("Matched teachers, mean ± std over the seeds that reached the dose:", "", markdown_table(means), "")
    table = []
    for method in methods:
        for metric, (words, scale, unit, _) in metrics.items():
            d = dose_slopes(rows, method, metric, scale)
            table.append({"method": _method(method), "metric": words,
                          "slope (per nat)": f"{format_difference(d)} {unit}", "trend": trend(d)})
    rep.add(markdown_table(table), "")
    unmatched = [f"{_method(r['method'])} at {r['dose']:g} (seed {seed}: {r['train_cmi']:.3f})"
                 for seed, rs in rows.items() for r in rs if r["method"] != "control" and not r.get("matched")]
    if unmatched:
        rep.add("Not matched within ±25% of the dose (left out of slopes and pairs): " + "; ".join(unmatched) + ".",
                "")
    reach = {m: max(r["train_cmi"] for rs in rows.values() for r in rs if r["method"] == m) for m in methods}
    rep.add("Highest train CMI each method reached (nats, any seed): "
            + ", ".join(f"{_method(m)} {c:.3f}" for m, c in reach.items()) + ".", "")
    pairs = []
    for dose in doses:
        for metric, (words, scale, unit, sign) in metrics.items():
            mcmi = values(rows, metric, method="mcmi", dose=dose, matched=True)
            smooth = values(rows, metric, method="label_smoothing", dose=dose, matched=True)
            both = sorted(set(mcmi) & set(smooth))
            if not both:
                continue
            d = paired_difference([scale * mcmi[s] for s in both], [scale * smooth[s] for s in both])
            digits = 2 if scale > 1 else 3
            pairs.append({"dose (nats)": f"{dose:g}", "metric": words, "MCMI − label smoothing":
                          f"{format_difference(d, digits)} {unit}", "verdict": verdict(d, sign)})
            rep.claim(f"{where}dose {dose:g}: MCMI − label smoothing, {words} ({unit})", d, sign, digits)
    if pairs:
        rep.add("Paired by seed, MCMI against label smoothing at the same dose:", "", markdown_table(pairs), "")


def _dose_response(rep: _Report) -> None:
    rows = seed_rows(rep.results, "07_dose_response", "dose_response")
    if not rows:
        return
    rep.add("## Dose-response", "", "The dose is the teacher's train CMI in nats. Slopes: change of the metric per "
            "nat of train CMI (accuracies in points), one least-squares line per seed over its matched doses and the "
            "λ = 0 control, then the mean over seeds with its 95% interval.", "")
    _dose_tables(rep, rows, DOSE_METRICS, "")


def _known_bcpd(rep: _Report) -> None:
    rows = seed_rows(rep.results, "08_known_bcpd", "known_bcpd")
    if not rows:
        return
    teachers = list(dict.fromkeys(r["teacher"] for rs in rows.values() for r in rs))
    table = [{"teacher": TEACHER_LABELS.get(t, t) if t != "bayes" else "Bayes posterior P*",
              "KL(P* ‖ P) (nats)": cell(values(rows, "kl_to_bayes", teacher=t)),
              "ECE": cell(values(rows, "ece", teacher=t)),
              "accuracy (%)": _acc(values(rows, "accuracy", teacher=t)),
              "KD student acc (%)": _acc(values(rows, "student_acc", teacher=t))} for t in teachers]
    bayes = [nb.get("08_known_bcpd", {}).get("bayes_accuracy") for nb in rep.results["seeds"].values()]
    bayes = next((b for b in bayes if b is not None), None)
    rep.add("## Known Bayes posterior (synthetic task)", "",
            "Teachers trained on a task whose P*(y|x) is known exactly, scored on test data by KL(P* ‖ P_teacher), "
            "top-label ECE and accuracy, next to the accuracy of their KD students."
            + (f" Bayes accuracy (closed form): {100 * bayes:.1f}%." if bayes is not None else ""), "",
            markdown_table(table), "")
    for other in ("control", "mll"):
        d = difference(values(rows, "kl_to_bayes", teacher="mcmi"), values(rows, "kl_to_bayes", teacher=other))
        rep.claim(f"known BCPD: MCMI is closer to P* than {TEACHER_LABELS[other]} (KL difference MCMI − {other}, "
                  "nats; negative is closer)", d, sign=-1, digits=3)
    dosed = seed_rows(rep.results, "08_known_bcpd", "dose_response")
    if dosed:
        bayes_cmi = [nb.get("08_known_bcpd", {}).get("bayes_train_cmi") for nb in rep.results["seeds"].values()]
        bayes_cmi = [c for c in bayes_cmi if c is not None]
        rep.add("### Dose-response on the known posterior", "",
                "The same doses and methods as in the dose-response study, from this task's MLL teacher: does raising "
                "a teacher's train CMI bring it closer to P* (a negative KL slope)?"
                + (f" The Bayes posterior's own train CMI: {sum(bayes_cmi) / len(bayes_cmi):.3f} nats."
                   if bayes_cmi else ""), "")
        _dose_tables(rep, dosed, BAYES_DOSE_METRICS, "known BCPD, ")


def _rho(c: Mapping[str, Any], seeds: int) -> str:
    """"+0.52 [-0.10, +1.00]": mean ρ over seeds and its interval; the n of seeds when fewer than `seeds` had one."""
    if not c["n"]:
        return "—"
    text = f"{c['mean']:+.2f}" + (f" [{c['low']:+.2f}, {c['high']:+.2f}]" if c["n"] > 1 else "")
    return text + (f" (n={c['n']})" if c["n"] < seeds else "")


def _teacher_predictors(rep: _Report) -> None:
    """Spearman ρ of each teacher metric with each student metric across the teachers of a seed, mean over seeds
    (report_card.metric_correlations), for 07's dose-response teachers and 08's known-posterior teachers."""
    sources = [("Dose-response teachers (07)", seed_rows(rep.results, "07_dose_response", "dose_response")),
               ("Known-posterior teachers (08)", seed_rows(rep.results, "08_known_bcpd", "known_bcpd"))]
    found = [(where, [c for c in metric_correlations(rows) if c["n"]]) for where, rows in sources if rows]
    found = [(where, cs) for where, cs in found if cs]
    if not found:
        return
    rep.add("## Which teacher metric predicts a good student?", "",
            "Spearman rank correlation ρ of each teacher metric with each student metric across the teachers of one "
            "seed, then the mean over seeds [95% t interval over seeds, clipped to ±1]. ρ > 0: a higher metric went "
            "with a better student; ρ < 0: a lower one did (NLL, ECE, Brier, KL). A teacher recorded at two doses "
            "counts once; a seed where a metric does not vary (every student at 0% on the omitted class) gives no ρ.",
            "")
    for where, cs in found:
        seeds = max(c["n"] for c in cs)
        teachers = {n for c in cs for n in c["teachers"]}
        table = {}
        for c in cs:
            table.setdefault(c["teacher"], {"teacher metric": TEACHER_METRICS[c["teacher"]]})[
                STUDENT_METRICS[c["student"]]] = _rho(c, seeds)
        count = f"{min(teachers)}–{max(teachers)}" if len(teachers) > 1 else f"{min(teachers)}"
        rep.add(f"### {where}: n = {count} teachers per seed, {seeds} seed(s)", "",
                markdown_table(list(table.values())), "")
        for student in dict.fromkeys(c["student"] for c in cs):
            best = max((c for c in cs if c["student"] == student), key=lambda c: abs(c["mean"]))
            excludes = best["n"] > 1 and (best["low"] > 0 or best["high"] < 0)
            rep.add(f"- {STUDENT_METRICS[student]}: largest |ρ| {TEACHER_METRICS[best['teacher']]} (ρ = "
                    f"{_rho(best, seeds)}; {'interval excludes 0' if excludes else 'interval includes 0'})")
        rep.add("")


def _eigencam(rep: _Report) -> None:
    rows = seed_rows(rep.results, "04_eigencam", "cam")
    if not rows:
        return
    models = list(dict.fromkeys(r["model"] for rs in rows.values() for r in rs))
    stats = [k for k in CAM_STATISTICS if any(k in r for rs in rows.values() for r in rs)]
    table = [{"model": TEACHER_LABELS.get(m, m),
              **{CAM_STATISTICS[k]: cell(values(rows, k, model=m, **{"class": "all"})) for k in stats}}
             for m in models]
    rep.add("## Eigen-CAM", "", "Per-image statistics of sign-corrected, min-max scaled maps on test images: share of "
            "pixels above half the maximum, normalised entropy, CAM mass inside the object.", "",
            markdown_table(table), "")
    d = difference(values(rows, "area_above_half", model="mcmi", **{"class": "all"}),
                   values(rows, "area_above_half", model="mll", **{"class": "all"}))
    rep.claim("Eigen-CAM: MCMI maps cover more of the image than MLL maps (area above half max, MCMI − MLL)", d,
              digits=3)


def _save(rep: _Report, name: str, draw: Callable[[Path], Any]) -> Path | None:
    path = rep.out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        draw(path)
    except Exception as err:  # a figure must never cost the report; say what went wrong instead
        rep.add(f"(figure {name} could not be drawn: {type(err).__name__}: {err})", "")
        return None
    return path


def _summary_figures(rep: _Report) -> list[tuple[Path | None, str]]:
    """Figures over all seeds, drawn from results.json, plus the first seed's own figures."""
    figs = []
    teachers = seed_rows(rep.results, "01_teachers", "teachers")
    if teachers:
        by_name: dict[str, dict[str, list[float]]] = {}
        for rs in teachers.values():
            for r in rs:
                label = TEACHER_LABELS.get(r["teacher"], r["teacher"])
                entry = by_name.setdefault(label, {"train_cmi": [], "test_cmi": []})
                for k in entry:
                    entry[k].append(r[k])
        figs.append((_save(rep, "teacher_cmi", lambda p: plot_cmi_bars(by_name, ("train_cmi", "test_cmi"), path=p)),
                     "Teacher CMI on train and test data (bars: mean, dots: seeds)"))
    histories: dict[str, list[list[dict]]] = {}
    for nb in rep.results.get("seeds", {}).values():
        for name, history in (nb.get("01_teachers", {}).get("histories") or {}).items():
            histories.setdefault(TEACHER_LABELS.get(name, name), []).append(history)
    if histories:
        mll = TEACHER_LABELS.get("mll", "mll")
        start = round(sum(len(h) for h in histories.get(mll, [])) / max(1, len(histories.get(mll, []))))
        starts = {name: start for name in histories if name != mll}  # the fine-tunes continue the MLL teacher
        figs.append((_save(rep, "training_curves", lambda p: plot_training_curves(histories, starts, path=p)),
                     "Training curves of the MLL teacher and of its MCMI and λ = 0 fine-tunes (01_teachers)"))
    students = seed_rows(rep.results, "03_distill", "students")
    points = [r for rs in students.values() for r in rs if r.get("teacher_cmi") is not None]
    if points:
        figs.append((_save(rep, "student_vs_teacher_cmi", lambda p: plot_student_vs_teacher_cmi(points, path=p)),
                     "Student accuracy against its teacher's train CMI (every seed)"))
    few = [r for rs in seed_rows(rep.results, "05_few_shot", "few_shot").values() for r in rs]
    if few:
        figs.append((_save(rep, "few_shot", lambda p: plot_fraction_curve(few, logx=True, path=p)),
                     "Few-shot student accuracy by training fraction (mean ± std over seeds)"))
    dosed = [r for rs in seed_rows(rep.results, "07_dose_response", "dose_response").values() for r in rs]
    if dosed:
        figs.append((_save(rep, "dose_response", lambda p: plot_dose_response(dosed, path=p)),
                     "Student and teacher metrics against the teacher's train CMI, per method (mean and 95% "
                     "interval over seeds)"))
    bayes = [r for rs in seed_rows(rep.results, "08_known_bcpd", "dose_response").values() for r in rs]
    if bayes:
        cmi = [nb["08_known_bcpd"]["bayes_train_cmi"] for nb in rep.results["seeds"].values()
               if "bayes_train_cmi" in nb.get("08_known_bcpd", {})]
        ref = {"P* (Bayes posterior)": sum(cmi) / len(cmi)} if cmi else None
        figs.append((_save(rep, "known_posterior_dose_response",
                           lambda p: plot_dose_response(bayes, ("kl_to_bayes", "test_acc"), reference=ref, path=p)),
                     "Known posterior: KL(P* ‖ teacher) and teacher accuracy against the teacher's train CMI, per "
                     "method; dashed: the Bayes posterior's own train CMI"))
    first = next(iter(seed_dirs(rep.out).values()), None)
    if first is not None:
        for rel, caption in (("04_eigencam/cam_grid.png", "Eigen-CAM of the teachers (first seed)"),
                             ("02_concentration/kl_distributions.png", "KL(P_x ‖ Q_y) per class (first seed)"),
                             ("06_zero_shot/confusion_mcmi_0.png",
                              "Zero-shot student of the MCMI teacher (first seed)")):
            figs.append((first / "figures" / rel, caption))
    return figs


def _header(rep: _Report) -> None:
    run = rep.results.get("run", {})
    seeds = list(rep.results.get("seeds", {}))
    wall = run.get("wall_time_s")
    rep.add(f"# mcmi_lab report: {run.get('pipeline', 'run')}", "")
    if run.get("pipeline") == "smoke":
        rep.add("**⚠ A smoke run: a plumbing check on a few hundred images and one epoch per model. Every notebook "
                "ran and wrote its artifacts; the numbers below mean nothing (models near chance, CMI near 0). For "
                "results run `make demo`.**", "")
    if run.get("description"):
        rep.add(run["description"], "")
    rep.add("## What was run", "",
            f"- pipeline: `{run.get('pipeline', '?')}`; notebooks: {', '.join(run.get('notebooks', [])) or '?'}",
            f"- seeds: {', '.join(seeds) or 'none'} (sub-seeds from stats.derive_seeds)",
            *_data_line(rep),
            f"- device: {run.get('device', '?')}",
            f"- started: {run.get('started', '?')}; finished: {run.get('finished', '?')}; status: "
            f"{run.get('status', '?')}",
            f"- wall time: {f'{wall / 60:.1f} min ({wall:.0f} s)' if wall is not None else '?'}",
            "- parameters: listed at the end", "")
    mixed = []  # results made with other parameters than run.json records: flagged, never silently mixed
    for seed, notebooks in rep.results.get("seeds", {}).items():
        for name, result in notebooks.items():
            recorded = (result.get("meta") or {}).get("parameters") if isinstance(result, dict) else None
            diff = parameter_differences(run.get("parameters") or {}, recorded or {})
            if diff:
                mixed.append(f"seed_{seed}/{name} ({'; '.join(diff)})")
    if mixed:
        rep.add("**Warning: some results were made with other parameters than this run records** (run.json → the "
                "result's own): " + ", ".join(mixed) + ". Their numbers are in the tables below as if they belonged "
                "to this run; rerun them, or rerun the whole run into a fresh folder.", "")


def _data_line(rep: _Report) -> list[str]:
    """"- data: <name>, N training / M test images of C×H×W, K classes (names)", from 01_teachers' results."""
    data = next((nb["01_teachers"]["data"] for nb in rep.results.get("seeds", {}).values()
                 if isinstance(nb.get("01_teachers", {}).get("data"), dict)), None)
    if not data:
        return []
    source = rep.results.get("run", {}).get("parameters", {}).get("dataset")
    classes = [str(c) for c in data.get("classes", [])]
    shown = ", ".join(classes[:12]) + (f", … ({len(classes) - 12} more)" if len(classes) > 12 else "")
    return [f"- data: {data.get('name', '?')}" + (f" (`{source}`)" if source and source != data.get("name") else "")
            + f", {data.get('train_size', '?')} training / {data.get('test_size', '?')} test images of "
            + "×".join(str(d) for d in data.get("image", [])) + f", {len(classes)} classes: {shown}"]


def _parameters(rep: _Report) -> None:
    """The run's parameters (the per-seed ones, run_dir and seed, are in the seed folders)."""
    params = {k: v for k, v in rep.results.get("run", {}).get("parameters", {}).items() if k not in ("run_dir", "seed")}
    if params:
        rows = [{"parameter": k, "value": f"`{json.dumps(v, ensure_ascii=False)}`"} for k, v in params.items()]
        rep.add("## Parameters", "", markdown_table(rows), "")


def build_report(out: str | os.PathLike) -> tuple[Path, Path]:
    """Merge the run in `out` into ``results.json`` and write ``report.md`` and ``report.html``; returns their paths."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"run folder {str(out)!r} does not exist")
    results = collect_results(out)
    if not any(results["seeds"].values()):
        raise FileNotFoundError(f"run folder {str(out)!r} holds no results (expected seed_<n>/results/*.json)")
    write_json(out / RESULTS, results)
    rep = _Report(results, out)
    for section in (_teachers, _students, _few_shot, _zero_shot, _known_bcpd, _eigencam, _dose_response,
                    _teacher_predictors):
        section(rep)  # the tables, collecting the claims
    figures = _summary_figures(rep)
    tables, rep.lines = rep.lines, []
    _header(rep)
    rep.add("## Which claims held on this data", "",
            "Held: the whole 95% interval over seeds is on the claimed side of zero; reversed: on the other side; "
            "not shown: the interval contains zero.", "", *(rep.claims or ["- nothing to judge yet"]), "")
    rep.lines += tables
    rep.add("## Figures", "")
    for path, caption in figures:
        rep.figure(path, caption)
    _parameters(rep)
    text = "\n".join(rep.lines).rstrip() + "\n"
    md = write_text(out / "report.md", text)
    page = write_text(out / "report.html", render_html(text, out, title=f"mcmi_lab report: {out.name}"))
    return md, page


# ---- Markdown -> HTML (the subset written above: headings, tables, lists, images, emphasis, code) --------------

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
          "table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.25rem .6rem;"
          "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}"
          "figure{margin:1rem 0}")


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![\w*])\*([^*]+)\*(?![\w*])", r"<em>\1</em>", text)


def _image(src: str, base: Path | None) -> str:
    """An image embedded as a data URI when the file is found (a report that travels as one file)."""
    path = (base / src) if base is not None else None
    if path is not None and path.is_file():
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return html.escape(src)


def render_html(markdown: str, base: str | os.PathLike | None = None, title: str = "report") -> str:
    """Render the Markdown subset that :func:`build_report` writes; images under `base` are embedded."""
    base = Path(base) if base is not None else None
    out, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^(#{1,6}) (.*)$", line):
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif m := re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line):
            out.append(f'<figure><img alt="{html.escape(m.group(1))}" src="{_image(m.group(2), base)}"></figure>')
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", lines[i].strip())[1:-1]])
                i += 1
            head, rows = block[0], [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
