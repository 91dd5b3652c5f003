"""Align a language model with NCA, InfoNCA, DPO or SFT: one flat script from a laptop CPU to a 7B on GPUs.

    python train.py                                              # the toy pipeline demo (toy/pipeline.py)
    python train.py --data uf.jsonl --init tiny --loss nca       # a tiny random model, CPU
    python train.py --data uf.jsonl --init ~/mistral-7b --lora-rank 16 --loss nca --device cuda
    torchrun --nproc_per_node 8 train.py --data uf.jsonl --init ~/mistral-7b --loss nca   # FSDP2, full FT
    python train.py --plot out                                   # redraw out/curves.png from out/metrics.jsonl

Per step: B x K sequences (B prompts, K responses each) go through the policy in ONE forward pass;
nca.sequence_logps turns the final hidden states into log pi_theta(y|x) without building the
[B*K, T, V] logits; the reference log mu(y|x) comes from a cache computed once before training (full
fine-tuning), from the same weights with the LoRA adapters switched off, or from a frozen copy (--ref copy).
The losses are nca.py's (METHOD.md). Writes OUT/metrics.jsonl, OUT/curves.png, OUT/ckpt/state.pt
(atomic, resumable) and OUT/final/ (Hugging Face layout, LoRA merged, tokenizer recorded in config.json).
"""
import argparse
import copy
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import data
import lora
import model as model_lib
import nca

# ----------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the bad flag, not argparse's usage block (issue 7, "Bad input")
        raise ValueError(f"{message} (see python train.py --help)")


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="training data (.jsonl): reward {prompt, responses, rewards}, ultrafeedback, preference "
                     "{prompt, chosen, rejected} or sft {prompt, response}; see data.py")
    a("--eval-data", help="held-out data; default: 1 example in 20 of --data is held out (none if under 20)")
    a("--format", help="data format if the keys do not tell (reward, ultrafeedback, preference, sft)")
    a("--loss", default="nca", choices=["sft", "dpo", "infonca", "nca", "nca_pair"])
    a("--alpha", type=float, default=0.01, help="reward temperature: labels softmax(r / alpha) (paper's recipe "
                                                "0.01: UltraFeedback's 1..10 scores give near one-hot labels)")
    a("--beta", type=float, default=0.01, help="r_theta = beta * (log pi - log mu) (paper's recipe 0.01)")
    a("--pairs", default="none", choices=["none", "dpo", "dpo_x3", "dpo_all"],
      help="turn K responses into pairs: best vs a random other / vs each other / every ordered pair")
    a("--init", default="tiny", help="preset name (random init: %s) or a checkpoint directory (Hugging Face "
                                     "or original layout, or OUT/final of an earlier run)" % ", ".join(model_lib.PRESETS))
    a("--tokenizer", help="'byte' or a tokenizer path; default: recorded in --init's config.json, the --init "
                          "directory itself if it holds one, else 'byte'")
    a("--template", help="chat template (llama3, mistral, mistral_v3, chatml, zephyr, none); "
                         "default: recorded in --init, else none")
    a("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    a("--lora-alpha", type=float, help="LoRA scale alpha / r; default 2 * rank")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the adapter path (LoRA paper; 0 = off)")
    a("--lora-targets", default="q,k,v,o,gate,up,down", help="comma list of %s" % ",".join(lora.TARGETS))
    a("--quantize", default="none", choices=["none", "4bit"], help="4bit: NF4 frozen base (needs --lora-rank)")
    a("--ref", default="auto", choices=["auto", "precompute", "copy"],
      help="reference mu: auto = adapters off with LoRA, precomputed cache with full fine-tuning")
    a("--batch-size", type=int, default=4, help="prompts per micro-batch per process (x K sequences)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, help="peak learning rate; default 5e-7 full fine-tuning (paper, Zephyr), 5e-5 LoRA")
    a("--warmup", type=int, help="linear warmup steps, then cosine decay to 0; default 10%% of --steps")
    a("--steps", type=int, help="optimizer steps; default one epoch of --data")
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0 = no clipping)")
    a("--weight-decay", type=float, default=0.0)
    a("--max-length", type=int, default=1024, help="prompt + response tokens (longer responses are cut)")
    a("--max-prompt-length", type=int, default=512, help="prompt tokens kept (the end of the prompt)")
    a("--out", default="out", help="output directory")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (and always at the end)")
    a("--eval-every", type=int, default=100, help="evaluate every N steps (and always at the end)")
    a("--resume", action="store_true", help="continue from OUT/ckpt/state.pt")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto = cuda if available, else cpu")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="compute dtype (autocast); auto = bfloat16 on cuda, float32 on cpu. With LoRA the frozen base "
           "is stored in it too; full fine-tuning keeps float32 master weights")
    a("--dist", default="fsdp", choices=["fsdp", "ddp"], help="under torchrun: FSDP2 sharding, or replicas "
                                                              "(DDP semantics: every rank holds the model)")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--checkpointing", action="store_true", help="activation checkpointing per block (less memory)")
    a("--sample", type=int, default=0, help="print greedy generations for N held-out prompts before and after")
    a("--export", action=argparse.BooleanOptionalAction, default=True, help="write OUT/final (HF layout)")
    a("--plot", metavar="OUT", help="only redraw OUT/curves.png from OUT/metrics.jsonl")
    args = p.parse_args(argv)
    if args.plot is None and args.data is None:
        raise ValueError("--data is required (or run `python train.py` alone for the demo)")
    if args.quantize == "4bit" and args.lora_rank == 0:
        raise ValueError("--quantize 4bit quantizes the frozen base under LoRA adapters: add --lora-rank")
    if args.lora_dropout and not args.lora_rank:
        raise ValueError("--lora-dropout is dropout on the LoRA adapters' path: add --lora-rank")
    if args.loss == "sft" and args.pairs != "none":
        raise ValueError("--pairs builds preference pairs; --loss sft trains on the best response only")
    # checked here, not where first used: a bad --beta would otherwise stop the run only after the reference
    # log-probs of the whole data set are computed
    for names, low, ok in ((("batch_size", "grad_accum", "max_length", "max_prompt_length", "save_every", "eval_every",
                             "steps"), ">= 1", lambda v: v >= 1),
                           (("beta", "lora_alpha"), "> 0", lambda v: v > 0),
                           (("alpha", "lr", "warmup", "grad_clip", "weight_decay", "lora_rank", "sample"), ">= 0",
                            lambda v: v >= 0),
                           (("lora_dropout",), "in [0, 1)", lambda v: 0 <= v < 1)):
        for name in names:
            v = getattr(args, name)
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {low}, got {v}")
    return args


