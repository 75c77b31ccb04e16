"""Task accuracy with lm-evaluation-harness, in-process, on the live (compressed) model.

The model object is wrapped in lm-eval's `HFLM` as it is (no save and reload), so custom modules
such as CompressedLinear run their own forward. Tasks come from three places, first match wins:

1. YAMLs under `include_path` (a user's directory: one YAML + a data file per task),
2. the bundled offline tasks in `ciuic_lab/eval/tasks/` (standard names: arc_easy, piqa, ...),
3. lm-eval's own registry (hub datasets, needs a network); prefix `hub:` to skip 1 and 2.

For 1 and 2, relative `dataset_kwargs.data_files` paths are resolved against the YAML's folder
(lm-eval itself would resolve them against the working directory).

lm-eval is imported lazily: it is an optional extra (`pip install ciuic_lab[eval]`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
from pathlib import Path

from ciuic_lab.eval.tasks import TASKS_DIR

HUB_PREFIX = "hub:"
# Builders that read local files: for these a relative data_files path can only mean "next to the
# YAML". For hub datasets data_files are relative to the dataset repository, so they are left alone.
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow", "pandas", "xml", "webdataset"}
_RENAME = {"perplexity": "ppl"}  # lm-eval's lambada `perplexity` is the project's `ppl/<task>`
_BINARY = {"acc", "acc_norm"}  # 0/1 per sample: the standard error has a closed form


# ---------------------------------------------------------------- task discovery


def _task_dirs(include_path: str | Path | list | None) -> list[Path]:
    """Directories to scan, highest precedence first."""
    if include_path is None:
        user = []
    elif isinstance(include_path, (list, tuple)):
        user = [Path(p).expanduser() for p in include_path]
    else:
        user = [Path(include_path).expanduser()]
    for p in user:
        if not p.is_dir():
            raise FileNotFoundError(f"lm_eval include_path {p} is not a directory")
    return [*user, TASKS_DIR]


def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.yaml") if "__pycache__" not in p.parts)


def local_tasks(include_path: str | Path | list | None = None) -> dict[str, Path]:
    """{task name: YAML path} for the bundled tasks and those under include_path (which win)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    found: dict[str, Path] = {}
    for root in reversed(_task_dirs(include_path)):  # later roots overwrite earlier ones
        for path in _yaml_files(root):
            try:
                cfg = load_yaml(path, resolve_func=False)
            except Exception as err:  # noqa: BLE001 - a broken YAML must not hide the others
                logging.getLogger(__name__).warning("skipping task YAML %s: %s", path, err)
                continue
            if isinstance(cfg.get("task"), str) and "group" not in cfg and "class" not in cfg:
                found[cfg["task"]] = path
    return found


def _absolute_data_files(data_files, base: Path):
    if isinstance(data_files, dict):
        return {k: _absolute_data_files(v, base) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_absolute_data_files(v, base) for v in data_files]
    p = Path(os.path.expanduser(str(data_files)))
    return str(p if p.is_absolute() else (base / p).resolve())


def task_config(yaml_path: str | Path) -> dict:
    """The YAML as the dict lm-eval builds a task from: includes merged, `!function`s imported,
    local data files made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path = Path(yaml_path).resolve()
    cfg = load_yaml(yaml_path, resolve_func=True)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    if cfg.get("dataset_path") in _LOCAL_BUILDERS and "data_files" in kwargs:
        kwargs["data_files"] = _absolute_data_files(kwargs["data_files"], yaml_path.parent)
        cfg["dataset_kwargs"] = kwargs
    return cfg


def task_specs(tasks: list[str], include_path=None) -> list[str | dict]:
    """What lm-eval's TaskManager.load gets: a config dict for local tasks, the name otherwise."""
    local = local_tasks(include_path)
    specs: list[str | dict] = []
    for name in tasks:
        if name.startswith(HUB_PREFIX):
            specs.append(name[len(HUB_PREFIX):])
        elif name in local:
            specs.append(task_config(local[name]))
        else:
            specs.append(name)
    return specs


# ---------------------------------------------------------------- results -> metrics


