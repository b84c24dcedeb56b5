"""What the seeds can decide, and the report's bottom line.

Per-seed values from the merged results (:func:`seed_rows`, :func:`values`), cells "mean ± std (n=K)", paired
differences with their 95% interval, and the verdict of each comparison and slope (issue 34, item 4):

* the interval on the claimed side of zero: *held*; on the other side: *reversed*; across zero: *not shown*;
* with two seeds (t ≈ 12.7) or a slope over less than :data:`MIN_DOSE_SPAN` nats of dose: no verdict, the reason;
* every value equal (all students at 0%): *no signal*;
* where the paper reports the effect (:data:`PAPER_EFFECTS`), whether the interval excludes it — a finding either
  way — and how many seeds the spread measured here would need for an interval of ±2 points
  (:func:`mcmi_lab.metrics.stats.seeds_for_half_width`).

:func:`bottom_line` writes the report's opening lines from those verdicts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

from .markdown import Text, md_escape
from ..metrics.stats import format_mean_std, mean_std, paired_difference, seeds_for_half_width

#: The effects the MCMI paper reports (DESIGN.md §1), in points of student accuracy: MCMI teacher over its baseline.
PAPER_EFFECTS = {"kd": 3.32, "few_shot": 5.72, "zero_shot": 84.0}
#: A slope fitted over less dose than this (nats of train CMI, mean span over seeds) decides nothing.
MIN_DOSE_SPAN = 0.05
#: The half-width (points) that :func:`seeds_needed` asks of the interval.
TARGET_HALF_WIDTH = 2.0

SeedRows = dict[str, list[dict]]


def number(v: Any) -> float | None:
    """`v` as a float when it is a finite number (not a bool, not a string); else None."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def fmt(v: Any, spec: str = ".3f") -> str:
    """A number formatted with `spec`, or "—" for anything that is not one (a string, None, nan)."""
    x = number(v)
    return "—" if x is None else format(x, spec)


def seed_rows(results: Mapping[str, Any], notebook: str, key: str) -> SeedRows:
    """``{seed: results[seed][notebook][key]}`` for the seeds that have it (rows that are dicts)."""
    out = {}
    for seed, notebooks in results.get("seeds", {}).items():
        nb = notebooks.get(notebook) if isinstance(notebooks, Mapping) else None
        rows = nb.get(key) if isinstance(nb, Mapping) else None
        if isinstance(rows, list) and any(isinstance(r, Mapping) for r in rows):
            out[seed] = [r for r in rows if isinstance(r, Mapping)]
    return out


def values(rows: SeedRows, metric: str | Callable[[dict], Any], **match: Any) -> dict[str, float]:
    """``{seed: metric}`` of the first row in each seed whose fields equal `match` (numbers only)."""
    get = metric if callable(metric) else (lambda r: r.get(metric))
    out = {}
    for seed, seed_list in rows.items():
        for r in seed_list:
            if all(r.get(k) == v for k, v in match.items()):
                v = number(get(r))
                if v is not None:
                    out[seed] = v
                break
    return out


def cell(vals: Mapping[str, float], scale: float = 1.0, digits: int = 3) -> str:
    """"84.2 ± 1.3 (n=3)" over seeds, or "—" without values (a table gives a column's common n once)."""
    if not vals:
        return "—"
    mean, std = mean_std([scale * v for v in vals.values()])
    return format_mean_std(mean, std, len(vals), digits)


def difference(a: Mapping[str, float], b: Mapping[str, float], scale: float = 1.0) -> dict | None:
    """Paired difference a − b over the seeds both have (stats.paired_difference), scaled, with ``flat``: every
    value of both sides equal, and ``same``: both sides equal seed by seed (no signal either way); None without
    pairs."""
    common = [s for s in a if s in b]
    if not common:
        return None
    xs, ys = [scale * a[s] for s in common], [scale * b[s] for s in common]
    return {**paired_difference(xs, ys), "flat": len(set(xs + ys)) == 1, "same": xs == ys}


