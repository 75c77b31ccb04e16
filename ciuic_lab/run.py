"""Hydra entry point: `python -m ciuic_lab.run [overrides]`, `-m` for sweeps. Wiring only.

In a sweep a failing point is recorded in its result.json and the sweep goes on; a single run
exits non-zero with the error. Under torchrun (several processes, ciuic_lab/dist.py) every
process runs this entry point; a point failing on any rank ends them all.
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from ciuic_lab import dist
from ciuic_lab.errors import ConfigError, JobLocked, ModelNotFound
from ciuic_lab.track import FRONTIER
from ciuic_lab.track.tracker import sweep_group

log = logging.getLogger("ciuic_lab")


def objective(cfg: DictConfig, metrics: dict, hc) -> float | tuple | None:
    """What the job returns to the sweeper: perplexity; for a multi-objective search
    (hydra/sweeper=pareto: a list of directions) `objectives` if set, else (bits/param, ppl)."""
    direction = OmegaConf.select(hc, "sweeper.direction", default=None)
    n = len(direction) if OmegaConf.is_list(direction) else 1
    names = list(OmegaConf.select(cfg, "objectives", default=None) or FRONTIER[-n:])
    values = tuple(metrics.get(k) for k in names)
    return values[0] if len(values) == 1 else values


@hydra.main(version_base="1.3", config_path="../conf", config_name="run")
def main(cfg: DictConfig) -> float | None:
    from ciuic_lab.job import run_job

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if cfg.tracker.group is None and multirun:
        with open_dict(cfg):
            cfg.tracker.group = sweep_group(hc.sweep.dir)
    name = ",".join(hc.overrides.task) or "default"
    try:
        metrics = run_job(cfg, hc.runtime.output_dir, job_name=name,
                          overrides=list(hc.overrides.task))
        return objective(cfg, metrics, hc)
    except (ConfigError, ModelNotFound) as e:
        log.error("invalid config: %s", e)
        if not multirun:
            sys.exit(2)
    except JobLocked as e:  # the other run's directory is left as it is: nothing to record
        log.error("%s", e)
        if not multirun:
            sys.exit(3)
    except Exception as e:
        log.exception("job failed: %s", e)
        # Distributed, the other ranks may be waiting in a collective this rank will never
        # join: end the process, so the launcher (torchrun) stops them all. The point's
        # result.json says which rank failed and why; a rerun into the sweep dir redoes it.
        if not multirun or dist.world().on:
            sys.exit(1)
    return None


if __name__ == "__main__":
    main()
