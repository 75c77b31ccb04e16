"""Pretrain the tiny reference models from scratch: seeded, reproducible, one command.

    python -m ciuic_lab.tools.pretrain --arch deepseek-v3-tiny --corpus PAGES_DIR --out DIR \\
        --max-minutes 4 --device cuda
    # optional: tokenise once here, ship the 6 MB cache instead of the pages
    python -m ciuic_lab.tools.pretrain --arch deepseek-v3-tiny --corpus PAGES_DIR --out DIR \\
        --cache-only --save-cache corpus.pt      # then --corpus corpus.pt

The architectures are transformers' own classes built from config (`ARCHS`): DeepSeek-V3 (MLA
attention, a dense first layer, then MoE with shared + routed experts; arXiv:2412.19437) and
DeepSeek-LLM (the Llama layout; arXiv:2401.02954). Training text is the corpus rewritten into
WikiText style and laid out as the WikiText-2 evaluation stream (`wikistyle`), tokenised with the
bundled tokenizer and packed into windows. A few articles (never the bundled calibration ones) are
held out for validation; the checkpoint with the best validation loss is saved in bfloat16 with
the tokenizer, `training_log.json` and `loss_curve.png`.

Depends only on torch, transformers, tokenizers, tqdm and matplotlib, so it runs on a bare GPU
machine; it imports no ciuic_lab module that needs hydra, wandb or datasets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from ciuic_lab.data.calibration import CALIB_DIR
from ciuic_lab.data.layout import hf_stream
from ciuic_lab.data.wikitext import TEST_FILE
from ciuic_lab.models import TOKENIZER_DIR
from ciuic_lab.tools.wikistyle import read_corpus

CALIB_ARTICLES = CALIB_DIR / "articles.tsv"

# Widths are multiples of 64 so packing group sizes and N:M patterns divide every weight.
ARCHS = {
    "deepseek-v3-tiny": ("DeepseekV3Config", {
        "hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 128,
        "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 128, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
        "v_head_dim": 64, "first_k_dense_replace": 1, "n_shared_experts": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        # Top-2 of 8 experts as wide as the shared one: weigh routed and shared output alike.
        "routed_scaling_factor": 1.0, "norm_topk_prob": True, "num_mtp_layers": 0,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6}),
    "deepseek-llm-tiny": ("LlamaConfig", {
        "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 4, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False}),
}
# --tiny-test: the same layouts at toy width, for the test suite.
TINY_TEST = {
    "deepseek-v3-tiny": {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                         "num_hidden_layers": 2, "q_lora_rank": 32, "kv_lora_rank": 32,
                         "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16},
    "deepseek-llm-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
}


def build_config(arch: str, vocab: int, max_positions: int, tiny_test: bool = False,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
    import transformers

    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    cls_name, kw = ARCHS[arch]
    kw = dict(kw, **(TINY_TEST[arch] if tiny_test else {}))
    return getattr(transformers, cls_name)(
        vocab_size=vocab, max_position_embeddings=max_positions, bos_token_id=bos_id,
        eos_token_id=eos_id, pad_token_id=pad_id, **kw)


def build_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ----------------------------------------------------------------------------- data

def _tokenizer_sha(tokenizer_dir: Path) -> str:
    return hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()


def tokenize_corpus(corpus: Path, tokenizer_dir: Path) -> dict:
    """{"names", "ids", "tokenizer_sha256"}: one id tensor per article, in the evaluation layout.

    `corpus` is a directory of pages or a cache file written by --save-cache (checked against the
    tokenizer, since ids from another vocabulary would train silently on garbage).
    """
    sha = _tokenizer_sha(tokenizer_dir)
    if corpus.is_file():
        data = torch.load(corpus, weights_only=True)
        if data.get("tokenizer_sha256") != sha:
            raise SystemExit(f"--corpus {corpus}: cache was tokenised with another tokenizer")
        return data
    from tokenizers import Tokenizer

    pages = read_corpus(corpus)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    # Each article ends with the "\n\n" that joins rows across articles in the test stream.
    encs = tok.encode_batch([hf_stream(text) + "\n\n" for _, text in pages],
                            add_special_tokens=False)
    dtype = torch.int16 if tok.get_vocab_size() <= 2**15 else torch.int32
    return {"names": [n for n, _ in pages], "tokenizer_sha256": sha,
            "ids": [torch.tensor(e.ids, dtype=dtype) for e in encs]}


def calibration_names() -> set[str]:
    if not CALIB_ARTICLES.exists():
        return set()
    rows = CALIB_ARTICLES.read_text(encoding="utf-8").splitlines()[1:]
    return {r.split("\t")[0] for r in rows if r}


def split_articles(names: list[str], n_val: int, seed: int, exclude: set[str]) -> list[str]:
    """Held-out article names: `n_val` drawn by seed among those not in `exclude`.

    At least one article is always left for training.
    """
    candidates = sorted(n for n in names if n not in exclude)
    k = max(0, min(n_val, len(candidates), len(names) - 1))
    return sorted(random.Random(seed).sample(candidates, k))


def pack(ids: list[torch.Tensor], seqlen: int, offset: int = 0) -> torch.Tensor:
    """(n, seqlen) non-overlapping windows of the concatenated ids from `offset`, tail dropped."""
    stream = torch.cat([t.long() for t in ids])[offset:]
    n = stream.numel() // seqlen
    return stream[: n * seqlen].view(n, seqlen)


# ----------------------------------------------------------------------------- training maths

def lr_at(step: int, progress: float, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to min_ratio·peak at progress = 1.

    `progress` in [0, 1] is how far training is towards whichever limit (steps or wall clock)
    comes first, so a time-limited run still finishes its schedule.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def balance_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> torch.Tensor:
    """Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv:2412.19437 §2.1.2).

    Nudges each routed expert's selection bias by `rate` towards the mean load: overloaded
    experts down, underloaded up. The bias only steers top-k choice, never the mixing weights.
    """
    return bias + rate * torch.sign(counts.float().mean() - counts.float())


def decay_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices, not norms, biases or router weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "gate.weight" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- glue

class ExpertLoad:
    """Counts routed-expert selections per MoE gate in training (forward hooks) for balance_bias."""

    def __init__(self, model):
        self.gates = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.counts = [torch.zeros(g.e_score_correction_bias.numel()) for g in self.gates]
        self.seen = [c.clone() for c in self.counts]  # since the last imbalance() reading
        self._handles = [g.register_forward_hook(self._hook(i)) for i, g in enumerate(self.gates)]

    def _hook(self, i):
        def hook(module, args, out):
            if module.training:
                n = torch.bincount(out[2].reshape(-1), minlength=self.counts[i].numel()).float()
                self.counts[i] = self.counts[i].to(n.device) + n
        return hook

    @torch.no_grad()
    def update(self, rate: float) -> None:
        for i, g in enumerate(self.gates):
            c = self.counts[i]
            if c.sum() > 0:
                bias = g.e_score_correction_bias
                if rate > 0:
                    bias.copy_(balance_bias(bias, c.to(bias.device), rate))
                self.seen[i] = self.seen[i].to(c.device) + c
            self.counts[i] = torch.zeros_like(c)

    def imbalance(self) -> float | None:
        """Worst layer's max/mean expert load since the last call (1.0 = balanced)."""
        ratios = [float(c.max() / c.mean()) for c in self.seen if c.sum() > 0]
        self.seen = [torch.zeros_like(c) for c in self.seen]
        return max(ratios) if ratios else None

    def remove(self):
        for h in self._handles:
            h.remove()


