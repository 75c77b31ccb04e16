"""Several processes, one compression: the lab's only torch.distributed code.

`torchrun --nproc-per-node N -m ciuic_lab.run ...` starts N copies of the run; each finds its
place in the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
and joins one process group through `init_process_group(init_method="env://")` (PyTorch docs,
"Distributed communication package - torch.distributed", Environment variable initialization;
"torchrun (Elastic Launch)"). Backends are PyTorch's own: NCCL on CUDA, gloo on CPU. A SLURM job
with several tasks (hydra/launcher=slurm, tasks_per_node) gets the same variables from
submitit's `TorchDistributedEnvironment`.

What lives here, and nothing else: the world (rank, size), which calibration batches are whose,
the cost-balanced split of work units, and the collectives the block walk and the evaluation
use (tensors and small objects shared from one rank, floats summed in a fixed order, packed
layers gathered from the rank that built them, a barrier). The algorithms stay pure: they are
handed their share and the shared results.

Exactness: a float sum depends on its order. Every sum that crosses ranks is therefore made in
the order one process makes it (by global batch index), never by all_reduce's tree, so N
processes compute the same bits as one (tests/test_dist.py compares checkpoints by sha256).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch

from ciuic_lab.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    # where collectives move tensors (NCCL: this rank's GPU; gloo: the CPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def on(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()
_world = SINGLE


def world() -> World:
    """This process's world: SINGLE unless `init` joined a process group."""
    return _world


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def wanted(setting) -> bool:
    """Whether `compress.distributed` (auto | true | false) asks for a process group here.
    auto: when a launcher started several processes (WORLD_SIZE > 1); false: never (each
    process runs alone, as without torchrun); true: required (fails without a launcher)."""
    if setting not in ("auto", True, False):
        raise ConfigError(f"compress.distributed: must be auto, true or false, got {setting!r}")
    _slurm_env()
    size = env_world_size()
    if setting is True and size < 2:
        raise ConfigError("compress.distributed=true: this process was not started by a "
                          "launcher with several processes (WORLD_SIZE is "
                          f"{os.environ.get('WORLD_SIZE', 'unset')}); use torchrun "
                          "--nproc-per-node N -m ciuic_lab.run ..., or distributed=auto")
    return setting is not False and size > 1


def planned(setting) -> int:
    """The rank this process will have once `init` runs, or None when it will run alone; read
    from the launcher's environment, so it is known before any config check (never raises)."""
    _slurm_env()
    if setting is False or str(setting).lower() == "false" or env_world_size() < 2:
        return None
    return int(os.environ.get("RANK", "0") or 0)


