"""The report of a run: ``report.md`` and a self-contained ``report.html`` built from the merged ``results.json``.

It opens with a bottom line written from the results (:mod:`mcmi_lab.report.summary`), then what was run (the data,
the notebooks whose results are present, the sizes used), the claims with what the seeds can decide about each,
the teacher table, students per KD method, per few-shot fraction and per omitted class (mean ± std over seeds, the
n once per column), the paired differences MCMI − control with their 95% intervals, the known-BCPD table, the
dose-response study (:mod:`mcmi_lab.report.dose`), the figures, and the parameters the notebooks read.

Every string from data, results or run.json enters report.md escaped (:func:`mcmi_lab.report.markdown.md_escape`);
a row missing a key or holding a string where a number belongs shows "—" there; run.json of the wrong shape fails
in one line naming the file and the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from ..figures.cam import CAM_STATISTICS
from ..figures.plots import (METHOD_LABELS, TEACHER_LABELS, plot_cmi_bars, plot_dose_response, plot_fraction_curve,
                             plot_student_vs_teacher_cmi, plot_training_curves)
from ..study.report_card import STUDENT_METRICS, TEACHER_METRICS, metric_correlations
from .dose import BAYES_DOSE_METRICS, DOSE_METRICS, dose_response, dose_slopes, dose_tables, working
from .markdown import Text, clean_text, markdown_table, md_escape, render_html
from .summary import (PAPER_EFFECTS, Report, bottom_line, cell, claim_line, difference, fmt,
                      format_difference, judged, names, number, seed_rows, trend, values, verdict)
from ..study.runs import RESULTS, RUN_INFO, collect_results, parameter_differences, seed_dirs
from ..utils import write_json, write_text

__all__ = ["build_report", "markdown_table", "render_html", "seed_rows", "values", "omitted_mean", "dose_slopes",
           "DOSE_METRICS", "BAYES_DOSE_METRICS", "TEACHER_LABELS", "METHOD_LABELS", "cell", "difference",
           "format_difference", "verdict", "trend", "dose_tables"]


def _acc(v: Mapping[str, float]) -> str:
    return cell(v, 100.0, 1)


def _label(name: Any) -> str:
    """A teacher's name in words; a name from outside escaped."""
    return Text(TEACHER_LABELS[name] if isinstance(name, str) and name in TEACHER_LABELS else md_escape(name))


def _distinct(rows: Mapping[str, list[dict]], key: str, skip: tuple = ()) -> list:
    """The values of `key` over every row, in first-seen order (hashable ones only)."""
    seen = (r.get(key) for rs in rows.values() for r in rs)
    return list(dict.fromkeys(v for v in seen if v is not None and not isinstance(v, (list, dict)) and v not in skip))


def _teachers(rep: Report) -> None:
    rows = seed_rows(rep.results, "01_teachers", "teachers")
    if not rows:
        return
    cols = [("test_acc", "test acc (%)", 100.0, 1), ("train_acc", "train acc (%)", 100.0, 1),
            ("train_cmi", "train CMI", 1.0, 3), ("test_cmi", "test CMI", 1.0, 3),
            ("train_ncmi", "train NCMI", 1.0, 3), ("test_ncmi", "test NCMI", 1.0, 3), ("test_ece", "test ECE", 1.0, 3)]
    table = [{"teacher": _label(n), **{h: cell(values(rows, k, teacher=n), s, d) for k, h, s, d in cols}}
             for n in _distinct(rows, "teacher")]
    rep.add("## Teachers", "", "Mean ± std over seeds (n). CMI and NCMI in nats; train = the teachers' training data. "
            "NCMI = CMI / Γ, Γ the separation: the mean cross entropy between the outputs of two images of "
            "different classes (DESIGN.md §2).", "", markdown_table(table, ["teacher"] + [h for _, h, _, _ in cols]), "")
    diffs = [("test accuracy (points)", "test_acc", 100.0), ("train CMI", "train_cmi", 1.0),
             ("test CMI", "test_cmi", 1.0)]
    rep.add("MCMI − control, paired by seed:", "")
    for label, key, scale in diffs:
        d = difference(values(rows, key, teacher="mcmi"), values(rows, key, teacher="control"), scale)
        rep.add(f"- {label}: {judged(d, 3 if scale == 1.0 else 2, points=scale > 1)}")
    rep.add("")
    rep.claim("MCMI raises the teacher's train CMI over the λ = 0 control (MCMI − control)",
              difference(values(rows, "train_cmi", teacher="mcmi"), values(rows, "train_cmi", teacher="control")),
              digits=3, short="MCMI raises the teacher's train CMI")


