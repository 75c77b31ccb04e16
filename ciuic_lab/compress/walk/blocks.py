"""Where a block walk gets its blocks, its routed experts and keeps its activations.

Every walk (profile, compress, streamed evaluation) visits decoder blocks one at a time:

    inputs = capture(provider, windows)          # hidden states entering block 0, per batch
    for i in range(len(provider)):
        block = provider.load(i)                  # block i's weights on the working device
        ...                                       # hooks, compression, or just a forward
        inputs = run(block, inputs.at(i))         # its outputs feed block i+1
        provider.release(i, block)

Providers (`BlockProvider`), one chosen per run (ciuic_lab/hold.py) so no walk asks which:
    Resident   the model is in memory on the device: a block is already where it computes.
    Offloaded  the model is in host memory: a block visits the device for its turn and goes back.
    Streamed   only a skeleton exists (meta tensors); each block's tensors are read from the
               safetensors shards when the walk reaches it (FP8 dequantised on the device) and
               dropped after. Embeddings, rotary tables, final norm and head load once.
    Stored     a compressed checkpoint (compress/store/checkpoint.py), one packed block at a time.

Routed experts never need their whole layer at once: a fused experts module is replaced, during
a block's forward, by a recorder that keeps the MoE layer's inputs and routing (`MoECall`s); the
experts are then computed or compressed a chunk of `expert_chunk` experts at a time from
`ExpertWeights`, which reads them from memory or from disk. A dense forward that needs the
experts' output replays it from the chunked computation (record → compute → replay), so the
whole of a DeepSeek-V3 MoE layer (256 experts of 7168×2048, 22 GB in bf16) is never resident.

Memory, per block: its non-expert weights, one chunk of experts, the calibration activations
(`Activations`: on the device when they fit, else pinned host memory or a temporary file), and
the MoE layer's recorded inputs (as large as the activations).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ciuic_lab.compress.stats import stats_of
from ciuic_lab.models.adapters import DecoderAdapter, adapter_for, set_submodule, swapped


class _StopForward(Exception):
    pass


def return_freed_memory(fix_threshold: bool = False) -> None:
    """Give memory freed by a finished block back to the OS (glibc; a no-op elsewhere).

    glibc raises its mmap threshold to the size of the largest buffer freed so far, so after the
    first block every block-sized tensor is carved from the heap, and the heap's free holes are not
    returned: a streamed walk's resident memory then creeps up by about one block per block
    (measured: +16 MB per 13 MB block). Fixing the threshold (`fix_threshold`, once per process)
    keeps large buffers in their own mappings, released on free; `malloc_trim` returns what the
    heap still holds. With both, host memory stays flat over depth (tests/test_stream.py).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if fix_threshold:
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: stop its dynamic growth
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def fits(nbytes: int, device: torch.device, headroom: float) -> bool:
    """The one memory rule: whether `nbytes`, `headroom` times over, fit in what `device` has free
    now (a GPU's free memory; else the host's available memory). Callers pick the headroom for
    what grows beside the bytes (activations, a forward's temporaries)."""
    if torch.device(device).type == "cuda":
        return nbytes * headroom < torch.cuda.mem_get_info(device)[0]
    import psutil

    return nbytes * headroom < psutil.virtual_memory().available


# ---------------------------------------------------------------- activations


