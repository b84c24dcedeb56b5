"""The run report (report.md / report.html) of a run folder."""
# `mcmi_lab.report` was one module; its public names stay importable from here
from .build import (  # noqa: F401
    BAYES_DOSE_METRICS, DOSE_METRICS, dose_response, dose_slopes, dose_tables, working, Text, clean_text,
    markdown_table, md_escape, render_html, PAPER_EFFECTS, Report, bottom_line, cell, claim_line, difference, fmt,
    format_difference, judged, names, number, seed_rows, trend, values, verdict, omitted_mean, build_report,
)