# ----------------------------------------------------------------------------- data

def prepare_examples(path, args, role):
    """Examples with one K for all prompts: pairs if --pairs, the best response alone for SFT."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} {path}: no such file")
    examples = data.load_examples(path, args.format)
    if args.pairs != "none":
        examples = data.to_pairs(examples, args.pairs, seed=args.seed)
    if args.loss == "sft":  # SFT data has K = 1; for reward / preference data imitate the best response
        examples = [data.Example(e.prompt, [e.responses[max(range(len(e.rewards)), key=e.rewards.__getitem__)]],
                                 [0.0]) for e in examples]
    if not examples:
        raise ValueError(f"{role} {path}: no examples")
    K = len(examples[0].responses)
    for i, e in enumerate(examples):
        if len(e.responses) != K:
            raise ValueError(f"{role} {path}: example {i} has K = {len(e.responses)} responses, example 0 has "
                             f"K = {K}; every prompt needs the same K (--pairs dpo turns any K into pairs)")
    if args.loss in ("dpo", "nca_pair") and K != 2:
        raise ValueError(f"{role} {path}: --loss {args.loss} takes pairs (K = 2), the data has K = {K}: add "
                         f"--pairs dpo|dpo_x3|dpo_all, or use --loss nca / infonca for any K")
    if args.loss != "sft" and K < 2:
        raise ValueError(f"{role} {path}: --loss {args.loss} contrasts K >= 2 responses per prompt, the data "
                         f"has K = 1 (SFT data?): use --loss sft")
    return examples


@functools.lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(step, n, size, seed):
    """The `size` example indices of optimizer step `step`: epoch after epoch of seeded shuffles, so the
    data position of a run is its step number and a resumed run sees exactly the same batches."""
    return [permutation(n, seed, p // n)[p % n] for p in range(step * size, (step + 1) * size)]


# ----------------------------------------------------------------------------- model

def resolve_init(args):
    """--init as a Path if it is a directory (OUT of an earlier run means OUT/final), else a preset name."""
    path = Path(args.init).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    if path.is_dir():
        return path
    if args.init not in model_lib.PRESETS:
        raise ValueError(f"--init {args.init}: neither a checkpoint directory nor a preset "
                         f"({', '.join(model_lib.PRESETS)})")
    return None


def load_base(args, device, dtype):
    """The model --init describes: a checkpoint (model.load) or a preset with a seeded random init."""
    path = resolve_init(args)
    torch.manual_seed(args.seed)  # every rank builds the same random model and the same LoRA init after it
    if path is not None:
        return model_lib.load(path, device=device, dtype=dtype)
    with torch.device(device):
        return model_lib.Transformer(model_lib.PRESETS[args.init]).to(dtype)


def init_key(args):
    """What the reference log-probs depend on in the model: the checkpoint's bytes, or preset + seed."""
    path = resolve_init(args)
    if path is None:
        return f"preset {args.init} {asdict(model_lib.PRESETS[args.init])} seed {args.seed}"
    h = hashlib.sha256()  # the weights' content: a copied or touched checkpoint keeps its cache
    for f in sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".pth")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_spec(args):
    """(tokenizer spec, template): flags first, then what --init recorded in config.json (see export)."""
    path = resolve_init(args)
    cfg = model_lib.read_json(path / "config.json") if path and (path / "config.json").is_file() else {}
    spec = args.tokenizer
    if spec is None and "nca_tokenizer" in cfg:
        spec = cfg["nca_tokenizer"] if cfg["nca_tokenizer"] == "byte" else str(path / cfg["nca_tokenizer"])
    if spec is None:
        spec = str(path) if path and data.tokenizer_file(path) else "byte"
    return spec, args.template or cfg.get("nca_template", "none")


