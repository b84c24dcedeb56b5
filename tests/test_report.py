"""The report: its bottom line, the header of the run that was made, what the seeds can decide (paper's effect, two
seeds, doses too close, no signal, seeds for ±2 points), collapsed teachers outside every number, the omitted-class
mass, and hostile or odd input (Markdown injection, figures outside the run, missing keys, strings for numbers,
surrogates, run.json of the wrong shape). Every expectation is computed here from plainly written formulas."""
import base64
import json
import math

import pytest

from mcmi_lab.report.build import build_report, render_html
from mcmi_lab.report.markdown import markdown_table, md_escape
from mcmi_lab.study.runs import write_results, write_run_info
from mcmi_lab.metrics.stats import seeds_for_half_width

#: Student t quantiles 0.975 by degrees of freedom (tables).
T_975 = {1: 12.706204736, 2: 4.302652729911275, 3: 3.182446305, 4: 2.776445105, 5: 2.570581836,
         6: 2.446911851, 7: 2.364624252, 8: 2.306004135, 9: 2.262157163, 10: 2.228138852}


def _mean_std(v):
    m = sum(v) / len(v)
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def _ci(d):
    m, s = _mean_std(d)
    half = T_975[len(d) - 1] * s / math.sqrt(len(d))
    return m, m - half, m + half


# ---- stats.seeds_for_half_width ---------------------------------------------------------------------------------

@pytest.mark.parametrize("std", [0.5, 1.0, 1.7, 2.5, 2.9])
def test_seeds_for_half_width_is_the_first_n_of_the_t_table(std):
    brute = next(n for n in range(2, 12) if T_975[n - 1] * std / math.sqrt(n) <= 2.0)
    assert seeds_for_half_width(std) == brute


def test_seeds_for_half_width_edges():
    assert seeds_for_half_width(0.0) == 2  # no spread: the first n with an interval
    assert seeds_for_half_width(10.0) == 99  # 1.984 · 10 / √99 = 1.994; n = 98 gives 2.004
    assert seeds_for_half_width(float("nan")) is None and seeds_for_half_width(1e6) is None
    assert seeds_for_half_width(1.0, half_width=0.5) == 18  # 2.110 / √18 = 0.497; n = 17: 2.120 / √17 = 0.514
    with pytest.raises(ValueError, match="half_width"):
        seeds_for_half_width(1.0, half_width=0)


def test_seeds_for_half_width_brute_force_with_scipy():
    from scipy.stats import t

    for std in (0.3, 3.3, 7.0):
        brute = next(n for n in range(2, 10_000) if t.ppf(0.975, n - 1) * std / math.sqrt(n) <= 2.0)
        assert seeds_for_half_width(std) == brute


# ---- a dose-response run made by hand -------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
CTRL = {"train_cmi": [0.004, 0.005, 0.006], "student_acc": [0.80, 0.81, 0.82], "zero_shot_omitted_acc": [0, 0, 0],
        "omitted_mass": [0.001, 0.002, 0.001], "test_acc": [0.90, 0.90, 0.91]}
#: MCMI at 0.1 and 0.2 (3 seeds), label smoothing at 0.1 (3 seeds) and 0.2 (seed 2 unmatched: two seeds).
MCMI = {0.1: {"train_cmi": [0.10, 0.11, 0.09], "student_acc": [0.85, 0.86, 0.84], "zero_shot_omitted_acc": [0, 0, 0],
              "omitted_mass": [0.010, 0.020, 0.015], "test_acc": [0.90, 0.89, 0.90]},
        0.2: {"train_cmi": [0.21, 0.19, 0.20], "student_acc": [0.86, 0.88, 0.85], "zero_shot_omitted_acc": [0.3, 0.5, 0],
              "omitted_mass": [0.040, 0.050, 0.030], "test_acc": [0.89, 0.88, 0.89]}}
