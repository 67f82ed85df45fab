"""``python -m pipeline.status [DIR ...]``: the state of every job under a sweep or output dir.

One line per job dir: ``done``, ``running`` (with pid, host and heartbeat age), ``died`` (a
``running`` status whose process is gone or whose heartbeat went stale: rerun the command to
resume it), ``failed`` or ``recompute_failed`` (with the error), in a fixed-width table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pipeline.joblock import STATUS, job_state, read_status


def job_rows(root: Path, now: float | None = None) -> list[dict[str, str]]:
    """A row per job dir under ``root`` (any dir holding a ``status.json``), sorted by path."""
    now = time.time() if now is None else now
    rows = []
    for status_file in sorted(Path(root).rglob(STATUS)):
        job_dir = status_file.parent
        status = read_status(job_dir) or {}
        state = job_state(job_dir, now)
        detail = ""
        if state in ("running", "died"):
            beat = status.get("heartbeat", status.get("started"))
            age = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
            detail = f"pid {status.get('pid')} on {status.get('host')}, heartbeat {age}"
        elif state in ("failed", "recompute_failed"):
            detail = str((status.get("error") or {}).get("message", "")).splitlines()[0][:160] if status.get("error") else ""
        rows.append({"job": str(job_dir.relative_to(root)) if job_dir != root else ".", "stage": str(status.get("stage", "")),
                     "state": state, "detail": detail})
    return rows


def render(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "no jobs found"
    width = {key: max(len(key), *(len(row[key]) for row in rows)) for key in ("job", "stage", "state")}
    lines = [f"{'job':<{width['job']}}  {'stage':<{width['stage']}}  {'state':<{width['state']}}  detail"]
    lines += [f"{r['job']:<{width['job']}}  {r['stage']:<{width['stage']}}  {r['state']:<{width['state']}}  {r['detail']}"
              for r in rows]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.status", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="*", default=["outputs"], help="sweep, runs or output dirs (default: outputs)")
    for root in parser.parse_args(argv).dirs:
        print(f"{root}:\n{render(job_rows(Path(root)))}")


if __name__ == "__main__":
    main()