def batch_logps(model, tokens, loss_mask):
    """log pi(y|x) of each of the B*K rows [B*K]: one forward pass, then the fused LM-head log-prob over
    the response positions only (position t predicts token t + 1)."""
    h = model.hidden(tokens[:, :-1])  # [B*K, T-1, d]
    return nca.sequence_logps(h, model.output.weight, tokens[:, 1:], loss_mask[:, 1:])  # [B*K]


def objective(args, logps, ref, rewards, n_tokens):
    """Mean loss over the B prompts of a micro-batch, and the metrics to log (all [B, K] in, METHOD.md)."""
    if args.loss == "sft":  # mean NLL per response token, averaged over sequences
        nll = -(logps / n_tokens.clamp(min=1))
        return nll.mean(), {}
    loss = nca.LOSSES[args.loss](logps, ref, rewards, alpha=args.alpha, beta=args.beta).mean()
    return loss, nca.metrics(logps.detach(), ref, rewards, beta=args.beta)


# ----------------------------------------------------------------------------- reference log-probs

@torch.no_grad()
def reference_cache(model, examples, tok, args, path_of_data, key, amp, rank, world):
    """log mu(y|x) [N, K] for every example, computed once and stored beside the data.

    The file name is a hash of everything the numbers depend on (model weights or preset + seed, the
    examples after pairing, tokenizer, template, max lengths, dtype), so a changed input makes a new file
    and a stale one is never read. Each rank computes a share; rank 0 writes.
    """
    h = hashlib.sha256(json.dumps([key, [asdict(e) for e in examples], args.tokenizer_spec, args.template_name,
                                   args.max_length, args.max_prompt_length]).encode()).hexdigest()[:16]
    cache = Path(f"{path_of_data}.ref-{h}.pt")
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    mine, out = list(range(rank, len(examples), world)), [torch.zeros(0)]
    for i in range(0, len(mine), args.batch_size):
        batch = collate([examples[j] for j in mine[i:i + args.batch_size]], tok, args)
        with amp():
            out.append(batch_logps(model, batch["tokens"].to(args.device), batch["loss_mask"].to(args.device)).cpu())
    parts = [(mine, torch.cat(out))]
    if world > 1:  # every rank's share, to every rank
        parts, share = [None] * world, parts[0]
        dist.all_gather_object(parts, share)
    ref = torch.zeros(len(examples), len(examples[0].responses))  # [N, K]
    for idx, vals in parts:
        ref[idx] = vals.view(len(idx), -1)
    if rank == 0:
        atomic_save(ref, cache)
        print(f"reference log-probs of {len(examples)} examples cached in {cache}")
    return ref


