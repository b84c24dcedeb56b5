"""Speed benchmarks of mcmi_lab: ``python -m benchmarks`` (all, a few minutes on a CPU) or
``python -m benchmarks.<loop|mcmi|cmi|kd>``. Each prints a small table and one line of ratios measured in one
process (baseline and candidate interleaved, median of the paired ratios). See benchmarks/README.md."""
