"""The three stage launchers behind `python -m slurm <stage>`: each has `build(stage_args, options,
dry_run) -> list[Step]` (registered lazily in slurm/jobs.py) and the job classes its steps run.
They import the stage packages only inside functions, so that `python -m slurm --help` stays light."""