def collate(examples, tok, args):
    return data.collate(examples, tok, template=args.template_name, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length)


# ----------------------------------------------------------------------------- checkpoints, logging

def atomic_save(obj, path):
    model_lib.atomic_write(path, lambda f: torch.save(obj, f))


def write_jsonl(path, rows):
    model_lib.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    # a line cut short by a crash mid-append has no newline yet: skip it (resume rewrites the file without it)
    return [json.loads(line) for line in open(path) if line.endswith("\n")] if Path(path).is_file() else []


def hms(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


def plot_curves(out):
    """OUT/curves.png from OUT/metrics.jsonl: loss, chosen / rejected log-ratio log pi - log mu (the
    likelihood-decrease curve of METHOD.md), reward accuracy; eval points as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_jsonl(Path(out) / "metrics.jsonl")
    if not rows:
        raise FileNotFoundError(f"{out}/metrics.jsonl: no metrics to plot")
    panels = [("loss", ["loss"]), ("log pi - log mu", ["logratio/chosen", "logratio/rejected"]),
              ("reward accuracy", ["rewards/accuracies"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            for j, k in enumerate(keys):
                pts = [(r["step"], r[k]) for r in rows if r["split"] == split and k in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=f"C{j}", label=f"{split} {k}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    if any("logratio/chosen" in r for r in rows):
        axes[1].axhline(0, color="gray", lw=0.5)
    fig.tight_layout()
    fig.savefig(Path(out) / "curves.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- distributed

def setup_distributed(args):
    """(rank, world, device). Under torchrun: one process per GPU (nccl) or per CPU slot (gloo)."""
    try:
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch {torch.__version__} sees no CUDA device")
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def shard(model, args, world, device, dtype):
    """FSDP2: each block, then the root (embeddings, norm, head), sharded over the ranks. --dist ddp uses
    the same machinery on a (world, 1) mesh: replicated parameters, all-reduced gradients, i.e. DDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = (init_device_mesh(device.type, (world,)) if args.dist == "fsdp" else
            init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard")))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden")  # training calls model.hidden, not forward
    return model


def all_mean(values, world):
    """Mean over ranks of a list of floats (one all-reduce)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world).tolist()


# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the built-in default: the toy pipeline end to end, a few minutes on a laptop CPU
        from toy.pipeline import demo
        return demo()
    try:
        args = parse_args(argv)
        if args.plot:
            plot_curves(args.plot)
            return {}
        return train(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train(args):
    rank, world, device = setup_distributed(args)
    args.device = str(device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    amp = functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype != torch.float32)
    master = rank == 0
    out = Path(args.out)
    ckpt_path = out / "ckpt" / "state.pt"
    if ckpt_path.is_file() and not args.resume:  # a fresh run would overwrite it at its first save
        raise ValueError(f"--out {out} holds the checkpoint of an earlier run ({ckpt_path}): pass --resume to "
                         "continue it, or another --out to start afresh")
    if master:
        (out / "ckpt").mkdir(parents=True, exist_ok=True)

    # --- data
    args.tokenizer_spec, args.template_name = tokenizer_spec(args)
    tok = data.load_tokenizer(args.tokenizer_spec)
    examples = prepare_examples(args.data, args, "--data")
    if args.eval_data:
        eval_examples, eval_path = prepare_examples(args.eval_data, args, "--eval-data"), args.eval_data
    else:  # hold out every 20th example of a fixed shuffle
        held = set(permutation(len(examples), args.seed, -1)[:len(examples) // 20])
        eval_examples = [e for i, e in enumerate(examples) if i in held]
        examples = [e for i, e in enumerate(examples) if i not in held]
        eval_path = args.data
    K = len(examples[0].responses)
    global_batch = args.batch_size * args.grad_accum * world
    steps = args.steps or math.ceil(len(examples) / global_batch)
    warmup = steps // 10 if args.warmup is None else args.warmup
    lr = args.lr if args.lr is not None else 5e-5 if args.lora_rank else 5e-7
    args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
    # everything the run's future depends on: --resume refuses a checkpoint saved under other settings
    args.run_config = {f"--{k.replace('_', '-')}": getattr(args, k) for k in (
        "loss", "alpha", "beta", "lora_rank", "lora_dropout", "lora_targets", "quantize", "grad_clip", "weight_decay",
        "max_length", "max_prompt_length", "seed")}
    args.run_config.update({
        "--data examples sha256": hashlib.sha256(json.dumps([asdict(e) for e in examples]).encode()).hexdigest(),
        "--init": str(Path(args.init).expanduser().resolve()) if resolve_init(args) else args.init,
        "--tokenizer": args.tokenizer_spec, "--template": args.template_name, "--lr": lr, "--warmup": warmup,
        "--lora-alpha": args.lora_alpha,
        "--steps": steps, "--dtype": str(dtype), "global batch (--batch-size x --grad-accum x processes)": global_batch})
    ckpt = read_checkpoint(ckpt_path, args) if args.resume else None  # now, not after the reference log-probs

    # --- model: the base (the reference mu), then adapters, then the reference log-probs
    base_dtype = dtype if args.lora_rank else torch.float32  # full FT: float32 master weights
    model = load_base(args, device, base_dtype)
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"tokenizer {args.tokenizer_spec} has {tok.vocab_size} tokens, the model's vocabulary "
                         f"only {model.args.vocab_size}")
    if args.max_length > model.args.max_seq_len:
        raise ValueError(f"--max-length {args.max_length} exceeds the model's max_seq_len {model.args.max_seq_len}")
    ref_mode = "none" if args.loss == "sft" else args.ref if args.ref != "auto" else \
        "adapters" if args.lora_rank else "precompute"
    ref_model = copy.deepcopy(model).requires_grad_(False) if ref_mode == "copy" else None
    if args.lora_rank:
        lora.inject(model, args.lora_targets, args.lora_rank, args.lora_alpha,
                    args.lora_dropout)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in float32 even on a bf16 base (AdamW needs the bits)
        if args.quantize == "4bit":
            lora.quantize_4bit(model)
    trainable, total = lora.count_parameters(model)
    ref_cache, eval_ref_cache = None, None
    if ref_mode == "precompute":  # before any training: with LoRA the fresh adapters are zero anyway
        key = [init_key(args), args.quantize, str(base_dtype), str(dtype)]
        with lora.disabled(model) if args.lora_rank else nullcontext():
            ref_cache = reference_cache(model, examples, tok, args, args.data, key, amp, rank, world)
            if eval_examples:
                eval_ref_cache = reference_cache(model, eval_examples, tok, args, eval_path, key, amp, rank, world)
    if master:
        print(f"{len(examples)} training prompts x K = {K}, {len(eval_examples)} held out | {trainable:,} of "
              f"{total:,} parameters train | reference: {ref_mode} | {world} process(es), global batch "
              f"{global_batch} prompts | {steps} steps")

    # --- samples before training, from the plain (not yet sharded) model
    if args.sample and master:
        print_samples(model, tok, (eval_examples or examples)[:args.sample], args, "before")

    model.checkpoint_activations = args.checkpointing
    if args.compile:
        for block in model.layers:
            block.compile()
    if world > 1:
        shard(model, args, world, device, dtype)
        if ref_model is not None:
            shard(ref_model, args, world, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))

    # --- resume: everything a run's future depends on is in state.pt
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, ckpt_path, model, optimizer, schedule, args)
        if master:  # metrics logged after the checkpoint belong to the lost future: drop them
            rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] <= start]
            write_jsonl(out / "metrics.jsonl", rows)  # atomically: a crash here keeps the old log
            print(f"resumed from {ckpt_path} at step {start}")
    elif master and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh log

    def forward(ids, exs, cache):
        """(loss, metrics, tokens) of one micro-batch of prompts; cache = precomputed log mu or None."""
        batch = collate(exs, tok, args)
        tokens, mask, rewards = (batch[k].to(device) for k in ("tokens", "loss_mask", "rewards"))
        with amp():
            logps = batch_logps(model, tokens, mask).view(rewards.shape)  # [B, K] float32
        ref = None if cache is None else cache[ids].to(device)  # [B, K]
        if ref_mode in ("copy", "adapters"):  # the frozen copy, or the same weights with the adapters off
            with torch.no_grad(), amp(), lora.disabled(model) if ref_model is None else nullcontext():
                ref = batch_logps(ref_model or model, tokens, mask).view(rewards.shape)
        loss, stats = objective(args, logps, ref, rewards, mask[:, 1:].sum(-1).view(rewards.shape))
        stats["truncated"] = batch["responses_truncated"] / mask.shape[0]  # share of responses cut at --max-length
        return loss, stats, tokens.numel()

    @torch.no_grad()
    def evaluate():
        """Loss and metrics over the held-out examples; every rank runs the same number of forwards
        (FSDP gathers weights collectively) and drops the filler rows."""
        model.eval()  # no LoRA dropout: the metrics are deterministic and draw nothing from training's RNG
        mine = list(range(rank, len(eval_examples), world))
        n_batches = math.ceil(math.ceil(len(eval_examples) / world) / args.batch_size)
        sums, n = {}, 0
        for b in range(n_batches):
            ids = mine[b * args.batch_size:(b + 1) * args.batch_size]
            real = len(ids)
            ids = ids or [0]
            loss, stats, _ = forward(ids, [eval_examples[i] for i in ids], eval_ref_cache)
            for k, v in {"loss": loss, **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) * real
            n += real
        keys = list(sums)
        totals = all_mean([sums[k] for k in keys] + [n], world)  # per-rank means: their ratio is the global one
        model.train()
        return {k: v / totals[-1] for k, v in zip(keys, totals)}

    model.train()
    t0, log = time.time(), {}
    for step in range(start, steps):
        ids_all = batch_indices(step, len(examples), global_batch, args.seed)[rank::world]  # this rank's share
        t_step, sums, n_tok = time.time(), {}, 0
        for m in range(args.grad_accum):
            ids = ids_all[m * args.batch_size:(m + 1) * args.batch_size]
            loss, stats, ntok = forward(ids, [examples[i] for i in ids], ref_cache)
            (loss / args.grad_accum).backward()
            n_tok += ntok
            for k, v in {"loss": loss.detach(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + float(v) / args.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        keys = list(sums)
        vals = all_mean([sums[k] for k in keys] + [n_tok], world)
        log = dict(zip(keys, vals[:-1]))
        if not (math.isfinite(log["loss"]) and math.isfinite(grad_norm)):  # before the update: weights stay clean
            raise FloatingPointError(f"non-finite loss {log['loss']} or gradient norm {grad_norm} at step "
                                     f"{step + 1}: stopped, nothing saved (last good checkpoint: {ckpt_path}); "
                                     f"try a lower --lr or --beta")
        lr_used = schedule.get_last_lr()[0]  # after schedule.step() it is the next step's
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        dt, elapsed = time.time() - t_step, time.time() - t0
        record = {"step": done, "split": "train", **log, "lr": lr_used, "grad_norm": grad_norm,
                  "tokens_per_s": vals[-1] * world / dt, "elapsed_s": elapsed}
        if master:
            append_jsonl(out / "metrics.jsonl", record)
            print(progress_line(record, steps, elapsed / (done - start) * (steps - done)), flush=True)
        if eval_examples and (done % args.eval_every == 0 or done == steps):
            ev = evaluate()
            if master:
                append_jsonl(out / "metrics.jsonl", {"step": done, "split": "eval", **ev})
                print(f"eval step {done}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()), flush=True)
            log.update({f"eval/{k}": v for k, v in ev.items()})
        if done % args.save_every == 0 or done == steps:
            save_checkpoint(ckpt_path, model, optimizer, schedule, done, args, master)
    if master:
        plot_curves(out)

    # --- export: a plain Transformer with LoRA merged, in Hugging Face layout
    if args.export or args.sample:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if master:
            final = plain_model(state, args, model.args)
            if args.export:
                export_final(final, out / "final", args)
            if args.sample:
                print_samples(final.to(device), tok, (eval_examples or examples)[:args.sample], args, "after")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return log


def progress_line(r, steps, eta):
    parts = [f"step {r['step']}/{steps}", f"loss {r['loss']:.4f}"]
    if "rewards/accuracies" in r:
        parts += [f"acc {r['rewards/accuracies']:.2f}",
                  f"log pi/mu chosen {r['logratio/chosen']:+.3f} rejected {r['logratio/rejected']:+.3f}",
                  f"margin {r['rewards/margins']:+.4f}"]
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s", f"{hms(r['elapsed_s'])} elapsed",
              f"ETA {hms(eta)}"]
    return " | ".join(parts)


def save_checkpoint(path, model, optimizer, schedule, step, args, master):
    """Model (or only the adapters), optimizer, schedule, step (= data position), RNG: all gathered, rank 0
    writes one file atomically."""
    # with LoRA the frozen base is --init itself: keep only what trains (and do not copy 7B frozen weights to
    # the CPU to drop them; the 4-bit base is buffers, hence the filter too)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(args.lora_rank))
    state = get_model_state_dict(model, options=opts)
    if args.lora_rank:
        state = {k: v for k, v in state.items() if ".lora_" in k}
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    if master:
        atomic_save({"step": step, "model": state, "optimizer": optim, "schedule": schedule.state_dict(),
                     "rng": torch.get_rng_state(), "model_args": asdict(model.args),
                     "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                     "config": args.run_config}, path)


def read_checkpoint(path, args):
    """state.pt, refused unless the run that saved it had the same settings (args.run_config)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    try:  # mmap: under torchrun every rank reads the whole file, the page cache holds it once
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        saved = ckpt["config"]
    except Exception as e:  # torch raises many kinds here (zip, pickle, EOF); an older file lacks our keys
        raise ValueError(f"--resume: {path} ({path.stat().st_size:,} bytes) is not a readable checkpoint of this "
                         f"train.py ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    diff = [f"{k} {saved.get(k)!r} (this run: {v!r})" for k, v in args.run_config.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"--resume: {path} was saved by a run with {', '.join(diff)}; resume with the same "
                         f"settings, or start afresh in another --out")
    return ckpt


def load_checkpoint(ckpt, path, model, optimizer, schedule, args):
    if ckpt["model_args"] != asdict(model.args):  # e.g. the --init directory now holds another model
        raise ValueError(f"--resume: {path} was saved for model {ckpt['model_args']}; --init {args.init} builds "
                         f"{asdict(model.args)}")
    opts = StateDictOptions(full_state_dict=True, strict=not args.lora_rank)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
    schedule.load_state_dict(ckpt["schedule"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    return ckpt["step"]


def plain_model(state, args, margs):
    """A plain Transformer holding the trained weights, LoRA merged (W + alpha/r B A)."""
    if args.quantize == "4bit":  # merging into NF4 would requantise: merge into the 16-bit base (lora.merge)
        model = load_base(args, "cpu", torch.float32)
        state = {k: v for k, v in state.items() if ".lora_" in k}
    else:
        with torch.device("meta"):
            model = model_lib.Transformer(margs)
    if args.lora_rank:
        lora.inject(model, args.lora_targets, args.lora_rank, args.lora_alpha)
    model.load_state_dict(state, strict=args.quantize == "none", assign=True)
    if args.lora_rank:
        lora.merge(model)
        state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        with torch.device("meta"):
            model = model_lib.Transformer(margs)
        model.load_state_dict(state, assign=True)
    return model


def export_final(model, path, args):
    """HF layout via model.save_hf, plus the tokenizer (copied if it is a file) and template in config.json,
    so the next stage (evaluation, a second round) can load model and tokenizer from this one directory."""
    spec = args.tokenizer_spec
    if spec != "byte":
        src = Path(spec)
        src = src if src.is_file() else data.tokenizer_file(src)
        path.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, path / src.name)
        spec = src.name
    model_lib.save_hf(model, path, config={"nca_tokenizer": spec, "nca_template": args.template_name})
    print(f"exported {path} (Hugging Face layout)")


def print_samples(model, tok, examples, args, when):
    """Greedy continuations of the prompts, tokenized exactly as in training (collate's prompt part)."""
    prompts = data.prompt_ids([e.prompt for e in examples], tok, template=args.template_name,
                              max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    outs = model_lib.generate(model, prompts, max_new_tokens=min(128, args.max_length - args.max_prompt_length),
                              eos_id=data.end_of_turn(tok, args.template_name))  # stop where training ends a turn
    for e, o in zip(examples, outs):
        # a model whose vocabulary is larger than the tokenizer's (padded presets) may emit ids it cannot decode
        print(f"[{when}] {str(e.prompt)!r} -> {tok.decode([i for i in o if i < tok.vocab_size])!r}")


if __name__ == "__main__":
    main()