def format_difference(d: dict | None, digits: int = 2) -> str:
    if d is None:
        return "—"
    if d["n"] < 2:
        return f"{d['mean']:+.{digits}f} (n=1, no interval)"
    return f"{d['mean']:+.{digits}f} (95% CI {d['low']:+.{digits}f} .. {d['high']:+.{digits}f}, n={d['n']})"


def format_interval(d: dict | None, digits: int = 2) -> str:
    """The compact form for tables: "+1.23 [-0.50, +2.96] (n=3)"."""
    if d is None or not d["n"]:
        return "—"
    if d["n"] < 2:
        return Text(f"{d['mean']:+.{digits}f} (n=1)")
    return Text(f"{d['mean']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] (n={d['n']})")


def _undecided(d: dict | None, span: float | None = None) -> str | None:
    """Why `d` gives no verdict (None when it can give one)."""
    if d is None or not d["n"]:
        return "not measured"
    if d.get("flat"):
        return "no signal (every value equal)"
    if d.get("same"):  # e.g. two teachers of the same test accuracy in every seed: a 0 .. 0 interval decides nothing
        return "no signal (no difference in any seed)"
    if d["n"] < 2 or math.isnan(d["low"]):
        return "no verdict (one seed: no interval)"
    if d["n"] == 2:
        return "no verdict (two seeds)"
    if span is not None and not span >= MIN_DOSE_SPAN:
        return f"no verdict (doses too close: {span:.3f} nats)"
    return None


def verdict(d: dict | None, sign: int = 1) -> str:
    """"held" when the interval lies on the side `sign` of 0, "reversed" on the other side, else "not shown";
    the reason instead where the seeds decide nothing (:func:`_undecided`)."""
    reason = _undecided(d)
    if reason:
        return reason
    low, high = (d["low"], d["high"]) if sign > 0 else (-d["high"], -d["low"])
    return "held" if low > 0 else "reversed" if high < 0 else "not shown"


def trend(d: dict, span: float | None = None) -> str:
    """A slope's verdict: "rises" / "falls" when its 95% interval is above / below 0, else "no trend shown"; the
    reason instead with two seeds, doses too close (`span`, nats) or a flat metric."""
    reason = _undecided(d, span)
    if reason:
        return reason
    return "rises" if d["low"] > 0 else "falls" if d["high"] < 0 else "no trend shown"


def paper_check(d: dict | None, effect: float | None, span: float | None = None) -> str:
    """Whether the interval excludes the paper's `effect` (points): "excludes the paper's +3.32" or "cannot
    exclude the paper's +3.32"; for a slope the interval × the dose `span` studied (its change over the doses);
    "" without an effect to compare or where the seeds give no verdict."""
    if effect is None or _undecided(d, span):
        return ""
    scale = span if span is not None else 1.0
    low, high = d["low"] * scale, d["high"] * scale
    inside = low <= effect <= high
    return f"{'cannot exclude' if inside else 'excludes'} the paper's {effect:+.2f}"


def seeds_needed(d: dict | None) -> int | None:
    """Seeds at which this comparison's seed-to-seed spread gives a 95% interval of ±2 points."""
    if d is None or d["n"] < 2 or d.get("flat"):
        return None
    return seeds_for_half_width(d["std"], TARGET_HALF_WIDTH)


# ---- claims and the bottom line ------------------------------------------------------------------------------------

class Report:
    """Builds the Markdown text section by section; collects the claims as it goes (dicts: text, d, sign, ...)."""

    def __init__(self, results: Mapping[str, Any], out: Path):
        self.results, self.out = results, out
        self.lines: list[str] = []
        self.claims: list[dict] = []
        self.notes: dict[str, list[str]] = {}  # facts for the bottom line: "reach", "collapsed"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def claim(self, text: str, d: dict | None, sign: int = 1, digits: int = 2, effect: float | None = None,
              points: bool = False, short: str | None = None) -> None:
        """Add a claim with its interval and verdict; a comparison without data is left out. `effect`: the paper's
        (points); `points`: the comparison is in points (then the seeds for ±2 points are given); `short`: its
        name in the bottom line."""
        if d is not None:
            self.claims.append({"text": text, "d": d, "sign": sign, "digits": digits, "effect": effect,
                                "points": points, "short": short or text})

    def figure(self, path: Path | None, caption: str) -> None:
        if path is not None and path.is_file():
            caption = caption.replace("*", "∗")  # P* inside the italic caption would end it: the operator sign
            self.add(f"![{caption}]({path.relative_to(self.out).as_posix()})", "", f"*{caption}*", "")