def flatten_results(results: dict, n_samples: dict | None = None,
                    tasks: list[str] | None = None) -> dict[str, float]:
    """lm-eval's per-task results -> flat `<metric>/<task>` floats, plus `acc/mean`.

    `acc,none` -> `acc/<task>`, `perplexity,none` -> `ppl/<task>`, a non-default filter f ->
    `<metric>_<f>/<task>`. For 0/1 metrics `<metric>_stderr/<task>` is sqrt(p(1-p)/(n-1)), the
    sample standard error lm-eval reports, computed here so no bootstrap pool is started.
    `acc/mean` averages `acc/<task>` over the requested tasks that have one.
    """
    out: dict[str, float] = {}
    for task, row in results.items():
        n = (n_samples or {}).get(task, {}).get("effective")
        for key, value in row.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            name = _RENAME.get(metric, metric) + ("" if filt == "none" else f"_{filt}")
            out[f"{name}/{task}"] = float(value)
            if metric in _BINARY and n and n > 1:
                p = float(value)
                out[f"{name}_stderr/{task}"] = math.sqrt(max(p * (1 - p), 0.0) / (n - 1))
    names = [t.removeprefix(HUB_PREFIX) for t in tasks] if tasks is not None else list(results)
    accs = [out[f"acc/{t}"] for t in names if f"acc/{t}" in out]
    if accs:
        out["acc/mean"] = sum(accs) / len(accs)
    return out


# ---------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _no_retie(model):
    # HFLM calls model.tie_weights(); the model handed in is final (possibly with a compressed
    # head), and re-tying would put a dense weight back on it.
    had = "tie_weights" in vars(model)
    old = vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        yield
    finally:
        if had:
            model.tie_weights = old
        else:
            del model.tie_weights


@contextlib.contextmanager
def _quiet(enabled: bool):
    log = logging.getLogger("lm_eval")
    level = log.level
    if enabled:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _ToHarnessLog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("lm_eval").handle(record)


@contextlib.contextmanager
def _datasets_into_harness_log():
    """Loading each task's data prints datasets' "Generating ... split" and "Map" bars and log
    lines: the harness's plumbing, not the run's progress. The bars are off, whatever
    `progress` says, and the lines go where lm-eval's own go (the run's lm_eval.log in a job)."""
    import datasets

    log = logging.getLogger("datasets")
    saved = log.handlers[:], log.propagate, datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    log.handlers, log.propagate = [_ToHarnessLog()], False
    try:
        yield
    finally:
        log.handlers, log.propagate, bars = saved
        if bars:
            datasets.enable_progress_bars()


def evaluate_tasks(model, tokenizer, tasks: list[str], *, batch_size: int = 8,
                   limit: float | None = None, include_path: str | None = None,
                   device: str | None = None, num_fewshot: int = 0, progress: bool = True,
                   max_length: int | None = None) -> dict[str, float]:
    """Run lm-eval tasks on `model` as it is and return flat metrics (see flatten_results).

    limit: first N documents per task (int) or a fraction (float < 1); None = all.
    device: where inputs go; default the model's own device (the model is never moved).
    max_length: context window for rolling loglikelihood; default from the model config.
    The tokenizer gets a pad token if it has none (lm-eval's rule), otherwise it is untouched.
    """
    if not tasks:
        return {}
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs = task_specs(list(tasks), include_path)
    by_name = [s for s in specs if isinstance(s, str)]
    # lm-eval's full registry takes ~12 s to index; build it only when a task needs it.
    manager = (TaskManager(include_path=include_path) if by_name
               else TaskManager(include_defaults=False))
    was_training = model.training
    with _quiet(not progress), _no_retie(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=max_length)
    if device is not None:
        lm._device = torch.device(device)
    if not progress:
        _silence_bars(lm)
    try:
        with _quiet(not progress), _datasets_into_harness_log(), torch.no_grad():
            out = simple_evaluate(
                model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit,
                task_manager=manager, log_samples=False,
                bootstrap_iters=0,  # stderr of 0/1 metrics is closed-form (flatten_results)
                # No global reseeding: zero-shot scoring is deterministic, and few-shot sampling
                # keeps lm-eval's own fewshot_random_seed.
                random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)
    names = [_spec_name(s) for s in specs]
    return flatten_results(out["results"], out.get("n-samples"), names)


def _silence_bars(lm) -> None:
    for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        setattr(lm, name, functools.partial(getattr(lm, name), disable_tqdm=True))
    # loglikelihood_rolling (wikitext) passes disable_tqdm=False to this one unconditionally.
    tokens = lm._loglikelihood_tokens

    def _loglikelihood_tokens(requests, disable_tqdm=False, **kw):
        return tokens(requests, disable_tqdm=True, **kw)

    lm._loglikelihood_tokens = _loglikelihood_tokens


def _spec_name(spec: str | dict) -> str:
    return spec["task"] if isinstance(spec, dict) else spec


# ---------------------------------------------------------------- cache-key parts


def task_files_hash(include_path: str | Path | list | None = None) -> str:
    """sha256 over the files (path and bytes) of the bundled tasks and of include_path."""
    h = hashlib.sha256()
    for root in _task_dirs(include_path):
        for p in sorted(root.rglob("*")):
            # Docs (.md) change no number; everything else (YAML, data, code) may.
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".md"):
                h.update(p.relative_to(root).as_posix().encode() + b"\0")
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "absent"