class Activations:
    """Per-batch hidden states between two blocks, stored where they fit.

    where: "device" (fastest), "host" (pinned CPU memory when the device is a GPU), "disk" (a
    temporary file per batch), or "auto": the device if the whole set takes under half of the
    device's free memory, else the host if it takes under half of the host's available memory,
    else disk. CPU runs keep them in memory. allow_host=False: "auto" never picks host memory.
    """

    def __init__(self, device: torch.device, where: str = "auto", allow_host: bool = True):
        if where not in ("auto", "device", "host", "disk"):
            raise ValueError(f"activations must be auto, device, host or disk, got {where!r}")
        self.device, self.where, self.allow_host = torch.device(device), where, allow_host
        self._items: list = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def place(self, total_bytes: int) -> str:
        """Decide the storage for a set of `total_bytes` (called once, before filling). Without
        allow_host, "auto" never picks host memory (a CPU run's device is the host): for sets
        that grow with depth, which host memory, bounded by one block, must not hold."""
        if self.where != "auto":
            return self.where
        if self.device.type == "cpu":
            return "device" if self.allow_host else "disk"
        if fits(total_bytes, self.device, 2):  # half the free memory: the block computes there too
            return "device"
        host_ok = self.allow_host and fits(total_bytes, torch.device("cpu"), 2)
        return "host" if host_ok else "disk"

    def fill(self, tensors: list[torch.Tensor]) -> Activations:
        where = self.place(sum(t.numel() * t.element_size() for t in tensors))
        self.chosen = where
        self._items = [self._store(i, t, where) for i, t in enumerate(tensors)]
        return self

    def _store(self, i: int, t: torch.Tensor, where: str):
        if where == "device":
            return t.to(self.device)
        if where == "host":
            host = t.detach().to("cpu")
            return host.pin_memory() if self.device.type == "cuda" else host
        from safetensors.torch import save_file

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ciuic_acts_")
        path = Path(self._tmp.name) / f"{i}.safetensors"
        save_file({"h": t.detach().contiguous().cpu()}, str(path))
        return path

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        if isinstance(item, Path):
            from safetensors.torch import load_file

            return load_file(str(item))["h"].to(self.device)
        return item.to(self.device, non_blocking=True)

    def replace(self, tensors: list[torch.Tensor]) -> None:
        where = self.chosen
        self._items = [self._store(i, t, where) for i, t in enumerate(tensors)]

    def nbytes(self) -> int:
        return sum((self[i].numel() * self[i].element_size()) for i in range(len(self)))