def experts_candidates(device_type: str, requested: str) -> list[str]:
    if requested != "auto":
        return [requested]
    return ["grouped_mm", "eager"] if device_type == "cuda" else ["eager"]


def pick_experts_impl(model, device: torch.device, requested: str, autocast) -> str | None:
    """The first experts kernel that runs forward+backward here.

    CUDA tries 'grouped_mm' (one kernel for all experts) before 'eager'; on CPU the eager
    per-expert loop measured faster (923 vs 594 tokens/s, 1 thread) and is the default.
    """
    if not hasattr(model, "set_experts_implementation") or not any(
            hasattr(m, "e_score_correction_bias") for m in model.modules()):
        return None
    order = experts_candidates(device.type, requested)
    x = torch.randint(0, model.config.vocab_size, (2, 16), device=device)
    for impl in order:
        try:
            model.set_experts_implementation(impl)
            with autocast():
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if torch.isfinite(loss):
                return impl
            print(f"experts_implementation={impl} gives a non-finite loss here")
        except Exception as e:  # noqa: BLE001  (unsupported kernel here: try the next)
            print(f"experts_implementation={impl} unusable here ({type(e).__name__}: {e})")
        finally:
            model.zero_grad(set_to_none=True)
    raise SystemExit(f"no experts implementation of {order} works on {device}")


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, batch_size: int, device, autocast) -> float:
    """Mean next-token NLL over all predicted tokens of the windows (equal-length windows)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        x = windows[i: i + batch_size].to(device)
        with autocast():
            out = model(input_ids=x, labels=x)
        total += out.loss.float().item() * x.shape[0]
        n += x.shape[0]
    model.train()
    return total / max(n, 1)


def wikitext2_windows(tokenizer_dir: Path, seqlen: int, limit: int = -1) -> torch.Tensor:
    """WikiText-2 test windows by the evaluation protocol, from the bundled file.

    With a `limit`, only a prefix of the text (ample for that many windows) is tokenised; the
    windows are the same as the first `limit` of the full stream, bar a boundary token.
    """
    from tokenizers import Tokenizer

    test = TEST_FILE
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    text = hf_stream(test.read_text(encoding="utf-8"))
    if limit >= 0:
        text = text[: 16 * seqlen * (limit + 1)]  # ~4 characters per token: 4x margin
    ids = tok.encode(text, add_special_tokens=False).ids
    w = pack([torch.tensor(ids)], seqlen)
    return w if limit < 0 else w[:limit]


def save_bf16(model, out: Path, max_shard: str = "25MB") -> None:
    """bfloat16 safetensors; the router stays fp32 as transformers keeps it on load."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not any(k in name for k in keep):
            t.data = t.data.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard)


