"""One CLI job: validate → run (ciuic_lab.runner) → result.json + W&B → summary table.

Called by the Hydra entry point for each job of a sweep. Every failure, including a bad config,
is recorded in the job's result.json before it propagates, so a sweep never loses a point
silently; an out-of-memory failure is recorded with what to change.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import traceback
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from ciuic_lab import dist
from ciuic_lab.config import to_container, validate
from ciuic_lab.errors import CheckpointError, JobLocked

log = logging.getLogger("ciuic_lab")

# Keys that do not change what a job computes: ignored when deciding whether to resume.
_VOLATILE = ("tracker", "progress", "force")


def config_hash(config: dict) -> str:
    """sha256 of the resolved config without presentation keys (tracking, progress bars)."""
    core = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def completed(out_dir: Path, chash: str) -> dict | None:
    """The metrics of a finished identical job in out_dir, if there is one and the artefacts its
    config asked for (the packed checkpoint) are still whole."""
    from ciuic_lab.track.result import read_result

    path = out_dir / "result.json"
    if not path.exists():
        return None
    try:
        res = read_result(path)
    except (ValueError, OSError):
        return None  # a torn or foreign file: recompute
    if res.get("status") != "ok" or res.get("config_hash") != chash:
        return None
    broken = _broken_artefacts(out_dir, res.get("config") or {})
    if broken:
        log.warning("%s: rerunning a point whose result.json says ok: %s", out_dir, broken)
        return None
    return res["metrics"]


def _broken_artefacts(out_dir: Path, config: dict) -> str | None:
    """Why the checkpoint a finished job must have left is unusable, or None. A killed rerun or
    a full disk can leave a result.json whose checkpoint is gone, and export would fail later."""
    from ciuic_lab.compress.store import checkpoint

    if not (config.get("save") or (config.get("compress") or {}).get("stream")):
        return None
    try:
        checkpoint.verify(out_dir / "compressed")
    except CheckpointError as e:
        return str(e)
    return None


OOM_HINT = ("out of memory: the model, its calibration activations or the evaluation batch did "
            "not fit the device. Try compress.offload=true (one block on the device at a time), a "
            "smaller compress.batch_size / eval.batch_size, fewer data.calib_samples, or a shorter "
            "eval.seqlen.")
HARNESS_LOG = "lm_eval.log"
LOCK = ".lock"


@contextmanager
def _harness_log(out_dir: Path):
    """lm-eval's INFO/WARNING lines (context building, few-shot notes) go to a log file in the
    run directory instead of between the lab's progress bars and summary."""
    log = logging.getLogger("lm_eval")
    handler = logging.FileHandler(out_dir / HARNESS_LOG, delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old = log.propagate, log.level
    log.addHandler(handler)
    log.propagate, log.level = False, logging.INFO
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()
        log.propagate, log.level = old


@contextmanager
def job_lock(out_dir: Path):
    """Hold `out_dir` for this process while its point runs, so that a second run sent to the same
    directory (two sweeps with one hydra.sweep.dir) fails at once instead of overwriting results.

    flock, not a pid file: the kernel drops the lock when the process dies however it dies, so a
    killed run never leaves a directory locked. The pid written inside is only for the message.
    """
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.close(fd)
        by = f" (pid {holder})" if holder else ""
        raise JobLocked(f"{out_dir} is being written by another run{by}; two runs in one job "
                        "directory would overwrite each other's results: give this one its own "
                        "hydra.run.dir / hydra.sweep.dir, or wait for the other") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)  # the pid of a finished run would mislead the next message
        os.close(fd)  # releases the lock