SMOOTH = {0.1: {"train_cmi": [0.10, 0.10, 0.11], "student_acc": [0.80, 0.80, 0.81], "zero_shot_omitted_acc": [0, 0, 0],
                "omitted_mass": [0.005, 0.006, 0.004], "test_acc": [0.90, 0.90, 0.90]},
          0.2: {"train_cmi": [0.19, 0.21, 0.05], "student_acc": [0.80, 0.79, 0.70], "zero_shot_omitted_acc": [0, 0, 0],
                "omitted_mass": [0.007, 0.008, 0.003], "test_acc": [0.90, 0.90, 0.89]}}


def _row(method, dose, table, i, **extra):
    row = {"method": method, "dose": dose, **{k: v[i] for k, v in table.items()}}
    row["matched"] = method == "control" or abs(row["train_cmi"] - dose) <= 0.25 * dose
    return {**row, **extra}


def _dose_run(out, collapsed=False, run=None, mutate=None):
    write_run_info(out, run or {"pipeline": "dose", "notebooks": ["01_teachers", "07_dose_response"],
                                "seeds": list(SEEDS), "parameters": {"doses": [0.1, 0.2], "cam_layer": "x"},
                                "description": "stock words", "status": "finished"})
    for i in SEEDS:
        rows = [_row("control", 0.0, CTRL, i)]
        rows += [_row("mcmi", d, t, i) for d, t in MCMI.items()]
        rows += [_row("label_smoothing", d, t, i) for d, t in SMOOTH.items()]
        if collapsed and i == 1:  # a broken teacher whose train CMI happened to fall near the dose: never a number
            rows.append({"method": "mcmi", "dose": 0.3, "matched": True, "collapsed": True, "train_cmi": 0.29,
                         "student_acc": 0.10, "test_acc": 0.10})
            rows[1] = {**rows[1], "collapsed": True, "student_acc": 0.05, "test_acc": 0.1}
        if mutate:
            rows = mutate(i, rows)
        write_results(out / f"seed_{i}", "07_dose_response", {"dose_response": rows},
                      {"doses": [0.1, 0.2], "seed": i, "run_dir": "x"})
    return build_report(out)[0].read_text()


def _table_row(md, start):
    return next(line for line in md.splitlines() if line.startswith(start))


def test_pairs_say_what_the_seeds_can_decide(tmp_path):
    md = _dose_run(tmp_path / "run")
    pairs = md[md.index("#### MCMI against label smoothing"):]
    # 0.1, KD student: three seeds; the interval is compared with the paper's +3.32; seeds for ±2 points
    d = [100 * (a - b) for a, b in zip(MCMI[0.1]["student_acc"], SMOOTH[0.1]["student_acc"])]
    m, low, high = _ci(d)
    need = next(n for n in range(2, 12) if T_975[n - 1] * _mean_std(d)[1] / math.sqrt(n) <= 2)
    paper = "cannot exclude" if low <= 3.32 <= high else "excludes"
    assert low > 0 and (f"| 0.1 | KD student accuracy (points) | {m:+.2f} [{low:+.2f}, {high:+.2f}] (n=3) | held | "
                        f"{paper} the paper's +3.32 | {need} |") in pairs
    # teacher test accuracy: no paper effect to compare
    assert "| 0.1 | teacher test accuracy (points) |" in _table_row(pairs, "| 0.1 | teacher test accuracy")
    assert _table_row(pairs, "| 0.1 | teacher test accuracy").endswith(" | — | " + _table_row(
        pairs, "| 0.1 | teacher test accuracy").split(" | ")[-1])
    # 0.1, zero-shot: every student at 0% on both sides: no signal, no verdict, no paper comparison
    assert _table_row(pairs, "| 0.1 | zero-shot accuracy").endswith("(n=3) | no signal (every value equal) | — | — |")
    # 0.2: label smoothing matched in two seeds only: no verdict, the reason
    row = _table_row(pairs, "| 0.2 | KD student accuracy")
    d2 = [100 * (MCMI[0.2]["student_acc"][i] - SMOOTH[0.2]["student_acc"][i]) for i in (0, 1)]
    assert f"{sum(d2) / 2:+.2f} [" in row and "(n=2) | no verdict (two seeds) | — |" in row
    claims = md.split("## Which claims held on this data")[1].split("\n## ")[0]
    assert (f"- dose 0.1: MCMI − label smoothing, KD student accuracy (points): {m:+.2f} (95% CI {low:+.2f} .. "
            f"{high:+.2f}, n=3) — **held** ({paper} the paper's +3.32; ±2 points needs {need} seeds)") in claims


