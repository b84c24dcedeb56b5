"""The command line: `mcmi-lab` (commands.py: run, report, status, inspect, data), `mcmi-lab train` (train.py, torchrun), and the SLURM executor of `mcmi-lab run --executor slurm` (slurm.py)."""
# `mcmi_lab.cli` was one module; its public names stay importable from here
from .commands import (  # noqa: F401
    add_train_command, JobFailed, SlurmOptions, add_slurm_arguments, run_study, slurm_options, study_status,
    NOTEBOOKS_ENV, NotebookError, notebooks_dir, notebook_path, HEADLESS_ENGINE, execute_notebook, KERNEL_STARTS,
    default_jobs, run_pipeline, build_parser, main,
)