def judged(d: dict | None, digits: int = 2, sign: int = 1, effect: float | None = None, points: bool = False) -> str:
    """A comparison as the report shows it: "+1.20 (95% CI ..., n=3) — **not shown** (cannot exclude the paper's
    +3.32; ±2 points needs 7 seeds)"."""
    if d is None:
        return "—"
    extra = [paper_check(d, effect)]
    n = seeds_needed(d) if points and not verdict(d, sign).startswith("no signal") else None  # no spread to size
    if n is not None:
        extra.append(f"±2 points needs {n} seeds")
    tail = "; ".join(e for e in extra if e)
    return f"{format_difference(d, digits)} — **{verdict(d, sign)}**" + (f" ({tail})" if tail else "")


def claim_line(c: dict) -> str:
    return f"- {c['text']}: {judged(c['d'], c['digits'], c['sign'], c['effect'], c['points'])}"


def bottom_line(rep: Report) -> list[str]:
    """3-6 lines written from the claims and notes: what held or reversed, what excludes the paper's effect,
    what could not be decided and why, which doses were out of reach, which teachers were left out."""
    held = [c for c in rep.claims if verdict(c["d"], c["sign"]) in ("held", "reversed")]
    seeds = rep.results.get("seeds", {})
    ran = list(dict.fromkeys(nb for notebooks in seeds.values() for nb in notebooks))
    lines = [f"This run: {len(seeds)} seed(s) of {names(ran)}; {len(rep.claims)} comparison(s) judged below."]
    if held:
        lines.append("Found: " + "; ".join(f"{c['short']} — **{verdict(c['d'], c['sign'])}** "
                                           f"({format_interval(c['d'], c['digits']).split(' (')[0]})"
                                           for c in held[:4])
                     + (f"; and {len(held) - 4} more below" if len(held) > 4 else "") + ".")
    excluded = [c for c in rep.claims if paper_check(c["d"], c["effect"]).startswith("excludes")]
    open_ = [c for c in rep.claims if paper_check(c["d"], c["effect"]).startswith("cannot")]
    if excluded or open_:
        lines.append(f"Against the paper's effects: {len(excluded)} comparison(s) exclude them"
                     + (f" ({'; '.join(c['short'] for c in excluded[:3])})" if excluded else "")
                     + f", {len(open_)} cannot exclude them.")
    reasons: dict[str, int] = {}
    for c in rep.claims:
        v = verdict(c["d"], c["sign"])
        if v == "not shown" or v.startswith(("no verdict", "no signal")):
            key = ("the interval across zero" if v == "not shown" else "no signal (every value equal)"
                   if v.startswith("no signal") else v.split("(")[-1].rstrip(")"))
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines.append(f"Not decided: {sum(reasons.values())} of {len(rep.claims)} comparisons ("
                     + ", ".join(f"{n} with {why}" for why, n in reasons.items()) + ").")
    if not rep.claims:
        lines.append("Nothing to judge yet: no comparison has results.")
    collapsed = rep.notes.get("collapsed", [])[:1]
    lines += rep.notes.get("reach", [])[:max(1, 6 - len(lines) - len(collapsed))] + collapsed
    return ["## Bottom line", "", '<div class="summary">', "", *(f"- {line[:1].upper()}{line[1:]}" for line in lines), "", "</div>", ""]


def names(items: list[Any]) -> str:
    """Values from the results, escaped, comma-separated."""
    return ", ".join(md_escape(i) for i in items)