def plot_curve(history: list[dict], val: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    losses = [h["loss"] for h in history]
    k = max(1, len(losses) // 50)  # running mean so the trend shows through batch noise
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
              for i in range(len(losses))]
    ax.plot(steps, losses, alpha=0.25, color="C0")
    ax.plot(steps, smooth, color="C0", label="train")
    if val:
        ax.plot([v["step"] for v in val], [v["loss"] for v in val], "o-", color="C1",
                label="validation (held-out articles)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="pretrain a tiny DeepSeek reference model")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS))
    ap.add_argument("--corpus", required=True, type=Path,
                    help="directory of .md/.txt pages, or a cache file from --save-cache")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tokenizer", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop after this wall time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (capped at 10%% of --steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--bias-update", type=float, default=1e-3,
                    help="MoE load-balancing bias step per optimiser step (0 = off)")
    ap.add_argument("--val-articles", type=int, default=10)
    ap.add_argument("--val-windows", type=int, default=64, help="cap on validation windows")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--keep", choices=["best", "last"], default="best",
                    help="save the checkpoint with the best validation loss, or the last one")
    ap.add_argument("--wikitext-windows", type=int, default=-1,
                    help="WikiText-2 test windows for the final perplexity (-1 all, 0 skip)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--experts-impl", default="auto", choices=["auto", "grouped_mm", "eager"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-cache", type=Path, default=None,
                    help="also write the tokenised corpus here (reusable as --corpus)")
    ap.add_argument("--cache-only", action="store_true",
                    help="write --save-cache and exit (prepare a corpus for a GPU machine)")
    ap.add_argument("--tiny-test", action="store_true", help="toy widths, for tests")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.cache_only:
        if args.save_cache is None:
            ap.error("--cache-only needs --save-cache PATH")
    elif args.steps is None and args.max_minutes is None:
        ap.error("give --steps and/or --max-minutes")
    if args.seqlen < 2 or args.batch_size < 1:
        ap.error("--seqlen must be >= 2 and --batch-size >= 1")
    return args


def main(argv=None) -> dict:
    from contextlib import nullcontext

    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts autocast leaves (router)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                else nullcontext)
    random.seed(args.seed)

    # Data: articles -> held-out split -> packed windows.
    t_data = time.perf_counter()
    data = tokenize_corpus(args.corpus, args.tokenizer)
    if args.save_cache:
        args.save_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, args.save_cache)
        if args.cache_only:
            print(f"cache: {len(data['names'])} articles -> {args.save_cache}")
            return {"cache": str(args.save_cache), "articles": len(data["names"])}
    names, ids = data["names"], data["ids"]
    if len(names) < 2:
        raise SystemExit(f"--corpus {args.corpus}: need at least 2 articles (train + validation)")
    val_names = split_articles(names, args.val_articles, args.seed, calibration_names())
    if not val_names:
        raise SystemExit("no article is left for validation outside the calibration slice")
    val_set = set(val_names)
    train_ids = [t for n, t in zip(names, ids) if n not in val_set]
    val_windows = pack([t for n, t in zip(names, ids) if n in val_set], args.seqlen)
    val_windows = val_windows[: args.val_windows]
    n_train_tokens = sum(t.numel() for t in train_ids)
    if n_train_tokens < args.seqlen * 2 or val_windows.shape[0] == 0:
        raise SystemExit(f"corpus too small for --seqlen {args.seqlen}: {n_train_tokens} train "
                         f"tokens, {val_windows.shape[0]} validation windows")
    print(f"corpus: {len(names)} articles, {n_train_tokens:,} train tokens, "
          f"{val_windows.numel():,} validation tokens ({len(val_names)} articles); "
          f"{time.perf_counter() - t_data:.1f}s")

    # Model.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    config = build_config(args.arch, len(tok), max(512, args.seqlen), args.tiny_test,
                          tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model = build_model(config, args.seed).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params:,} parameters ({n_params * 2 / 2**20:.1f} MiB in bf16)")
    experts_impl = pick_experts_impl(model, device, args.experts_impl, autocast)
    if experts_impl:
        print(f"experts_implementation={experts_impl}")
    load = ExpertLoad(model)

    opt = torch.optim.AdamW(decay_groups(model, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    warmup = min(args.warmup, max(1, args.steps // 10)) if args.steps else args.warmup
    gen = torch.Generator().manual_seed(args.seed)
    max_s = args.max_minutes * 60 if args.max_minutes is not None else math.inf
    history, val_hist, best = [], [], {"loss": math.inf, "step": 0, "state": None}
    tokens, step, epoch, batches = 0, 0, 0, iter(())
    bar = tqdm(total=args.steps, disable=args.no_progress, dynamic_ncols=True,
               desc=f"pretrain {args.arch}")

    def evaluate():
        v = mean_loss(model, val_windows, args.batch_size, device, autocast)
        val_hist.append({"step": step, "tokens": tokens, "loss": v})
        if v < best["loss"]:
            best.update(loss=v, step=step, state={k: t.detach().to("cpu", copy=True)
                                                  for k, t in model.state_dict().items()})
        return v

    t0 = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - t0
        if (args.steps is not None and step >= args.steps) or elapsed >= max_s:
            break
        batch = next(batches, None)
        if batch is None:  # new epoch: fresh window offset and order, both from the seed
            offset = int(torch.randint(0, args.seqlen, (1,), generator=gen))
            windows = pack(train_ids, args.seqlen, offset)
            order = torch.randperm(windows.shape[0], generator=gen)
            batches = (windows[order[i: i + args.batch_size]]
                       for i in range(0, len(order) - args.batch_size + 1, args.batch_size))
            epoch += 1
            batch = next(batches, None)
            if batch is None:
                raise SystemExit(f"fewer than --batch-size {args.batch_size} training windows")
        progress = max(step / args.steps if args.steps else 0.0, elapsed / max_s)
        lr = lr_at(step, progress, args.lr, warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch.to(device, non_blocking=True)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        load.update(args.bias_update)
        step += 1
        tokens += x.numel()
        loss_v = loss.item()
        dt = time.perf_counter() - t0
        history.append({"step": step, "tokens": tokens, "loss": loss_v, "lr": lr,
                        "seconds": round(dt, 3)})
        post = {"loss": f"{loss_v:.3f}", "tok/s": f"{tokens / dt:,.0f}", "lr": f"{lr:.1e}"}
        if step % args.eval_every == 0:
            post["val"] = f"{evaluate():.3f}"
            imb = load.imbalance()
            val_hist[-1]["expert_imbalance"] = imb
            if imb is not None:
                post["moe max/mean"] = f"{imb:.2f}"
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t0
    if not val_hist or val_hist[-1]["step"] != step:
        evaluate()
    load.remove()
    last_val = val_hist[-1]["loss"]
    if args.keep == "best" and best["state"] is not None and best["step"] != step:
        model.load_state_dict(best["state"])
    saved_step = best["step"] if args.keep == "best" else step

    wt_ppl = None
    if args.wikitext_windows != 0:
        w = wikitext2_windows(args.tokenizer, args.seqlen, args.wikitext_windows)
        wt_ppl = math.exp(mean_loss(model, w, args.batch_size, device, autocast))
        print(f"WikiText-2 test perplexity (seqlen {args.seqlen}, {w.shape[0]} windows): "
              f"{wt_ppl:.2f}")

    # Save: weights (bf16), tokenizer, log, curve.
    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_bf16(model, args.out)
    for f in args.tokenizer.iterdir():
        if f.is_file():
            shutil.copy2(f, args.out / f.name)
    tail = history[-20:]
    log = {
        "arch": args.arch, "params": n_params, "steps": step, "epochs": epoch,
        "tokens_seen": tokens, "train_seconds": round(train_s, 2),
        "tokens_per_s": round(tokens / max(train_s, 1e-9), 1),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "experts_implementation": experts_impl,
        "final_train_loss": sum(h["loss"] for h in tail) / max(len(tail), 1),
        "final_val_loss": last_val, "best_val_loss": best["loss"], "best_step": best["step"],
        "saved": args.keep, "saved_step": saved_step, "wikitext2_ppl": wt_ppl,
        "wikitext2_seqlen": args.seqlen if wt_ppl is not None else None,
        "expert_imbalance_max_over_mean": next(
            (v["expert_imbalance"] for v in reversed(val_hist) if v.get("expert_imbalance")),
            load.imbalance()),
        "corpus_articles": len(names), "train_tokens": n_train_tokens,
        "val_articles": val_names, "val_tokens": int(val_windows.numel()),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "history": history, "val_history": val_hist,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    plot_curve(history, val_hist, args.out / "loss_curve.png",
               f"{args.arch}, {n_params / 1e6:.1f}M params, {tokens / 1e6:.1f}M tokens")
    print(f"saved {args.out} (step {saved_step}, val loss {best['loss'] if args.keep == 'best' else last_val:.3f}); "
          f"{step} steps, {tokens:,} tokens in {train_s:.0f}s = {log['tokens_per_s']:,.0f} tok/s")
    return log


if __name__ == "__main__":
    main()