def test_slopes_over_doses_too_close_give_no_verdict(tmp_path):
    def close(i, rows):  # label smoothing reaches only 0.043 and 0.046: its slope spans ~0.04 nats
        for r in rows:
            if r["method"] == "label_smoothing":
                r.update(train_cmi=0.043 if r["dose"] == 0.1 else 0.046, matched=False)
        rows.append({**rows[0], "method": "label_smoothing", "dose": 0.05, "train_cmi": 0.045, "matched": True,
                     "student_acc": 0.80 + 0.01 * i})
        return rows

    md = _dose_run(tmp_path / "run", mutate=close)
    slopes = md[md.index("#### Slopes against the dose"):md.index("Highest train CMI")]
    span = sum(0.045 - c for c in CTRL["train_cmi"]) / 3
    assert span < 0.05
    row = _table_row(slopes, "| label smoothing | KD student accuracy")
    assert f"| {span:.3f} | no verdict (doses too close: {span:.3f} nats) | — |" in row
    # MCMI's slope spans ~0.2 nats: a verdict, and slope × span compared with the paper's effect
    xs = [[CTRL["train_cmi"][i], MCMI[0.1]["train_cmi"][i], MCMI[0.2]["train_cmi"][i]] for i in SEEDS]
    ys = [[100 * CTRL["student_acc"][i], 100 * MCMI[0.1]["student_acc"][i], 100 * MCMI[0.2]["student_acc"][i]]
          for i in SEEDS]
    slopes_by_seed = []
    for x, y in zip(xs, ys):
        mx, my = sum(x) / 3, sum(y) / 3
        slopes_by_seed.append(sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x))
    m, low, high = _ci(slopes_by_seed)
    mspan = sum(max(x) - min(x) for x in xs) / 3
    paper = "cannot exclude" if low * mspan <= 3.32 <= high * mspan else "excludes"
    trend = "rises" if low > 0 else "falls" if high < 0 else "no trend shown"
    assert (f"| MCMI (CMI target) | KD student accuracy (points per nat) | {m:+.2f} [{low:+.2f}, {high:+.2f}] | "
            f"{mspan:.3f} | {trend} | {paper} the paper's +3.32 |") in slopes
    # the bottom line names the reach and what was compared
    bottom = md.split("## Bottom line")[1].split("## What was run")[0]
    assert ("- Label smoothing reach only 0.046 nats of train CMI, so MCMI is compared with label smoothing at no dose "
            "of this study.") in bottom  # 0.05, the one dose it matched, has no MCMI teacher


def test_collapsed_teachers_are_counted_and_enter_no_number(tmp_path):
    md = _dose_run(tmp_path / "run", collapsed=True)
    assert "| method | dose (nats) | collapsed | seeds |" in md
    assert "| MCMI (CMI target) | 0.1 | 1 of 3 seeds | 1 |" in md and "| MCMI (CMI target) | 0.3 | 1 of 3 seeds | 1 |" in md
    # MCMI at 0.1: the mean of seeds 0 and 2 only
    m, s = _mean_std([100 * MCMI[0.1]["student_acc"][i] for i in (0, 2)])
    assert f"| MCMI (CMI target) | 0.1 | " in md and f"{m:.1f} ± {s:.1f} (n=2)" in _table_row(
        md, "| MCMI (CMI target) | 0.1 | 0.")
    assert "| MCMI (CMI target) | 0.3 | 0." not in md  # no means row for a dose only a collapsed teacher reached
    bottom = md.split("## Bottom line")[1].split("## What was run")[0]
    assert "Left out: 2 collapsed teacher(s) — MCMI (CMI target) at 0.1 (1 of 3 seeds); MCMI (CMI target) at 0.3" in bottom