@dataclass
class BlockInputs:
    """What enters a block, per batch: hidden states (stored by `Activations`) and the keyword
    arguments the model passes the block (position embeddings, masks), kept as they are.

    `kwargs` are block 0's. Where the model passes other blocks something else (Gemma 3: its
    global layers get another mask and other rotary tables than its sliding-window ones),
    `per_block[i]` holds block i's, and `at(i)` gives the inputs of block i."""

    hidden: Activations
    kwargs: list[dict]
    per_block: list[list[dict]] | None = None  # [block][batch]; None: every block gets `kwargs`

    def at(self, i: int, hidden: Activations | None = None) -> BlockInputs:
        """Block i's inputs: its own keyword arguments, with `hidden` (default: these states)."""
        kw = self.kwargs if self.per_block is None else self.per_block[i]
        return BlockInputs(self.hidden if hidden is None else hidden, kw, self.per_block)

    def __len__(self) -> int:
        return len(self.kwargs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        for i, kw in enumerate(self.kwargs):
            yield self.hidden[i], kw


# ---------------------------------------------------------------- routed experts


@dataclass
class MoECall:
    hidden: torch.Tensor  # (tokens, H) entering the experts
    index: torch.Tensor  # (tokens, k) chosen experts
    weights: torch.Tensor  # (tokens, k) their routing weights


class _Recorder(nn.Module):
    """Stands in for a fused experts module during a block forward: records each call; returns
    zeros (recording) or the output computed for that call (replaying)."""

    def __init__(self, replay: list[torch.Tensor] | None = None):
        super().__init__()
        self.calls: list[MoECall] = []
        self.replay = replay

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if self.replay is not None:
            out = self.replay[len(self.calls)]
            self.calls.append(None)
            return out
        self.calls.append(MoECall(hidden_states.detach(), top_k_index, top_k_weights))
        return torch.zeros_like(hidden_states)


@dataclass
class ExpertWeights:
    """The weights of one fused experts module, fetched a chunk of experts at a time."""

    n: int
    fetch: object  # fetch(ids) -> (gate_up (c, 2I, H), down (c, H, I)) on the working device
    act_fn: object

    def chunks(self, size: int, only: list[int] | None = None
               ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Chunks of `size` experts in ascending order; `only`: just these experts (a rank's
        share in a distributed walk: the others are never read)."""
        every = list(range(self.n)) if only is None else sorted(only)
        for start in range(0, len(every), size):
            ids = every[start:start + size]
            gate_up, down = self.fetch(ids)
            yield ids, gate_up, down
            del gate_up, down


def add_routed(adapter: DecoderAdapter, outs: list[torch.Tensor], calls: list[MoECall], e: int,
               gate_up: torch.Tensor, down: torch.Tensor, act_fn) -> None:
    """Add expert e's routing-weighted output to each recorded call's routed output."""
    for out, c in zip(outs, calls):
        tok, kpos = torch.where(c.index == e)
        if tok.numel():
            y = adapter.expert_mlp(c.hidden[tok], gate_up, down, act_fn)
            out.index_add_(0, tok, (y * c.weights[tok, kpos, None]).to(out.dtype))


def routed_outputs(adapter: DecoderAdapter, calls: list[MoECall], weights: ExpertWeights,
                   chunk: int) -> list[torch.Tensor]:
    """Each recorded call's routed-experts output, computed a chunk of experts at a time.

    Experts are visited in ascending order and each adds its weighted output to its tokens, as
    transformers' eager experts loop does (and CompressedExperts)."""
    outs = [torch.zeros_like(c.hidden) for c in calls]
    for ids, gate_up, down in weights.chunks(chunk):
        for j, e in enumerate(ids):
            add_routed(adapter, outs, calls, e, gate_up[j], down[j], weights.act_fn)
    return outs


# ---------------------------------------------------------------- providers


def in_memory_experts(module: nn.Module, device: torch.device,
                      adapter: DecoderAdapter) -> ExpertWeights:
    """Chunks of a fused experts module whose weights are in memory (moved to `device`)."""
    gate_up, down = (getattr(module, p) for p in adapter.expert_projs)

    def fetch(ids):
        return gate_up[ids].to(device), down[ids].to(device)

    return ExpertWeights(gate_up.shape[0], fetch, module.act_fn)


class BlockProvider(Protocol):
    """What every walk (profile, Fisher, compress, streamed evaluation, tuning) reads a model
    through, block by block, whatever holds it. A walk holds at most one block, one chunk of its
    routed experts and the activations: never the whole model, never every block's statistics
    (DeepSeek-V3: 61 blocks × 256 experts).

    A provider of a compressed model that can be edited (Resident and Offloaded in place,
    store.checkpoint.Stored by writing a new checkpoint) also has `rewrite(edit_block,
    edit_post)`: how block-wise distillation (tune/e2e_walk.py) stores what it trained."""

    model: nn.Module  # the model, or a skeleton whose blocks are meta until loaded
    device: torch.device  # where a loaded block computes
    adapter: DecoderAdapter

    def __len__(self) -> int: ...

    def load(self, i: int) -> nn.Module:
        """Block i with its weights on `device` (routed experts may stay behind: `experts`)."""

    def release(self, i: int, block: nn.Module) -> None:
        """Block i is done with (dense, or compressed in place): back where it lives, or gone."""

    def experts(self, i: int, owner: str, module: nn.Module) -> ExpertWeights:
        """Block i's fused experts module `owner`, a chunk of experts at a time."""

    def pre_on_device(self) -> AbstractContextManager:
        """Context: the modules before block 0 (embeddings, rotary tables) on `device`."""

    def post(self) -> list[nn.Module]:
        """The modules after the last block (final norm, head), in order, on `device`."""


@dataclass
class Resident:
    """The whole model in memory on `home`; each block visits `device` for its turn (a no-op
    when the model lives there)."""

    model: nn.Module
    device: torch.device
    adapter: DecoderAdapter = field(init=False)

    def __post_init__(self):
        self.adapter = adapter_for(self.model)
        self.home = next(self.model.parameters()).device

    def __len__(self) -> int:
        return len(self.adapter.blocks(self.model))

    def load(self, i: int) -> nn.Module:
        return self.adapter.blocks(self.model)[i].to(self.device)

    def release(self, i: int, block: nn.Module) -> None:
        block.to(self.home)

    def rewrite(self, edit_block, edit_post) -> None:
        """Edit the model in place: `edit_block(i, block)` with each block on the device in
        turn, then `edit_post(post modules)`."""
        for i in range(len(self)):
            block = self.load(i)
            edit_block(i, block)
            self.release(i, block)
        edit_post(self.post())

    def experts(self, i: int, owner: str, module: nn.Module) -> ExpertWeights:
        return in_memory_experts(module, self.device, self.adapter)

    def pre_on_device(self):
        """Context: the modules before block 0 on the working device for a capture."""
        return _Moved([m for _, m in self.adapter.pre_blocks(self.model)], self.device, self.home)

    def post(self) -> list[nn.Module]:
        return [m for _, m in self.adapter.post_blocks(self.model)]


class Offloaded(Resident):
    """The whole model in host memory, one block at a time on the device (`compress.offload`): the
    device holds one block and the activations, the host the model."""


class _Moved:
    def __init__(self, mods, device, home):
        self.mods, self.device, self.home = mods, device, home

    def __enter__(self):
        for m in self.mods:
            m.to(self.device)

    def __exit__(self, *exc):
        for m in self.mods:
            m.to(self.home)


class Streamed:
    """A model that is never whole in memory: a meta skeleton, blocks read from `source`.

    Each tensor takes the dtype the skeleton gives it (the run's dtype). Routed experts stay on
    the meta device inside their block; `experts()` reads them from the checkpoint a chunk at a
    time (per-expert tensors fused as the module expects).

    `transform` (e.g. `rotate.streamed.StreamedRotation`) edits weights as they arrive: `ends(model)` once
    the embeddings, final norm and head are loaded, `block(i, block)` at every load of block i,
    `experts(i, gate_up, down)` on every chunk of routed experts read.
    """

    def __init__(self, skeleton: nn.Module, source, device: torch.device, transform=None):
        return_freed_memory(fix_threshold=True)
        self.model, self.source, self.transform = skeleton, source, None
        self.device = torch.device(device)
        self.adapter = adapter_for(skeleton)
        self.tied = bool(getattr(skeleton.config, "tie_word_embeddings", False))
        head = self.adapter.head(skeleton)
        for name, mod in [*self.adapter.pre_blocks(skeleton), *self.adapter.post_blocks(skeleton)]:
            if not (self.tied and mod is head):  # a tied head is the embeddings' weight
                self._materialize(mod, name, skip_experts=False)
        if self.tied:
            head.weight = self.adapter.embeddings(skeleton).weight
        if transform is not None:
            self.transform_with(transform)

    def __len__(self) -> int:
        return len(self.adapter.blocks(self.model))

    def transform_with(self, transform) -> None:
        """Edit weights with `transform` from now on (the dense baseline is walked before: it is
        measured on the model as published)."""
        self.transform = transform
        transform.ends(self.model)

    def _materialize(self, module: nn.Module, prefix: str, skip_experts: bool) -> None:
        """Replace the module's meta tensors by the checkpoint's (routed experts excepted when
        `skip_experts`), each in the dtype the skeleton gave it."""
        experts = [n for n, m in module.named_modules() if self.adapter.is_fused_experts(m)]
        keys = self.source.names(f"{prefix}.")
        if skip_experts:
            keys = [k for k in keys if not any(k.startswith(f"{prefix}.{o}.") for o in experts)]
        stored = self.adapter.checkpoint_tensors(self.source.tensors(f"{prefix}.", self.device,
                                                                     names=keys))
        for name, t in [*module.named_parameters(), *_persistent_buffers(module)]:
            if skip_experts and name.rpartition(".")[0] in experts:
                continue
            if name not in stored:
                raise KeyError(f"{self.source.dir}: the checkpoint has no tensor {prefix}.{name}")
            _set_tensor(module, name, stored[name].to(t.dtype))
        rebuild_non_persistent(module, self.device, self.adapter)

    def load(self, i: int) -> nn.Module:
        block = self.adapter.blocks(self.model)[i]
        self._materialize(block, self.adapter.block_name(i), skip_experts=True)
        if self.transform is not None:
            self.transform.block(i, block)
        return block

    def release(self, i: int, block: nn.Module) -> None:
        self.adapter.blocks(self.model)[i] = block.to("meta")
        return_freed_memory()

    def experts(self, i: int, owner: str, module: nn.Module) -> ExpertWeights:
        block_prefix = f"{self.adapter.block_name(i)}."
        projs = gu, dn = self.adapter.expert_projs  # fused (E, 2I, H) and (E, H, I)
        dtype = getattr(module, gu).dtype
        fused = f"{block_prefix}{owner}.{gu}" in self.source.weight_map

        def fetch(ids):
            gate_up, down = read(ids)
            if self.transform is not None:
                self.transform.experts(i, gate_up, down)
            return gate_up, down

        def read(ids):
            if fused:  # a checkpoint that stores them fused: read the tensors, keep the chunk
                t = self.source.tensors(block_prefix, self.device,
                                        names=[f"{block_prefix}{owner}.{p}" for p in projs])
                return t[gu][ids].to(dtype), t[dn][ids].to(dtype)
            # Per expert (official layout): each expert's stored tensors (one read) are copied
            # into its rows of the chunk's fused tensors, so the host holds the chunk in the
            # run's dtype plus one expert as stored, never the chunk twice (stacking would).
            out = {p: torch.empty((len(ids), *getattr(module, p).shape[1:]), dtype=dtype,
                                  device=self.device) for p in projs}
            rows = out[gu].shape[1]
            for j, e in enumerate(ids):
                parts = self.adapter.expert_parts(owner, e, rows)
                t = self.source.tensors(block_prefix, self.device,
                                        names=[f"{block_prefix}{stored}.weight"
                                               for stored, _, _ in parts])
                for stored, proj, sl in parts:
                    out[proj][j][sl].copy_(t.pop(f"{stored}.weight"))
                del t
            return out[gu], out[dn]

        return ExpertWeights(getattr(module, gu).shape[0], fetch, module.act_fn)

    def pre_on_device(self):
        return nullcontext()

    def post(self) -> list[nn.Module]:
        return [m for _, m in self.adapter.post_blocks(self.model)]


def _persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for n, b in module.named_buffers()
            if n.rpartition(".")[2] not in _owner(module, n)._non_persistent_buffers_set]


def _owner(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name.rpartition(".")[0]) if "." in name else root


def _set_tensor(root: nn.Module, name: str, t: torch.Tensor) -> None:
    owner, leaf = _owner(root, name), name.rpartition(".")[2]
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        owner._buffers[leaf] = t


def rebuild_non_persistent(module: nn.Module, device: torch.device,
                           adapter: DecoderAdapter | None = None) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild the
    modules that own them from their config, on the device; a module without a config only if
    the adapter knows how (Gemma 3's embedding scale)."""
    for name, mod in list(module.named_modules()):
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            config = getattr(mod, "config", None)
            if config is None and adapter is not None and adapter.rebuild_buffers(mod, device):
                continue
            if config is None:
                raise RuntimeError(f"{name or type(mod).__name__}: a buffer is not in the "
                                   "checkpoint and the module cannot be rebuilt from a config")
            with torch.device(device):
                fresh = type(mod)(config)
            if name:
                set_submodule(module, name, fresh)
            else:
                for k, b in fresh._buffers.items():
                    mod._buffers[k] = b


# ---------------------------------------------------------------- walking


class _Grab(nn.Module):
    """Stands in for a block during `capture`: keeps what the model passes it and hands the hidden
    states on unchanged; the last one stops the forward."""

    def __init__(self, hidden: list | None, kwargs: list, last: bool):
        super().__init__()
        self.hidden, self.kwargs, self.last = hidden, kwargs, last

    def forward(self, *args, **kw):
        h = args[0] if args else kw.pop("hidden_states")
        if self.hidden is not None:
            self.hidden.append(h)
        self.kwargs.append({k: v for k, v in kw.items()
                            if k not in ("cache", "past_key_values", "past_key_value", "use_cache")})
        if self.last:
            raise _StopForward
        return h


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] for k in a)