def _students(rep: Report) -> None:
    rows = seed_rows(rep.results, "03_distill", "students")
    if not rows:
        return
    methods = _distinct({s: [r for r in rs if r.get("teacher") != "none"] for s, rs in rows.items()}, "method")
    teachers = _distinct(rows, "teacher")
    table = [{"teacher": _label(t),
              **{m: _acc(values(rows, "student_acc", teacher=t, method=("ce" if t == "none" else m)))
                 for m in methods}} for t in teachers]
    rep.add("## Students by KD method", "", "Student test accuracy (%), mean ± std over seeds (n). The no-teacher "
            "row is the same student trained on the labels alone.", "",
            markdown_table(table, ["teacher"] + methods), "")
    rep.add("MCMI − control, paired by seed (points):", "")
    for m in methods:
        d = difference(values(rows, "student_acc", teacher="mcmi", method=m),
                       values(rows, "student_acc", teacher="control", method=m), 100.0)
        rep.add(f"- {md_escape(m)}: {judged(d, effect=PAPER_EFFECTS['kd'], points=True)}")
        rep.claim(f"{md_escape(m)} student: an MCMI teacher gives a better student than the control (points)", d,
                  effect=PAPER_EFFECTS["kd"], points=True, short=f"{md_escape(m)} student, MCMI − control")
    rep.add("")


def _few_shot(rep: Report) -> None:
    rows = seed_rows(rep.results, "05_few_shot", "few_shot")
    if not rows:
        return
    fractions = sorted(f for f in _distinct(rows, "fraction") if number(f) is not None)
    teachers = _distinct(rows, "teacher")
    table = [{"teacher": _label(t),
              **{f"{f:g}": _acc(values(rows, "student_acc", teacher=t, fraction=f)) for f in fractions}}
             for t in teachers]
    rep.add("## Few-shot students", "", "KD student test accuracy (%) by the fraction of the training data it saw "
            "(stratified; the teachers saw all of it).", "",
            markdown_table(table, ["teacher"] + [f"{f:g}" for f in fractions]), "", "MCMI − control (points):", "")
    for f in fractions:
        d = difference(values(rows, "student_acc", teacher="mcmi", fraction=f),
                       values(rows, "student_acc", teacher="control", fraction=f), 100.0)
        rep.add(f"- fraction {f:g}: {judged(d, effect=PAPER_EFFECTS['few_shot'] if f < 1 else None, points=True)}")
        if f == fractions[0]:
            rep.claim(f"few-shot (fraction {f:g}): MCMI − control student accuracy (points)", d,
                      effect=PAPER_EFFECTS["few_shot"], points=True, short=f"few-shot ({f:g}), MCMI − control")
    rep.add("")


def omitted_mean(r: Mapping) -> float | None:
    """The mean accuracy over a zero-shot row's omitted classes (numbers only), or None."""
    accs = r.get("omitted_acc")
    accs = [v for v in map(number, accs.values()) if v is not None] if isinstance(accs, Mapping) else []
    return sum(accs) / len(accs) if accs else None


def _class_names(rep: Report, omitted: tuple) -> list[str]:
    first = next(iter(rep.results["seeds"].values()), {}).get("06_zero_shot", {})
    classes = first.get("classes") if isinstance(first, Mapping) else None
    ok = isinstance(classes, list)
    return [md_escape(classes[c]) if ok and isinstance(c, int) and 0 <= c < len(classes) else md_escape(c)
            for c in omitted]