def test_omitted_mass_rank_correlation_and_methods_at_matched_cmi(tmp_path):
    from scipy.stats import spearmanr

    md = _dose_run(tmp_path / "run")
    section = md[md.index("### Omitted-class mass"):]
    rows = [(CTRL, None)] + [(t, d) for d, t in MCMI.items()] + [(t, d) for d, t in SMOOTH.items()]
    mass, acc, cmi = [], [], []
    for table, dose in rows:
        for i in SEEDS:
            if dose == 0.2 and table is SMOOTH[0.2] and i == 2:
                pass  # unmatched rows still are teachers with both numbers: pooled too
            mass.append(table["omitted_mass"][i])
            acc.append(table["zero_shot_omitted_acc"][i])
            cmi.append(table["train_cmi"][i])
    rho, rho_cmi = spearmanr(mass, acc).statistic, spearmanr(cmi, acc).statistic
    assert f"| 07 dose-response teachers | {len(mass)} | {rho:+.2f} | {rho_cmi:+.2f} |" in section
    m, low, high = _ci([a - b for a, b in zip(MCMI[0.1]["omitted_mass"], SMOOTH[0.1]["omitted_mass"])])
    verdict = "held" if low > 0 else "reversed" if high < 0 else "not shown"
    assert f"| 0.1 | MCMI − label smoothing | {m:+.4f} [{low:+.4f}, {high:+.4f}] (n=3) | {verdict} |" in section
    m, low, high = _ci([a - b for a, b in zip(MCMI[0.2]["omitted_mass"][:2], SMOOTH[0.2]["omitted_mass"][:2])])
    assert f"| 0.2 | MCMI − label smoothing | {m:+.4f} [{low:+.4f}, {high:+.4f}] (n=2) | no verdict (two seeds) |" \
        in section


def test_the_bottom_line_opens_the_report(tmp_path):
    md = _dose_run(tmp_path / "run")
    head, rest = md.split("## What was run")
    bottom = head.split("## Bottom line")[1]
    lines = [line[2:] for line in bottom.splitlines() if line.startswith("- ")]
    assert 3 <= len(lines) <= 6 and lines[0] == "This run: 3 seed(s) of 07_dose_response; 6 comparison(s) judged below."
    d = [100 * (a - b) for a, b in zip(MCMI[0.1]["student_acc"], SMOOTH[0.1]["student_acc"])]
    m, low, high = _ci(d)
    assert lines[1] == (f"Found: KD student accuracy at 0.1, MCMI − label smoothing — **held** ({m:+.2f} [{low:+.2f}, "
                        f"{high:+.2f}]).")
    assert any(line.startswith("Not decided: ") and "with two seeds" in line and "with no signal" in line
               for line in lines)
    assert "## Which claims held" in rest and "# mcmi_lab report: dose" in head


def test_the_header_describes_the_run_that_was_made(tmp_path):
    out = tmp_path / "own"
    write_run_info(out, {"pipeline": "demo", "description": "Fashion-MNIST on CPU: stock words",
                         "notebooks": ["01_teachers", "07_dose_response"], "seeds": [0],
                         "parameters": {"dataset": "/abs/digits.npz", "train_size": 5000, "test_size": 5000,
                                        "val_fraction": 0.1, "lam": 0.5, "cam_layer": "x", "synthetic_size": 9}})
    write_results(out / "seed_0", "01_teachers", {"teachers": [], "data": {
        "name": "digits", "classes": ["a", "b"], "train_size": 3600, "val_size": 400, "test_size": 1000,
        "image": [1, 8, 8]}}, {"dataset": "/abs/digits.npz", "train_size": 5000, "test_size": 5000,
                               "val_fraction": 0.1, "lam": 0.5, "seed": 0, "run_dir": "x"})
    md = build_report(out)[0].read_text()
    assert "stock words" not in md and "Fashion-MNIST" not in md
    assert ("- data: digits (`/abs/digits.npz`), 3,600 training (+ 400 validation) / 1,000 test images of 1×8×8, "
            "2 classes: a, b") in md
    assert "- train_size 5,000 requested, but the data set has only 4,000 (training + validation): all of it" in md
    assert "- test_size 5,000 requested, but the data set has only 1,000: all of it was used" in md
    assert "- notebooks with results: 01_teachers (in run.json without results: 07_dose_response)" in md
    params = md.split("## Parameters")[1]
    assert "<summary>5 parameters, read by the notebooks that ran</summary>" in params
    assert "| lam | `0.5` |" in params and "cam_layer" not in params and "synthetic_size" not in params
    page = (out / "report.html").read_text()
    assert "<details>\n<summary>5 parameters, read by the notebooks that ran</summary>" in page