def run_job(cfg: DictConfig, out_dir: str | Path, job_name: str | None = None,
            overrides: list[str] | None = None) -> dict:
    """Run one configured job; returns the metrics. Writes out_dir/result.json in every case,
    except when another live run holds out_dir (JobLocked: its files are left alone).

    A job whose out_dir already holds an ok result.json for the identical resolved config is
    skipped (sweep resume); `+force=true` recomputes it.
    """
    out_dir = Path(out_dir)
    rank = dist.planned(cfg.compress.get("distributed", "auto"))
    if rank:  # a follower of a distributed run: rank 0 holds the job directory and writes it
        return _follow(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with job_lock(out_dir):
        return _run_locked(cfg, out_dir, job_name, overrides)


def _follow(cfg: DictConfig) -> dict:
    """Rank > 0 of a distributed run: the same checks, then rank 0's job directory and whether
    the point is already done, then its share of the run. It writes result.json only if it
    fails first (`_record_failure`), so the failing rank's own error is the one recorded."""
    from ciuic_lab.models.loader import pick_device
    from ciuic_lab.runner import run

    validate(cfg)  # fails as rank 0 fails: the same config
    world = dist.init(cfg.compress.distributed, pick_device(cfg.device))
    out_dir, done, token, chash = dist.broadcast_object(None)
    if done is not None:
        return done
    metrics: dict = {}
    try:
        return run(cfg, out_dir=Path(out_dir), metrics=metrics).metrics
    except BaseException as e:
        _record_failure(Path(out_dir), token, world, config=_config(cfg), metrics=metrics,
                        layers=[], error=_error_text(e),
                        extra={"config_hash": chash, "overrides": []})
        raise


def _config(cfg: DictConfig) -> dict:
    from omegaconf import OmegaConf

    try:
        return to_container(cfg)
    except Exception:  # an unresolvable interpolation: keep the raw config
        return OmegaConf.to_container(cfg, resolve=False)


def _error_text(e: BaseException) -> str:
    error = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    if isinstance(e, torch.OutOfMemoryError):
        error = f"{OOM_HINT}\n\n{error}"
    return error


FAILURE = ".dist_failure"


def _record_failure(out_dir: Path, token: str | None, world, **result) -> None:
    """result.json of a failed run. In a distributed run the first rank to fail writes it,
    naming itself; ranks that fail after it (their peers' sockets closed under them) leave it
    alone: the launcher (torchrun) then stops every rank. `token` tells this run's record from
    a previous run's in the same directory."""
    from ciuic_lab.track.result import write_result

    if not world.on:
        write_result(out_dir, status="failed", **result)
        return
    result["error"] = f"rank {world.rank} of {world.size} failed:\n{result['error']}"
    result["metrics"]["dist/world_size"] = world.size
    result["metrics"]["dist/failed_rank"] = world.rank
    fd = os.open(out_dir / FAILURE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.pread(fd, 200, 0).decode(errors="replace").strip() == token:
            log.error("rank %d failed after another rank did (recorded there): %s", world.rank,
                      result["error"].strip().splitlines()[-1])
            return
        write_result(out_dir, status="failed", **result)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(token).encode(), 0)
    finally:
        os.close(fd)


def _run_locked(cfg: DictConfig, out_dir: Path, job_name: str | None,
                overrides: list[str] | None) -> dict:
    from omegaconf import OmegaConf

    from ciuic_lab.track.result import write_result

    config = _config(cfg)
    chash = config_hash(config)
    done = None
    if not OmegaConf.select(cfg, "force", default=False):
        done = completed(out_dir, chash)
    distributed = dist.planned(cfg.compress.get("distributed", "auto")) is not None
    if done is not None and not distributed:
        print(f"skipped: {out_dir} already holds a complete result for this config (+force=true reruns it)")
        return done
    extra = {"overrides": list(overrides or []), "config_hash": chash}
    metrics: dict = {}
    layers: list[dict] = []
    tracker = None
    world, token = dist.SINGLE, None
    try:
        validate(cfg)  # before anything expensive (run() checks again, cheaply)
        if distributed:  # the followers learn where the job writes, and if it is done already
            from ciuic_lab.models.loader import pick_device

            world = dist.init(cfg.compress.distributed, pick_device(cfg.device))
            token = uuid.uuid4().hex
            dist.broadcast_object((str(out_dir), done, token, chash))
            if done is not None:
                print(f"skipped: {out_dir} already holds a complete result for this config")
                return done
        from ciuic_lab.track.tracker import Tracker

        tracker = Tracker(mode=cfg.tracker.mode, project=cfg.tracker.project,
                          group=cfg.tracker.group, name=job_name, config=config, dir=str(out_dir),
                          entity=cfg.tracker.get("entity"), tags=list(cfg.tracker.get("tags") or []))
        from ciuic_lab.runner import run

        with _harness_log(out_dir):
            outcome = run(cfg, out_dir=out_dir, metrics=metrics)
        layers, generations = outcome.report.layers, outcome.generations
        tracker.log(metrics)
        tracker.log_table("layers", layers)
        if generations:
            tracker.log_table("generations", generations)
        write_result(out_dir, config=config, metrics=metrics, layers=layers, status="ok", error=None,
                     extra={**extra, "generations": generations, "notes": outcome.notes})
        _print_summary(metrics)
        return metrics
    except BaseException as e:
        _record_failure(out_dir, token, world, config=config, metrics=metrics, layers=layers,
                        error=_error_text(e), extra=extra)
        raise
    finally:
        if tracker is not None:
            tracker.finish()


def _print_summary(m: dict) -> None:
    rows = [
        ("WikiText-2 ppl (dense → compressed)",
         f"{m.get('ppl/wikitext2_dense', float('nan')):.3f} → {m['ppl/wikitext2']:.3f}"),
        ("bits/param, compressed layers", f"{m['size/bits_per_param']:.3f}"),
        ("ratio vs fp16, compressed layers", f"{m['size/ratio_vs_fp16']:.2f}x"),
        ("model weight bytes (dense → stored)",
         f"{m['mem/weight_bytes_dense']:,} → {m['mem/weight_bytes']:,}"),
        ("peak memory during eval", f"{m['mem/peak_bytes'] / 2**20:.1f} MiB ({m['mem/peak_kind']})"),
        ("compress / eval time", f"{m['time/compress_s']:.1f} s / {m['time/eval_s']:.1f} s"),
    ]
    if "mem/serve_peak_bytes" in m:
        rows.append(("serving peak, fresh process (dense → compressed)",
                     (f"{m.get('mem/serve_peak_bytes_dense', float('nan')) / 2**20:.1f} → "
                      f"{m['mem/serve_peak_bytes'] / 2**20:.1f} MiB")))
    if "mem/compress_peak_device_bytes" in m:
        rows.append(("peak memory during compression (device / host)",
                     f"{m['mem/compress_peak_device_bytes'] / 2**20:.1f} / "
                     f"{m['mem/compress_peak_host_bytes'] / 2**20:.1f} MiB"))
    if "speed/tokens_per_s" in m:
        rows.append(("prefill speed (dense → compressed)",
                     f"{m.get('speed/tokens_per_s_dense', float('nan')):.0f} → "
                     f"{m['speed/tokens_per_s']:.0f} tokens/s"))
    if "acc/mean" in m:
        rows.append(("lm-eval acc/mean (dense → compressed)",
                     f"{m.get('acc/mean_dense', float('nan')):.4f} → {m['acc/mean']:.4f}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