def _zero_shot(rep: Report) -> None:
    rows = working(seed_rows(rep.results, "06_zero_shot", "zero_shot"))
    if not any(rows.values()):
        return
    sets = list(dict.fromkeys(tuple(r["omitted"]) for rs in rows.values() for r in rs
                              if isinstance(r.get("omitted"), list)
                              and all(isinstance(c, (int, str)) for c in r["omitted"])))
    teachers = _distinct(rows, "teacher")
    rep.add("## Zero-shot students", "", "The student never saw the omitted classes; the teacher did. Test accuracy "
            "(%) overall and on each omitted class.", "")
    for s in sets:
        shown = _class_names(rep, s)
        cols = ["overall"] + [Text(f"class {md_escape(c)} ({n})") for c, n in zip(s, shown)]
        table = []
        for t in teachers:
            row = {"teacher": _label(t), "overall": _acc(values(rows, "student_acc", teacher=t, omitted=list(s)))}
            for c, col in zip(s, cols[1:]):
                get = lambda r, c=c: r["omitted_acc"].get(str(c)) if isinstance(r.get("omitted_acc"), dict) else None
                row[col] = _acc(values(rows, get, teacher=t, omitted=list(s)))
            table.append(row)
        rep.add(f"### Omitted: {', '.join(shown)}", "", markdown_table(table, ["teacher"] + cols), "")
        d = difference(values(rows, omitted_mean, teacher="mcmi", omitted=list(s)),
                       values(rows, omitted_mean, teacher="control", omitted=list(s)), 100.0)
        rep.add(f"MCMI − control on the omitted classes (points): "
                f"{judged(d, effect=PAPER_EFFECTS['zero_shot'], points=True)}", "")
        rep.claim(f"zero-shot ({', '.join(shown)} omitted): MCMI − control accuracy on the omitted classes "
                  "(points)", d, effect=PAPER_EFFECTS["zero_shot"], points=True,
                  short=f"zero-shot ({', '.join(shown)}), MCMI − control")


def _known_bcpd(rep: Report) -> None:
    rows = seed_rows(rep.results, "08_known_bcpd", "known_bcpd")
    if not rows:
        return
    table = [{"teacher": _label(t) if t != "bayes" else "Bayes posterior P*",
              "KL(P* ‖ P) (nats)": cell(values(rows, "kl_to_bayes", teacher=t)),
              "ECE": cell(values(rows, "ece", teacher=t)),
              "accuracy (%)": _acc(values(rows, "accuracy", teacher=t)),
              "KD student acc (%)": _acc(values(rows, "student_acc", teacher=t))} for t in _distinct(rows, "teacher")]
    bayes = next((b for nb in rep.results["seeds"].values()
                  if (b := number(nb.get("08_known_bcpd", {}).get("bayes_accuracy"))) is not None), None)
    rep.add("## Known Bayes posterior (synthetic task)", "",
            "Teachers trained on a task whose P*(y|x) is known exactly, scored on test data by KL(P* ‖ P_teacher), "
            "top-label ECE and accuracy, next to the accuracy of their KD students."
            + (f" Bayes accuracy (closed form): {100 * bayes:.1f}%." if bayes is not None else ""), "",
            markdown_table(table), "")
    for other in ("control", "mll"):
        d = difference(values(rows, "kl_to_bayes", teacher="mcmi"), values(rows, "kl_to_bayes", teacher=other))
        rep.claim(f"known BCPD: MCMI is closer to P* than {TEACHER_LABELS[other]} (KL difference MCMI − {other}, "
                  "nats; negative is closer)", d, sign=-1, digits=3,
                  short=f"known BCPD, MCMI closer to P∗ than {TEACHER_LABELS[other]}")
    dosed = seed_rows(rep.results, "08_known_bcpd", "dose_response")
    if dosed:
        bayes_cmi = [c for nb in rep.results["seeds"].values()
                     if (c := number(nb.get("08_known_bcpd", {}).get("bayes_train_cmi"))) is not None]
        rep.add("### Dose-response on the known posterior", "",
                "The same doses and methods as in the dose-response study, from this task's MLL teacher: does raising "
                "a teacher's train CMI bring it closer to P* (a negative KL slope)?"
                + (f" The Bayes posterior's own train CMI: {sum(bayes_cmi) / len(bayes_cmi):.3f} nats."
                   if bayes_cmi else ""), "")
        dose_tables(rep, dosed, BAYES_DOSE_METRICS, "known BCPD, ")


def _rho(c: Mapping[str, Any], seeds: int) -> str:
    """"+0.52 [-0.10, +1.00]": mean ρ over seeds and its interval; the n of seeds when fewer than `seeds` had one."""
    if not c["n"]:
        return "—"
    text = f"{c['mean']:+.2f}" + (f" [{c['low']:+.2f}, {c['high']:+.2f}]" if c["n"] > 1 else "")
    return Text(text + (f" (n={c['n']} seeds)" if c["n"] < seeds else ""))