# ---- hostile and odd input ------------------------------------------------------------------------------------------

LEAK = "x\n![leak](/etc/hostname)\n# heading | cell"


def test_strings_from_data_results_and_run_json_cannot_make_lines(tmp_path):
    out = tmp_path / "bad"
    write_run_info(out, {"pipeline": "demo\n![p](/etc/passwd)", "description": LEAK, "notebooks": ["01_teachers"],
                         "seeds": [0], "device": LEAK, "parameters": {"lam": LEAK}})
    classes = [LEAK, "b"]
    write_results(out / "seed_0", "01_teachers", {"teachers": [
        {"teacher": LEAK, "test_acc": 0.5, "train_cmi": 0.1, "test_cmi": 0.1}], "data": {
        "name": LEAK, "classes": classes, "train_size": 10, "test_size": 10, "image": [1, 2, 2]}})
    write_results(out / "seed_0", "06_zero_shot", {"classes": classes, "zero_shot": [
        {"teacher": LEAK, "omitted": [0], "student_acc": 0.5, "omitted_acc": {"0": 0.1}}]})
    md = build_report(out)[0].read_text()
    images = [line for line in md.splitlines() if line.startswith("![")]
    assert images and all("](figures/" in line or "/figures/" in line for line in images)
    assert not [line for line in md.splitlines() if line.startswith("# ") and "mcmi_lab report" not in line]
    assert "\\!\\[leak\\](/etc/hostname) \\# heading \\| cell" in md
    page = (out / "report.html").read_text()
    secret = base64.b64encode(open("/etc/hostname", "rb").read()).decode() if __import__("os").path.exists(
        "/etc/hostname") else "never"
    assert secret not in page and "/etc/passwd" not in page.split("<img")[0].split("<h1>")[0]
    assert "![leak](/etc/hostname) # heading | cell" in page  # shown literally, as text


def test_render_html_embeds_only_the_run_folders_figures(tmp_path):
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "seed_0" / "figures" / "04").mkdir(parents=True)
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    (out / "figures" / "a.png").write_bytes(png)
    (out / "seed_0" / "figures" / "04" / "b.png").write_bytes(png)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    (out / "figures" / "link.png").symlink_to(secret)
    (out / "notes.png").write_bytes(png)
    md = "\n".join(["![a](figures/a.png)", "![b](seed_0/figures/04/b.png)", f"![s]({secret})",
                    "![s](../secret.png)", "![s](figures/../../secret.png)", "![l](figures/link.png)",
                    "![n](notes.png)", "![h](/etc/hostname)"])
    page = render_html(md, out)
    embedded = base64.b64encode(png).decode()
    assert page.count(f"data:image/png;base64,{embedded}") == 2
    assert base64.b64encode(b"\x89PNG secret").decode() not in page
    assert page.count("not embedded: only PNG files under the run folder's figures/ are") == 6
    assert "data:" not in render_html("![a](figures/a.png)")  # no run folder: nothing is read


