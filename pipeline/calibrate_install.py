"""Install a calibration job's winning config into ``conf/editor_model/`` (a deliberate, reviewed step).

    python -m pipeline.calibrate_install outputs/runs/default/stage=calibrate,editor=rome/
    python -m pipeline.calibrate_install <job dir> --overwrite     # replace an existing file

``stage=calibrate`` never writes into ``conf/``: it leaves ``<editor>_<model>.yaml`` in its job dir
with a comment citing the evidence. This copies it (atomically) after checking that the job
finished, and prints the diff against the file it replaces; without ``--overwrite`` an existing
file is left alone. Commit the change with the job's ``calibration.md``'s numbers in the message.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Optional, Sequence

from core.conf import CONF_DIR
from core.errors import ConfigError, DataError
from core.io import atomic_write_text, read_json


def winning_yaml(job_dir: Path) -> Path:
    """The yaml a finished ``stage=calibrate`` job proposes (DataError if there is none)."""
    marker = job_dir / "results.json"
    if not marker.is_file():
        raise DataError("job_dir", str(job_dir), "is not a finished job (no results.json)",
                        "run or resume it: python -m pipeline.run stage=calibrate ... (the same command)")
    payload = read_json(marker)
    if payload.get("stage") != "calibrate":
        raise DataError("job_dir", str(job_dir), f"is a stage={payload.get('stage')} job", "give a stage=calibrate job dir")
    name = payload["results"].get("yaml")
    if not name:
        raise DataError("job_dir", str(job_dir), "found no eligible grid point, so it proposes no config",
                        "see its calibration.md; widen the grid or relax stage.max_fluency_drop")
    return job_dir / name


def install(job_dir: Path, conf_dir: Path = CONF_DIR, overwrite: bool = False) -> tuple[Path, str]:
    """Copy the job's winning yaml to ``conf_dir/editor_model/``; returns the target and a unified diff."""
    source = winning_yaml(job_dir)
    target = conf_dir / "editor_model" / source.name
    new = source.read_text()
    old = target.read_text() if target.exists() else ""
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(target), str(source)))
    if target.exists() and not overwrite:
        raise ConfigError("--overwrite", False, f"{target} exists", f"review the diff, then pass --overwrite:\n{diff}")
    atomic_write_text(target, new)
    return target, diff


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description="Install a stage=calibrate job's winning config into conf/editor_model/.")
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing conf/editor_model file")
    parser.add_argument("--conf-dir", type=Path, default=CONF_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        target, diff = install(args.job_dir, args.conf_dir, args.overwrite)
    except (ConfigError, DataError) as err:
        sys.exit(f"Error: {err}")
    print(diff or f"{target} is unchanged")
    print(f"installed {target}")
    return target


if __name__ == "__main__":
    main()