def _predictor_rows(cs: list[dict], seeds: int) -> list[dict]:
    """One row per teacher metric; metrics that rank the teachers the same way in every seed (the same ρ per seed
    for every student metric, e.g. train Γ and test Γ) share one row, named together."""
    table: dict[str, dict] = {}
    keys: dict[str, tuple] = {}
    for c in cs:
        keys.setdefault(c["teacher"], ())
        keys[c["teacher"]] += ((c["student"], tuple(sorted(c["per_seed"].items()))),)
    groups: dict[tuple, list[str]] = {}
    for metric, key in keys.items():
        groups.setdefault(key, []).append(metric)
    for group in groups.values():
        label = " = ".join(dict.fromkeys(TEACHER_METRICS[m] for m in group))
        row = table.setdefault(group[0], {"teacher metric": label + (" (same ranks)" if len(group) > 1 else "")})
        for c in cs:
            if c["teacher"] == group[0]:
                row[STUDENT_METRICS[c["student"]]] = _rho(c, seeds)
    return list(table.values())


def _teacher_predictors(rep: Report) -> None:
    """Spearman ρ of each teacher metric with each student metric across the teachers of a seed, mean over seeds
    (report_card.metric_correlations), for 07's dose-response teachers and 08's known-posterior teachers."""
    sources = [("Dose-response teachers (07)", working(seed_rows(rep.results, "07_dose_response", "dose_response"))),
               ("Known-posterior teachers (08)", seed_rows(rep.results, "08_known_bcpd", "known_bcpd"))]
    found = [(where, [c for c in metric_correlations(rows) if c["n"]]) for where, rows in sources if rows]
    found = [(where, cs) for where, cs in found if cs]
    if not found:
        return
    rep.add("## Which teacher metric predicts a good student?", "",
            "Spearman rank correlation ρ of each teacher metric with each student metric across the teachers of one "
            "seed, then the mean over seeds [95% t interval over seeds, clipped to ±1]. ρ > 0: a higher metric went "
            "with a better student; ρ < 0: a lower one did (NLL, ECE, Brier, KL). A teacher recorded at two doses "
            "counts once; a seed where a metric does not vary (every student at 0% on the omitted class) gives no ρ. "
            "Γ: the separation, the mean cross entropy between the outputs of two images of different classes "
            "(DESIGN.md §2); metrics that order the teachers identically in every seed share a row.", "")
    for where, cs in found:
        seeds = max(c["n"] for c in cs)
        teachers = {n for c in cs for n in c["teachers"]}
        count = f"{min(teachers)}–{max(teachers)}" if len(teachers) > 1 else f"{min(teachers)}"
        rep.add(f"### {where}: n = {count} teachers per seed, {seeds} seed(s)", "",
                markdown_table(_predictor_rows(cs, seeds)), "")
        for student in dict.fromkeys(c["student"] for c in cs):
            best = max((c for c in cs if c["student"] == student), key=lambda c: abs(c["mean"]))
            excludes = best["n"] > 1 and (best["low"] > 0 or best["high"] < 0)
            rep.add(f"- {STUDENT_METRICS[student]}: largest |ρ| {TEACHER_METRICS[best['teacher']]} (ρ = "
                    f"{_rho(best, seeds)}; {'interval excludes 0' if excludes else 'interval includes 0'})")
        rep.add("")


def _eigencam(rep: Report) -> None:
    rows = seed_rows(rep.results, "04_eigencam", "cam")
    if not rows:
        return
    models = _distinct(rows, "model")
    stats = [k for k in CAM_STATISTICS if any(k in r for rs in rows.values() for r in rs)]
    table = [{"model": _label(m),
              **{CAM_STATISTICS[k]: cell(values(rows, k, model=m, **{"class": "all"})) for k in stats}}
             for m in models]
    rep.add("## Eigen-CAM", "", "Per-image statistics of sign-corrected, min-max scaled maps on test images: share of "
            "pixels above half the maximum, normalised entropy, CAM mass inside the object.", "",
            markdown_table(table), "")
    d = difference(values(rows, "area_above_half", model="mcmi", **{"class": "all"}),
                   values(rows, "area_above_half", model="mll", **{"class": "all"}))
    rep.claim("Eigen-CAM: MCMI maps cover more of the image than MLL maps (area above half max, MCMI − MLL)", d,
              digits=3, short="Eigen-CAM area, MCMI − MLL")