def test_md_escape_and_tables_keep_one_line_per_row():
    assert md_escape("a\nb\r\nc\u2028d") == "a b c d"
    assert md_escape("![x](y) # | * ` _a_ b_c <s> \\") == "\\!\\[x\\](y) \\# \\| \\* \\` \\_a\\_ b_c \\<s> \\\\"
    assert md_escape("\ud800") == "\\\\ud800"  # a lone surrogate escaped: report.md stays valid UTF-8
    assert md_escape("a\x005\x00\x1b") == "a\ufffd5\ufffd\ufffd"  # control characters shown, never acting
    assert "<p>* 5</p>" in render_html("\\* \x005\x00")  # the renderer's own marks cannot be forged
    table = markdown_table([{"a": "x\ny", "b": "1 (n=3)"}, {"a": "z", "b": "2 (n=3)"}])
    assert table == "| a | b (n=3) |\n|---|---|\n| x y | 1 |\n| z | 2 |"
    table = markdown_table([{"a": "1 (n=3)", "b": "2 (n=3)"}, {"a": "3 (n=3)", "b": "—"}])
    assert table.splitlines()[0] == "| a (n=3) | b (n=3) |"  # the first column is a value column: per column
    table = markdown_table([{"t": "x", "a": "1 (n=3)", "b": "2 (n=3)"}, {"t": "y", "a": "3 (n=2)", "b": "4 (n=3)"}])
    assert table.splitlines()[:3] == ["| t | a | b (n=3) |", "|---|---|---|", "| x | 1 (n=3) | 2 |"]


def test_missing_keys_strings_for_numbers_and_surrogates_render(tmp_path):
    def odd(i, rows):
        del rows[1]["train_cmi"]  # a row missing train_cmi (a KeyError before)
        rows[2]["dose"] = "0.2"  # numbers stored as strings ("Unknown format code 'g'" before)
        rows[3]["train_cmi"] = "0.1"
        rows[3]["matched"] = False
        return rows

    out = tmp_path / "odd"
    md = _dose_run(out, mutate=odd)
    assert "## Dose-response" in md and "| label smoothing | 0.1 | seed 0: —; seed 1: —; seed 2: — |" in md
    write_results(out / "seed_0", "01_teachers", {"teachers": [{"teacher": "mll", "test_acc": "0.9"}], "data": {
        "name": "d", "classes": ["\ud800x", "b"], "train_size": "10", "test_size": None, "image": "1x2"}})
    md = build_report(out)[0].read_text(encoding="utf-8")
    assert "2 classes: \\\\ud800x, b" in md and "— training / — test images" in md
    assert _table_row(md, "| MLL |").startswith("| MLL | — |")


@pytest.mark.parametrize("key, value, expected", [("notebooks", 5, "a list of notebook names"),
                                                  ("wall_time_s", "600", "a number of seconds"),
                                                  ("parameters", ["lam"], "an object of parameters"),
                                                  ("seeds", "0 1", "a list of integers >= 0")])
