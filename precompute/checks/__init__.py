"""`saescope check`: declarative feature checks (TOML) run against a model and the SAEs of a store.

    spec.py    parse and validate the check file (before any model loads); errors name the check, the line, what is allowed
    kinds.py   fires, ablation, steering, monitor: each measured through precompute.encode / precompute.interventions
    run.py     run every check (progress bar) -> CheckRun with provenance (file hashes, store verify, version)
    report.py  the readable summary, JSON and JUnit XML
"""

from .spec import KINDS, CheckFile, CheckSpec, load_check_file  # noqa: F401