@torch.no_grad()
def capture(provider, windows: torch.Tensor, batch_size: int, where: str = "auto") -> BlockInputs:
    """Hidden states entering block 0 and the keyword arguments the model passes each block, one
    entry per batch of windows.

    The model's own forward computes them (embeddings, rotary tables, masks) with every block
    replaced by a `_Grab`, so nothing of the blocks runs (or needs to be in memory). Every block is
    asked, not only block 0, because a model may feed its blocks differently (Gemma 3: sliding-
    window and global layers). When all get the same objects, `per_block` stays None."""
    model, ad = provider.model, provider.adapter
    blocks = ad.blocks(model)
    n = len(blocks)
    hidden: list = []
    seen: list[list[dict]] = [[] for _ in range(n)]
    originals = list(blocks)
    for i in range(n):
        blocks[i] = _Grab(hidden if i == 0 else None, seen[i], last=i == n - 1)
    try:
        with provider.pre_on_device():
            for start in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[start:start + batch_size].to(provider.device),
                          use_cache=False)
                except _StopForward:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    if any(len(s) != len(hidden) for s in seen):
        raise RuntimeError(f"capture: the model called {[len(s) for s in seen]} times its blocks "
                           f"for {len(hidden)} batches; expected each block once per batch")
    same = all(_same(a, b) for s in seen[1:] for a, b in zip(s, seen[0]))
    return BlockInputs(Activations(provider.device, where).fill(hidden), seen[0],
                       None if same else seen)