def test_run_json_of_the_wrong_shape_fails_in_one_line(tmp_path, key, value, expected):
    out = tmp_path / "run"
    write_run_info(out, {"pipeline": "demo", key: value})
    write_results(out / "seed_0", "01_teachers", {"teachers": []})
    with pytest.raises(ValueError) as err:
        build_report(out)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{str(out / 'run.json')!r}: {key!r} holds a ") and \
        f"expected {expected}" in text
    (out / "run.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"run.json' holds a list: expected the JSON object mcmi-lab run writes$"):
        build_report(out)


def test_the_bottom_line_says_where_the_controls_could_not_follow(tmp_path):
    def low_reach(i, rows):  # label smoothing tops out near 0.045: MCMI meets it at 0.05 only, in seeds 0 and 1
        for r in rows:
            if r["method"] == "label_smoothing":
                r.update(train_cmi=0.043 + 0.001 * i, matched=False)
        rows.append({**rows[0], "method": "label_smoothing", "dose": 0.05, "train_cmi": 0.045, "matched": True})
        if i < 2:
            rows.append({**rows[0], "method": "mcmi", "dose": 0.05, "train_cmi": 0.05, "matched": True,
                         "student_acc": 0.9})
        return rows

    md = _dose_run(tmp_path / "run", mutate=low_reach)
    bottom = md.split("## Bottom line")[1].split("## What was run")[0]
    assert ("- Label smoothing reach only 0.045 nats of train CMI, so MCMI is compared with label smoothing at 0.05 "
            "alone, with 2 seed(s).") in bottom


def test_metrics_with_the_same_ranks_share_one_row_and_gamma_is_defined(tmp_path):
    def separation(i, rows):  # train Γ and test Γ differ in value but order the teachers the same way
        for k, r in enumerate(rows):
            r.update(test_separation=2.0 + 0.1 * k + 0.01 * i, train_separation=1.5 + 0.2 * k, test_nll=0.3 + k % 2)
        return rows

    md = _dose_run(tmp_path / "run", mutate=separation)
    section = md[md.index("### Dose-response teachers (07)"):]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    assert "| train Γ = test Γ (same ranks)" in rows and "| test Γ" not in rows and "| test NLL" in rows
    assert "Γ: the separation, the mean cross entropy between the outputs of two images of different classes" in md


def test_every_paired_list_line_carries_its_verdict(tmp_path):
    out = tmp_path / "run"
    write_run_info(out, {"pipeline": "demo", "seeds": list(SEEDS)})
    kd = {"control": [0.80, 0.81, 0.82], "mcmi": [0.81, 0.83, 0.86]}
    few = {"control": [0.60, 0.60, 0.60], "mcmi": [0.60, 0.60, 0.60]}  # every student equal: no signal
    for i in SEEDS:
        write_results(out / f"seed_{i}", "03_distill", {"students": [
            {"teacher": t, "method": "kd", "student_acc": v[i]} for t, v in kd.items()]})
        write_results(out / f"seed_{i}", "05_few_shot", {"few_shot": [
            {"teacher": t, "fraction": f, "student_acc": v[i] + (f == 1.0) * 0.01 * i * (t == "mcmi")}
            for t, v in few.items() for f in (0.25, 1.0)]})
    md = build_report(out)[0].read_text()
    d = [100 * (a - b) for a, b in zip(kd["mcmi"], kd["control"])]
    m, low, high = _ci(d)
    need = next(n for n in range(2, 12) if T_975[n - 1] * _mean_std(d)[1] / math.sqrt(n) <= 2)
    verdict = "held" if low > 0 else "not shown"
    paper = "cannot exclude" if low <= 3.32 <= high else "excludes"
    assert (f"- kd: {m:+.2f} (95% CI {low:+.2f} .. {high:+.2f}, n=3) — **{verdict}** ({paper} the paper's +3.32; "
            f"±2 points needs {need} seeds)") in md.split("## Students by KD method")[1]
    section = md.split("## Few-shot students")[1]
    assert "- fraction 0.25: +0.00 (95% CI +0.00 .. +0.00, n=3) — **no signal (every value equal)**\n" in section
    d = [0.0, 1.0, 2.0]  # fraction 1: no paper effect to compare (the paper's few-shot effect is at 5%)
    m, low, high = _ci(d)
    assert (f"- fraction 1: {m:+.2f} (95% CI {low:+.2f} .. {high:+.2f}, n=3) — **not shown** (±2 points needs "
            f"{next(n for n in range(2, 12) if T_975[n - 1] * 1.0 / math.sqrt(n) <= 2)} seeds)") in section


def test_a_pair_equal_in_every_seed_is_no_signal_not_a_verdict():
    from mcmi_lab.report.summary import difference, verdict

    same = difference({"0": 0.9, "1": 0.95, "2": 0.97}, {"0": 0.9, "1": 0.95, "2": 0.97}, scale=100.0)
    assert (same["mean"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    assert verdict(same) == "no signal (no difference in any seed)"
    moved = difference({"0": 0.91, "1": 0.96, "2": 0.98}, {"0": 0.9, "1": 0.95, "2": 0.97}, scale=100.0)
    assert verdict(moved) == "held"  # the same +1 point in every seed: an interval of zero width on one side
