"""Entry point: ``python -m pipeline.run [overrides]`` or ``python -m pipeline.run -m a=1,2 b=x,y``.

Only the Hydra shell lives here; the work is ``pipeline.jobs.run_job`` and the stage functions. They import
torch, so they are imported inside ``main``: ``--help`` and ``--cfg job`` stay fast (no job runs there).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from core.errors import ConfigError
from pipeline.config import check_cli_overrides, check_group_choices, dirname_from_overrides, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.jobs import run_job

    hydra_cfg = HydraConfig.get()
    check_group_choices(dict(hydra_cfg.runtime.choices))  # e.g. editor=rome_schema, which Hydra offers
    job_dir = Path(hydra_cfg.runtime.output_dir)
    name = dirname_from_overrides(hydra_cfg.job.override_dirname)
    logging.getLogger(__name__).info("job %s -> %s", name, job_dir)
    run_job(cfg, job_dir, job_name=name)


if __name__ == "__main__":
    try:  # top-level values Hydra would only meet while making job dirs: named here, before any job
        check_cli_overrides(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"Error: {err}")
    main()