def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    outs = []
    for hidden, kw in inputs:
        out = block(hidden, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def experts_modules(adapter: DecoderAdapter, block: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in block.named_modules() if adapter.is_fused_experts(m)]


class recording:
    """Context: the block's fused experts modules replaced by recorders (zeros out), restored
    after. `.calls[owner]` holds each experts module's recorded calls."""

    def __init__(self, block: nn.Module, adapter: DecoderAdapter,
                 replay: dict[str, list[torch.Tensor]] | None = None):
        self.block, self.adapter, self.replay = block, adapter, replay or {}
        self.originals = experts_modules(adapter, block)
        self.recorders: dict[str, _Recorder] = {}

    def __enter__(self) -> recording:
        self.recorders = {name: _Recorder(self.replay.get(name)) for name, _ in self.originals}
        self._swap = swapped(self.block, self.recorders)
        self._swap.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._swap.__exit__(*exc)

    @property
    def calls(self) -> dict[str, list[MoECall]]:
        return {n: r.calls for n, r in self.recorders.items()}


@torch.no_grad()
def dense_forward(block: nn.Module, i: int, provider, inputs: BlockInputs,
                  expert_chunk: int) -> list[torch.Tensor]:
    """The block's outputs with its own (uncompressed) weights. A MoE block runs record →
    chunked experts → replay, so its routed experts are never all resident."""
    ad = provider.adapter
    owners = experts_modules(ad, block)
    if not owners:
        return run_block(block, inputs)
    with recording(block, ad) as rec:
        run_block(block, inputs)
    replay = {name: routed_outputs(ad, rec.calls[name], provider.experts(i, name, mod),
                                   expert_chunk) for name, mod in owners}
    with recording(block, ad, replay):
        return run_block(block, inputs)


def expert_tokens(calls: list[MoECall], e: int, everyone: torch.Tensor,
                   min_tokens: int) -> tuple[torch.Tensor, int, bool]:
    """(calibration inputs, own token count, fallback) of routed expert e: the tokens its router
    sent it over the recorded calls, or every token that entered the layer (`everyone`) when
    it got fewer than `min_tokens` (its statistics would be too thin to trust)."""
    x = torch.cat([c.hidden[(c.index == e).any(-1)] for c in calls])
    fallback = x.shape[0] < min_tokens
    return (everyone if fallback else x), x.shape[0], fallback


def keep_expert_stats(keep, adapter: DecoderAdapter, owner: str, e: int, calls: list[MoECall],
                      everyone: torch.Tensor, min_tokens: int, gate_up: torch.Tensor,
                      down: torch.Tensor, act_fn, hessian: bool) -> None:
    """Hand routed expert e's two projections and their input statistics to `keep` (a
    profile walk's summariser): its routed tokens for gate_up, their intermediate for down."""
    gu_name, down_name = adapter.expert_projs
    x, _, _ = expert_tokens(calls, e, everyone, min_tokens)
    keep(f"{owner}.{e}.{gu_name}", gate_up, stats_of(x, hessian))
    inter = adapter.expert_intermediate(x, gate_up, act_fn)
    keep(f"{owner}.{e}.{down_name}", down, stats_of(inter, hessian))