def _save(rep: Report, name: str, draw: Callable[[Path], Any]) -> Path | None:
    path = rep.out / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        draw(path)
    except Exception as err:  # a figure must never cost the report; say what went wrong instead
        rep.add(f"(figure {name} could not be drawn: {type(err).__name__}: {md_escape(err)})", "")
        return None
    return path


def _summary_figures(rep: Report) -> list[tuple[Path | None, str]]:
    """Figures over all seeds, drawn from results.json, plus the first seed's own figures."""
    figs = []
    teachers = seed_rows(rep.results, "01_teachers", "teachers")
    if teachers:
        by_name: dict[str, dict[str, list[float]]] = {}
        for rs in teachers.values():
            for r in rs:
                label = str(TEACHER_LABELS.get(r.get("teacher"), r.get("teacher")))
                entry = by_name.setdefault(label, {"train_cmi": [], "test_cmi": []})
                for k in entry:
                    if number(r.get(k)) is not None:
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


def _header(rep: Report) -> None:
    run = rep.results.get("run", {})
    wall = number(run.get("wall_time_s"))
    rep.add(f"# mcmi_lab report: {md_escape(run.get('pipeline', 'run'))}", "")
    if run.get("pipeline") == "smoke":
        rep.add("**⚠ A smoke run: a plumbing check on a few hundred images and one epoch per model. Every notebook "
                "ran and wrote its artifacts; the numbers below mean nothing (models near chance, CMI near 0). For "
                "results run `make demo`.**", "")
    rep.add(*bottom_line(rep))
    ran = list(dict.fromkeys(nb for notebooks in rep.results.get("seeds", {}).values() for nb in notebooks))
    missing = [nb for nb in run.get("notebooks") or [] if nb not in ran]
    rep.add("## What was run", "", *_data_lines(rep),
            f"- notebooks with results: {names(ran) or 'none'}"
            + (f" (in run.json without results: {names(missing)})" if missing else ""),
            f"- pipeline `{md_escape(run.get('pipeline', '?'))}`; seeds: "
            f"{names(list(rep.results.get('seeds', {}))) or 'none'} (sub-seeds from stats.derive_seeds)",
            f"- device: {md_escape(run.get('device', '?'))}",
            f"- started: {md_escape(run.get('started', '?'))}; finished: {md_escape(run.get('finished', '?'))}; "
            f"status: {md_escape(run.get('status', '?'))}",
            f"- wall time: {f'{wall / 60:.1f} min ({wall:.0f} s)' if wall is not None else '?'}",
            "- parameters the notebooks read: listed at the end", "")
    mixed = []  # results made with other parameters than run.json records: flagged, never silently mixed
    for seed, notebooks in rep.results.get("seeds", {}).items():
        for name, result in notebooks.items():
            recorded = (result.get("meta") or {}).get("parameters") if isinstance(result, dict) else None
            diff = parameter_differences(run.get("parameters") or {}, recorded if isinstance(recorded, dict) else {})
            if diff:
                mixed.append(f"seed_{md_escape(seed)}/{md_escape(name)} ({md_escape('; '.join(diff))})")
    if mixed:
        rep.add("**Warning: some results were made with other parameters than this run records** (run.json → the "
                "result's own): " + ", ".join(mixed) + ". Their numbers are in the tables below as if they belonged "
                "to this run; rerun them, or rerun the whole run into a fresh folder.", "")