def _slurm_env() -> None:
    """A SLURM job of several tasks (submitit) that no torchrun started: export the variables
    `env://` reads from SLURM's own (submitit.helpers.TorchDistributedEnvironment)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1") or 1) < 2:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(setting, device: torch.device) -> World:
    """Join the process group if `setting` asks for one; the world either way. Idempotent.

    `device` is the run's device: CUDA means NCCL and this rank's GPU (LOCAL_RANK) becomes the
    current one, anything else gloo. The timeout bounds a collective that a lost rank never
    joins (CIUIC_DIST_TIMEOUT_MIN, default 120: rank 0 alone runs lm-eval and the serving
    measurements while the others wait)."""
    global _world
    if _world.on or not wanted(setting):
        return _world
    import torch.distributed as td

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not td.is_initialized():
        minutes = float(os.environ.get("CIUIC_DIST_TIMEOUT_MIN", "120"))
        td.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                              timeout=datetime.timedelta(minutes=minutes))
    comm = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    _world = World(td.get_rank(), td.get_world_size(), comm)
    return _world


def local_device(device: torch.device) -> torch.device:
    """The run's device for this rank: `cuda` (no index) becomes this rank's GPU."""
    device = torch.device(device)
    if _world.on and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shutdown() -> None:
    global _world
    if _world.on:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
    _world = SINGLE


# ---------------------------------------------------------------- data-parallel shares


def batches(n_windows: int, batch_size: int, w: World | None = None) -> list[int]:
    """The global batch indices this rank owns: batch b goes to rank b mod N (round-robin).

    Round-robin rather than contiguous ranges so the walk can exchange statistics round by
    round (round k: every rank's k-th batch, in rank order = global order) holding one batch's
    worth at a time."""
    w = w or _world
    n = -(-n_windows // batch_size)
    return list(range(w.rank, n, w.size))


def my_windows(windows: torch.Tensor, batch_size: int, w: World | None = None) -> torch.Tensor:
    """This rank's windows, whose batches of `batch_size` are exactly its global batches (only
    the last global batch can be short, and it is the last of its rank's)."""
    own = batches(windows.shape[0], batch_size, w)
    if not own:
        return windows[:0]
    return torch.cat([windows[b * batch_size:(b + 1) * batch_size] for b in own])


# ---------------------------------------------------------------- work-parallel shares


def assign(costs: list[float], size: int | None = None,
           loads: list[float] | None = None) -> tuple[list[int], list[float]]:
    """(owner rank of each unit, the ranks' loads after): longest processing time first
    (Graham's LPT rule): units by decreasing cost, each to the least loaded rank (ties: lowest
    rank, then lowest unit index), starting from `loads`. Deterministic: every rank computes
    the same split from the same costs, so no one needs to be told."""
    size = size or _world.size
    loads = list(loads) if loads is not None else [0.0] * size
    owner = [0] * len(costs)
    for u in sorted(range(len(costs)), key=lambda u: (-costs[u], u)):
        r = min(range(size), key=lambda r: (loads[r], r))
        owner[u] = r
        loads[r] += costs[u]
    return owner, loads


def weight_cost(out_features: int, in_features: int, tokens: int) -> float:
    """What compressing one (out, in) weight on `tokens` calibration tokens costs, roughly:
    its Hessian (tokens·in²), its factorisation (in³) and the column sweep over its rows
    (out·in², GPTQ/SparseGPT). A routed expert's cost grows with the tokens routed to it."""
    return float(in_features) ** 2 * (tokens + in_features + out_features)


# ---------------------------------------------------------------- collectives


def share(obj, tensors: dict[str, torch.Tensor] | None, src: int) -> tuple[object, dict]:
    """(obj, tensors) of rank `src`, on every rank: the small picklable `obj` and the tensors'
    names, shapes and dtypes by `broadcast_object_list`, then each tensor by `broadcast` (on
    the communication device: NCCL moves CUDA tensors, gloo CPU ones). Received tensors stay
    there; the caller moves them where it computes. Bits are copied, never recomputed."""
    import torch.distributed as td

    w = _world
    if w.rank == src:
        tensors = {k: v.detach().contiguous() for k, v in (tensors or {}).items()}
        meta = [(obj, [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])]
    else:
        meta = [None]
    td.broadcast_object_list(meta, src=src, device=w.device if w.device.type == "cuda" else None)
    obj, layout = meta[0]
    out = {}
    for name, shape, dtype in layout:
        if w.rank == src:
            t = tensors[name]
            t = t if t.device == w.device else t.to(w.device)
        else:
            t = torch.empty(shape, dtype=dtype, device=w.device)
        if t.numel():
            td.broadcast(t, src=src)
        out[name] = t if w.rank != src else tensors[name]
    return obj, out


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`all_gather_object`)."""
    import torch.distributed as td

    out = [None] * _world.size
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank."""
    import torch.distributed as td

    box = [obj if _world.rank == src else None]
    td.broadcast_object_list(box, src=src,
                             device=_world.device if _world.device.type == "cuda" else None)
    return box[0]


def sum_in_order(parts: list[tuple[int, float, int]]) -> tuple[float, int]:
    """(Σ value, Σ count) over every rank's (global index, value, count) parts, added in global
    index order from 0.0, exactly as one process adds them batch by batch (all_reduce would
    add in its own tree order, which changes the last bits)."""
    everyone = sorted(p for ps in gather_objects(list(parts)) for p in ps)
    total, count = 0.0, 0
    for _, value, n in everyone:
        total += value
        count += n
    return total, count


def barrier() -> None:
    if _world.on:
        import torch.distributed as td

        td.barrier()