def _data_lines(rep: Report) -> list[str]:
    """"- data: <name>, N training / M test images of C×H×W, K classes (names)", from 01_teachers' results, and a
    line for each size the data capped (a train_size or test_size larger than the data set)."""
    data = next((nb["01_teachers"]["data"] for nb in rep.results.get("seeds", {}).values()
                 if isinstance(nb.get("01_teachers", {}).get("data"), dict)), None)
    params = rep.results.get("run", {}).get("parameters") or {}
    source = params.get("dataset")
    if not data:
        return [f"- data: `{md_escape(source)}`"] if source is not None else []
    classes = data.get("classes") if isinstance(data.get("classes"), list) else []
    shown = names(classes[:12]) + (f", … ({len(classes) - 12} more)" if len(classes) > 12 else "")
    train, val, test = (number(data.get(k)) for k in ("train_size", "val_size", "test_size"))
    image = data.get("image") if isinstance(data.get("image"), list) else []
    lines = [f"- data: {md_escape(data.get('name', '?'))}"
             + (f" (`{md_escape(source)}`)" if source and source != data.get("name") else "")
             + f", {fmt(train, ',.0f')} training" + (f" (+ {val:,.0f} validation)" if val else "")
             + f" / {fmt(test, ',.0f')} test images of " + "×".join(md_escape(d) for d in image)
             + f", {len(classes)} classes: {shown}"]
    pool = train + val if train is not None and val is not None else (
        train / (1 - params["val_fraction"]) if train is not None and number(params.get("val_fraction")) is not None
        and 0 <= params["val_fraction"] < 1 else None)
    for key, used in (("train_size", pool), ("test_size", test)):
        asked = number(params.get(key))
        if asked is not None and used is not None and asked > used + 1:
            lines.append(f"- {key} {asked:,.0f} requested, but the data set has only {used:,.0f}"
                         + (" (training + validation)" if key == "train_size" else "") + ": all of it was used")
    return lines


def _parameters(rep: Report) -> None:
    """The parameters the notebooks that ran declared and read (each result records them in its meta), with the
    run's values, collapsed; run.json's whole set when no result records its own."""
    run = rep.results.get("run", {}).get("parameters") or {}
    read: dict[str, Any] = {}
    for notebooks in rep.results.get("seeds", {}).values():
        for result in notebooks.values():
            recorded = (result.get("meta") or {}).get("parameters") if isinstance(result, dict) else None
            if isinstance(recorded, dict):
                read.update({k: v for k, v in recorded.items() if k not in read})
    source = "read by the notebooks that ran" if read else "as run.json records them (no result says which it read)"
    keys = [k for k in run if k in read] + [k for k in read if k not in run] if read else list(run)
    params = {k: run.get(k, read.get(k)) for k in keys if k not in ("run_dir", "seed", "interactive")}
    if params:
        rows = [{"parameter": k, "value": Text(f"`{md_escape(json.dumps(v, ensure_ascii=False, default=str))}`")}
                for k, v in params.items()]
        rep.add("## Parameters", "", "<details>", f"<summary>{len(params)} parameters, {source}</summary>", "",
                markdown_table(rows), "", "</details>", "")


def _claims(rep: Report) -> None:
    rep.add("## Which claims held on this data", "",
            "Held: the whole 95% interval over seeds is on the claimed side of zero; reversed: on the other side; "
            "not shown: the interval contains zero; with two seeds, no verdict (t = 12.7 makes any interval wide); "
            "no signal: every value equal. Where the paper reports the effect (KD +3.32, few-shot +5.72, zero-shot "
            "+84 points), whether the interval excludes it, and how many seeds the spread measured here would need "
            "for an interval of ±2 points.", "", *([claim_line(c) for c in rep.claims] or ["- nothing to judge yet"]),
            "")


def build_report(out: str | os.PathLike) -> tuple[Path, Path]:
    """Merge the run in `out` into ``results.json`` and write ``report.md`` and ``report.html``; returns their paths."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"run folder {str(out)!r} does not exist")
    results = collect_results(out)
    if not any(results["seeds"].values()):
        raise FileNotFoundError(f"run folder {str(out)!r} holds no results (expected seed_<n>/results/*.json)")
    write_json(out / RESULTS, results)
    rep = Report(results, out)
    for section in (_teachers, _students, _few_shot, _zero_shot, _known_bcpd, _eigencam, dose_response,
                    _teacher_predictors):
        section(rep)  # the tables, collecting the claims
    figures = _summary_figures(rep)
    tables, rep.lines = rep.lines, []
    _header(rep)
    _claims(rep)
    rep.lines += tables
    rep.add("## Figures", "")
    for path, caption in figures:
        rep.figure(path, caption)
    _parameters(rep)
    text = clean_text("\n".join(rep.lines).rstrip() + "\n")
    md = write_text(out / "report.md", text)
    page = write_text(out / "report.html", render_html(text, out, title=f"mcmi_lab report: {out.name}"))
    return md, page
