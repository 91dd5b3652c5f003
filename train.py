"""Align a language model with NCA, InfoNCA, DPO or SFT: one flat script from a laptop CPU to a 7B on GPUs.

    python train.py                                              # the built-in demo (toy/pipeline.py)
    python train.py --data uf.jsonl --init tiny --loss nca       # a tiny random model, CPU
    python train.py --data uf.jsonl --init ~/mistral-7b --lora-rank 16 --loss nca --device cuda
    torchrun --nproc_per_node 8 train.py --data uf.jsonl --init ~/mistral-7b --loss nca   # FSDP2, full FT
    python train.py --plot out                                   # redraw out/curves.png from out/metrics.jsonl

Reading order: the flags resolve once into a frozen `Run`; `train` builds data, model and reference,
then runs the step loop. Per step, B x K sequences (B prompts, K responses each) go through the policy
in ONE forward pass, packed by default: each prompt once, followed by its K responses, which attend to it
and to themselves only (`collate`, data.pack; --no-pack: one padded row per response). `log_probs` turns
the final hidden states into log pi_theta(y|x) [B, K] without building the logits over the vocabulary
(nca.packed_logps / nca.batch_logps); the reference log mu(y|x) comes from `reference_logps`: a cache
computed once before training (full fine-tuning), the same weights with the LoRA adapters switched off,
or a frozen copy (--ref copy). The losses are nca.py's. Writes OUT/metrics.jsonl, OUT/curves.png,
OUT/ckpt/state.pt (atomic, resumable; under torchrun it names OUT/ckpt/step-N/, each rank's shards) and
OUT/final/ (Hugging Face layout, LoRA merged, tokenizer recorded in config.json).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import data
import lora
import model as model_lib
import nca

# ----------------------------------------------------------------------------- flags

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the bad flag, not argparse's usage block
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
    a("--template", help="chat template (%s); default: recorded in --init, else none" % ", ".join(data.TEMPLATES))
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
    a("--pack-tokens", type=int, help="packed rows of at most this many tokens, each prompt once followed by its "
                                      "K responses (data.pack); default: the whole micro-batch in one row "
                                      "(see README: Packed batches)")
    a("--no-pack", action="store_true", help="one row per response, its prompt repeated, right padded "
                                             "(data.collate): the readable reference the packed path equals")
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
    a("--plan", action="store_true", help="load no weights: print the per-GPU memory these flags need and exit")
    a("--k", type=int, help="--plan without --data: responses per prompt")
    a("--nproc", type=int, default=1, help="--plan: processes (GPUs) under torchrun")
    a("--gpu-memory", type=float, help="--plan: GiB per GPU, to say whether the run fits")
    return check_flags(p.parse_args(argv))


def check_flags(args):
    """Flags that parse but cannot work together, or numbers out of range: one line each, before any work."""
    if args.plot is None and args.data is None and not (args.plan and args.k):
        raise ValueError("--data is required (or run `python train.py` alone for the demo; --plan takes --k instead)")
    if args.quantize == "4bit" and args.lora_rank == 0:
        raise ValueError("--quantize 4bit quantizes the frozen base under LoRA adapters: add --lora-rank")
    if args.lora_dropout and not args.lora_rank:
        raise ValueError("--lora-dropout is dropout on the LoRA adapters' path: add --lora-rank")
    if args.no_pack and args.pack_tokens is not None:
        raise ValueError("--pack-tokens sizes packed rows; --no-pack turns packing off: pass one of them")
    if args.loss == "sft" and args.pairs != "none":
        raise ValueError("--pairs builds preference pairs; --loss sft trains on the best response only")
    # here, not where first used: a bad --beta would otherwise stop the run only after the reference
    # log-probs of the whole data set are computed. alpha / beta and the LoRA numbers have their owners.
    for names, low, ok in ((("batch_size", "grad_accum", "max_length", "max_prompt_length", "save_every", "eval_every",
                             "steps", "k", "nproc", "pack_tokens"), ">= 1", lambda v: v >= 1),
                           (("lr", "warmup", "grad_clip", "weight_decay", "lora_rank", "sample", "gpu_memory"), ">= 0",
                            lambda v: v >= 0)):
        for name in names:
            v = getattr(args, name)
            if v is not None and not (math.isfinite(v) and ok(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {low}, got {v}")
    try:
        nca.check_alpha_beta(args.alpha, args.beta)
    except ValueError as e:  # "beta must be ..." -> "--beta must be ..."
        raise ValueError(f"--{e}") from None
    if args.lora_rank:
        try:
            lora.check(args.lora_rank, lora_alpha(args), args.lora_dropout, args.lora_targets)
        except ValueError as e:
            raise ValueError(f"--lora-rank {args.lora_rank} --lora-alpha {lora_alpha(args)} --lora-dropout "
                             f"{args.lora_dropout} --lora-targets {args.lora_targets}: {e}") from None
    return args


def lora_alpha(args):
    return 2.0 * args.lora_rank if args.lora_alpha is None else args.lora_alpha


# ----------------------------------------------------------------------------- the run's settings

@dataclass(frozen=True)
class Run:
    """Every setting of a run, resolved once from the flags, the data, the checkpoint and the processes."""
    loss: str
    alpha: float
    beta: float
    seed: int
    init: str                   # a preset name, or the checkpoint directory (absolute)
    init_dir: Path | None       # the checkpoint directory, None for a preset
    tokenizer: str              # 'byte' or a tokenizer file / directory
    template: str
    max_length: int
    max_prompt_length: int
    pack: bool                  # packed rows (data.pack); False: --no-pack, one padded row per response
    pack_tokens: int | None     # the packed rows' budget; None: a micro-batch is one row
    lora_rank: int              # 0 = full fine-tuning
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    quantize: str
    ref: str                    # how log mu is obtained: none (SFT), precompute, adapters, copy
    K: int
    steps: int
    warmup: int
    lr: float
    batch_size: int             # prompts per micro-batch per process
    grad_accum: int
    global_batch: int           # prompts per optimizer step, all processes together
    grad_clip: float
    weight_decay: float
    data_sha256: str            # the training examples after pairing: what the step number indexes
    device: torch.device
    dtype: torch.dtype          # compute dtype (autocast); LoRA stores the frozen base in it too
    base_dtype: torch.dtype     # the weights as loaded: float32 master weights under full fine-tuning
    rank: int
    world: int
    dist: str
    compile: bool
    checkpointing: bool
    out: Path
    save_every: int
    eval_every: int
    sample: int
    export: bool

    @property
    def master(self):
        return self.rank == 0


def configure(args, examples, rank, world, device):
    """The run's settings from the flags (parse_args checked them) and the training examples."""
    init_dir = resolve_init(args.init)
    tokenizer, template = tokenizer_spec(args, init_dir)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    global_batch = args.batch_size * args.grad_accum * world
    steps = args.steps or math.ceil(len(examples) / global_batch)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    return Run(
        loss=args.loss, alpha=args.alpha, beta=args.beta, seed=args.seed,
        init=str(init_dir.resolve()) if init_dir else args.init, init_dir=init_dir,
        tokenizer=tokenizer, template=template, max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        pack=not args.no_pack, pack_tokens=args.pack_tokens,
        lora_rank=args.lora_rank, lora_alpha=lora_alpha(args),
        lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, quantize=args.quantize,
        ref="none" if args.loss == "sft" else args.ref if args.ref != "auto" else
        "adapters" if args.lora_rank else "precompute",
        K=len(examples[0].responses), steps=steps, warmup=steps // 10 if args.warmup is None else args.warmup,
        lr=args.lr if args.lr is not None else 5e-5 if args.lora_rank else 5e-7,
        batch_size=args.batch_size, grad_accum=args.grad_accum, global_batch=global_batch,
        grad_clip=args.grad_clip, weight_decay=args.weight_decay,
        data_sha256=hashlib.sha256(json.dumps([asdict(e) for e in examples]).encode()).hexdigest(),
        device=device, dtype=dtype, base_dtype=dtype if args.lora_rank else torch.float32,
        rank=rank, world=world, dist=args.dist, compile=args.compile, checkpointing=args.checkpointing,
        out=out, save_every=args.save_every, eval_every=args.eval_every, sample=args.sample, export=args.export)


def resume_key(run):
    """Everything a run's future depends on: --resume refuses a checkpoint saved under other settings.
    (Where it writes, how often, and how it computes, e.g. --compile, may change.)"""
    key = {f"--{k.replace('_', '-')}": getattr(run, k) for k in (
        "loss", "beta", "lora_rank", "lora_dropout", "lora_targets", "quantize", "grad_clip", "weight_decay",
        "max_length", "max_prompt_length", "seed", "init", "tokenizer", "template", "lr", "warmup", "steps")}
    if run.loss not in nca.PAIR_LOSSES + ("sft",):  # the pairwise losses have no reward temperature
        key["--alpha"] = run.alpha
    if run.lora_rank:
        key["--lora-alpha"] = run.lora_alpha
    # packed and padded rows give the same log-probs only to float32 rounding (~1e-6): a resumed run that
    # switched would not repeat the uninterrupted one step for step. (The row budget, like --batch-size per
    # process or --compile, changes only how it computes.)
    key["layout (packed, or padded: --no-pack)"] = "packed" if run.pack else "padded"
    return {**key, "--data examples sha256": run.data_sha256, "--dtype": str(run.dtype),
            "global batch (--batch-size x --grad-accum x processes)": run.global_batch}


def autocast(run):
    return torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)


# ----------------------------------------------------------------------------- data

def prepare_examples(path, args, role):
    """Examples with one K for all prompts: pairs if --pairs, the best response alone for SFT."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} {path}: no such file")
    examples = data.load_examples(path, args.format)
    if args.pairs != "none":
        n = len(examples)
        examples = data.to_pairs(examples, args.pairs, seed=args.seed)
        if not examples:
            raise ValueError(f"{role} {path}: no examples left after --pairs {args.pairs}: in all {n} prompts every "
                             f"response has the same reward, and a tie is no preference pair")
    if args.loss == "sft":  # SFT data has K = 1; for reward / preference data imitate the best response
        examples = [data.Example(e.prompt, [e.responses[max(range(len(e.rewards)), key=e.rewards.__getitem__)]],
                                 [0.0]) for e in examples]
    K = data.common_k(examples, f"{role} {path}")
    if args.loss in ("dpo", "nca_pair") and K != 2:
        raise ValueError(f"{role} {path}: --loss {args.loss} takes pairs (K = 2), the data has K = {K}: add "
                         f"--pairs dpo|dpo_x3|dpo_all, or use --loss nca / infonca for any K")
    if args.loss != "sft" and K < 2:
        raise ValueError(f"{role} {path}: --loss {args.loss} contrasts K >= 2 responses per prompt, the data "
                         f"has K = 1 (SFT data?): use --loss sft")
    return examples


def load_data(args):
    """(train examples, eval examples, the file the eval examples came from)."""
    examples = prepare_examples(args.data, args, "--data")
    if args.eval_data:
        return examples, prepare_examples(args.eval_data, args, "--eval-data"), args.eval_data
    held = set(permutation(len(examples), args.seed, -1)[:len(examples) // 20])  # every 20th of a fixed shuffle
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held],
            args.data)


@functools.lru_cache(maxsize=4)
def permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def batch_indices(step, n, size, seed):
    """The `size` example indices of optimizer step `step`: epoch after epoch of seeded shuffles, so the
    data position of a run is its step number and a resumed run sees exactly the same batches."""
    return [permutation(n, seed, p // n)[p % n] for p in range(step * size, (step + 1) * size)]


def collate(run, tok, examples):
    """The micro-batch of `examples` on the run's device, in the run's layout (the one place that picks it):
    packed rows, each prompt once followed by its K responses (data.pack, the default), or under --no-pack one
    right-padded row per response (data.collate). Both give the same log-probs (log_probs) and carry rewards
    [B, K], response_lengths [B, K] and n_tokens."""
    kw = dict(template=run.template, max_length=run.max_length, max_prompt_length=run.max_prompt_length)
    batch = data.pack(examples, tok, pack_tokens=run.pack_tokens, **kw) if run.pack else \
        data.collate(examples, tok, **kw)
    return {k: to_device(v, run.device) if isinstance(v, torch.Tensor) else
            tuple(to_device(x, run.device) for x in v) if k in ("scored", "to_padded") else v for k, v in batch.items()}


def log_probs(model, batch):
    """log pi(y|x) [B, K] of a batch from collate, whichever its layout: the prompt computed once for its K
    responses (nca.packed_logps), or once per response (nca.batch_logps)."""
    if "pos" in batch:
        return nca.packed_logps(model, batch)
    return nca.batch_logps(model, batch["tokens"], batch["scored"]).view(batch["rewards"].shape)


# ----------------------------------------------------------------------------- model

def resolve_init(init):
    """--init as a Path if it is a directory (OUT of an earlier run means OUT/final), else None: a preset."""
    path = Path(init).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    if path.is_dir():
        return path
    if init not in model_lib.PRESETS:
        raise ValueError(f"--init {init}: neither a checkpoint directory nor a preset ({', '.join(model_lib.PRESETS)})")
    return None


def tokenizer_spec(args, init_dir):
    """(tokenizer spec, template): flags first, then what --init recorded in config.json (see export)."""
    cfg = model_lib.read_json(init_dir / "config.json") if init_dir and (init_dir / "config.json").is_file() else {}
    spec = args.tokenizer
    if spec is None and "nca_tokenizer" in cfg:
        spec = cfg["nca_tokenizer"] if cfg["nca_tokenizer"] == "byte" else str(data.recorded_file(init_dir, cfg["nca_tokenizer"]))
    if spec is None:
        spec = str(init_dir) if init_dir and data.tokenizer_file(init_dir) else "byte"
    return spec, args.template or cfg.get("nca_template", "none")


def load_base(run, device, dtype, prepare=None):
    """The model --init describes, on `device` in `dtype`, made one tensor at a time: a checkpoint (model.load)
    or a preset with a seeded random init (model.build, directly in its dtype: the same numbers as building in
    float32 and casting). On the meta device: the shapes alone, nothing read. prepare: see model._fill."""
    torch.manual_seed(run.seed)  # every process that builds it builds the same random model and LoRA init
    if run.init_dir is not None and str(device) != "meta":
        return model_lib.load(run.init_dir, device=device, dtype=dtype, prepare=prepare)
    return model_lib.build(init_args(run.init_dir, run.init), device=device, dtype=dtype, prepare=prepare)


def build_model(run, tok):
    """(policy, frozen copy of the initial model or None): the base, a copy for --ref copy, then adapters.
    QLoRA injects them first and quantises each weight as it is read: the 16-bit base never is whole.
    Under torchrun only rank 0 reads the weights (and draws the random inits), onto its CPU; the other ranks
    build the same modules on the meta device, which holds no memory. `shard` hands out the values."""
    qlora = lora.qlora(run.lora_targets, run.lora_rank, run.lora_alpha, run.lora_dropout) \
        if run.quantize == "4bit" else None
    model = load_base(run, run.device if run.world == 1 else "cpu" if run.master else "meta", run.base_dtype, qlora)
    if tok.vocab_size > model.args.vocab_size:
        raise ValueError(f"tokenizer {run.tokenizer} has {tok.vocab_size} tokens, the model's vocabulary "
                         f"only {model.args.vocab_size}")
    if run.max_length > model.args.max_seq_len:
        raise ValueError(f"--max-length {run.max_length} exceeds the model's max_seq_len {model.args.max_seq_len}")
    frozen = copy.deepcopy(model).requires_grad_(False) if run.ref == "copy" else None
    if run.lora_rank:
        if qlora is None:
            lora.inject(model, run.lora_targets, run.lora_rank, run.lora_alpha, run.lora_dropout)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # adapters train in float32 even on a bf16 base (AdamW needs the bits)
    model.checkpoint_activations = run.checkpointing
    return model, frozen


def init_key(run):
    """What the reference log-probs depend on in the model: the checkpoint's bytes, or preset + seed."""
    if run.init_dir is None:
        return f"preset {run.init} {asdict(model_lib.PRESETS[run.init])} seed {run.seed}"
    h = hashlib.sha256()  # the weights' content: a copied or touched checkpoint keeps its cache
    for f in sorted(p for p in run.init_dir.iterdir() if p.suffix in (".json", ".safetensors", ".pth")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def shard(model, run):
    """FSDP2: each block, then the root (embeddings, norm, head), sharded over the ranks. --dist ddp uses
    the same machinery on a (world, 1) mesh: replicated parameters, all-reduced gradients, i.e. DDP.
    The values come from rank 0's CPU copy (build_model): every rank lays out its shards on the meta device,
    allocates them on its own device (to_empty), and rank 0 broadcasts the values one tensor at a time, each
    rank keeping its slice (PyTorch's set_model_state_dict, broadcast_from_rank0). No device ever holds more
    than its shards plus the tensor in flight."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mesh = (init_device_mesh(run.device.type, (run.world,)) if run.dist == "fsdp" else
            init_device_mesh(run.device.type, (run.world, 1), mesh_dim_names=("replicate", "shard")))
    mp = MixedPrecisionPolicy(param_dtype=run.dtype, reduce_dtype=torch.float32)
    full = model.state_dict() if run.master else {}  # keeps rank 0's CPU tensors alive past the next line
    model.to("meta")
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    register_fsdp_forward_method(model, "hidden")  # training calls model.hidden, not forward
    model.to_empty(device=run.device)
    for m in lora.lora_modules(model).values():  # the NF4 table is in no state dict (not persistent): refill it
        if m.weight_nf4 is not None:
            m.nf4_pairs = lora.NF4_PAIRS.to(run.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


# ----------------------------------------------------------------------------- plan: memory before renting a GPU

def init_args(init_dir, init):
    """The ModelArgs of --init from its config alone: no tensor is read."""
    if init_dir is None:
        return model_lib.PRESETS[init]
    if (init_dir / "config.json").is_file():
        return model_lib._args_from_hf(model_lib.read_json(init_dir / "config.json"), init_dir / "config.json")
    if (init_dir / "params.json").is_file():
        return model_lib._args_from_params(model_lib.read_json(init_dir / "params.json"), init_dir / "params.json")
    raise ValueError(f"--init {init_dir}: not a checkpoint directory (no config.json, no params.json)")


def activation_bytes(a, *, tokens, scored, full, adapted, rank, dropout, r, c, checkpointing):
    """Bytes autograd keeps for backward after the forward of `tokens` positions, `scored` of them response
    tokens, counted tensor by tensor from what each op of model.py / nca.py / lora.py saves. PyTorch saves an
    op's input only when a gradient needs it: x W^T keeps x only if W trains (full fine-tuning) or an adapter
    reads x; x * cos keeps nothing of x (cos is a constant). r: bytes per element of the residual stream (the
    parameters' dtype at compute), c: of the autocast dtype; norms compute in float32 (4 bytes).
    full: every weight trains; adapted: the LoRA targets (short names, lora.TARGETS) of rank `rank`."""
    d, F, H = a.dim, a.hidden_dim, a.n_heads
    hd = a.head_dim or d // H
    q, kv = H * hd, a.n_kv_heads * hd

    def norm():  # x.float() [4d] kept by pow and mul, rsqrt [4]; the normed x [r d] only if the norm weight trains
        return 4 * d + 4 + (r * d if full else 0)

    def inputs(width, nbytes, readers):  # the input of linears `readers`, kept once, or cast once per linear
        keep = [t for t in readers if full or t in adapted and not dropout]  # with dropout, A reads x' instead
        return 0 if not keep else width * c if nbytes == c else len(keep) * width * c

    def adapters(readers, width, grad_in=True):  # u = A x [c rank] for B's gradient; with dropout x' = x * mask
        n = len([t for t in readers if t in adapted])  # [r] for A's gradient and the mask [r on CPU, 1 on CUDA]
        return n * (c * rank + (width * r * (1 + grad_in) if dropout else 0))

    def layer(first):
        # under LoRA nothing before block 0's attention needs a gradient (the embedding is frozen): its norm and
        # its dropout masks keep nothing
        return ((0 if first and not full else norm()) + inputs(d, r, "qkv") + adapters("qkv", d, not first or full)
                + c * (q + 2 * kv) + c * q + 4 * H  # SDPA keeps q, k, v, its output (= wo's input) and logsumexp
                + adapters("o", q)
                + norm() + inputs(d, r, ["gate", "up"]) + adapters(["gate", "up"], d)
                + 2 * c * F + c * F                  # silu keeps w1 x; the product keeps silu(w1 x) and w3 x
                + inputs(F, c, ["down"]) + adapters(["down"], F))  # w2's input, the product

    head = (8 if full else 0) + norm()           # the embedding keeps the token ids; the final norm
    per_scored = 32 + 4 * d + (c * d if full else 0)  # indices, lse, d logp / d h [4d]; h for the head's gradient
    blocks = (layer(True) + (a.n_layers - 1) * layer(False)) * tokens
    if checkpointing:  # each block keeps its input; backward recomputes one block at a time
        blocks = (a.n_layers * r * d + layer(False)) * tokens
    return blocks + head * tokens + per_scored * scored


def memory_plan(a, *, lora_rank, targets, dropout, quantize, dtype, world, dist_mode, ref, batch, K, length,
                checkpointing, tile):
    """Per-GPU bytes of a training run (see print_plan). The model is built on the meta device: shapes only."""
    with torch.device("meta"):
        m = model_lib.Transformer(a)
    P = sum(p.numel() for p in m.parameters())
    c = dtype.itemsize
    full = lora_rank == 0
    base = torch.float32 if full else dtype  # what build_model stores: float32 master weights under full FT
    adapted = set(targets.split(",")) if lora_rank else set()
    if lora_rank:
        lora.inject(m, targets, lora_rank, 2.0 * lora_rank)
    A = sum(p.numel() for p in m.parameters() if p.requires_grad) if lora_rank else 0
    trainable = P if full else A
    matmul_weights = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear)) if full else A
    # NF4: 4 bits per weight + a bf16 absmax per block of 64 (lora.quantize_nf4) for the adapted linears
    q_numel = sum(mod.weight.numel() for mod in lora.lora_modules(m).values()) if quantize == "4bit" else 0
    weights = (P - q_numel) * base.itemsize + q_numel // 2 + math.ceil(q_numel / 64) * 2
    shard = world if world > 1 and dist_mode == "fsdp" else 1
    layer_params = sum(p.numel() for p in m.layers[0].parameters())
    r = dtype.itemsize if world > 1 else base.itemsize  # FSDP's param_dtype casts the weights to the compute dtype
    N = batch * K * (length - 1)  # every sequence padded to --max-length: the worst case
    act = {ck: activation_bytes(a, tokens=N, scored=N, full=full, adapted=adapted, rank=lora_rank, dropout=dropout,
                                r=r, c=c, checkpointing=ck) for ck in (False, True)}
    rows, cols = min(tile[0], N), min(tile[1], a.vocab_size)
    # forward: the float32 logits tile, its cast for e @ W, the running p @ W; backward (head trains): the
    # same tile, g h [N, d] and dW in float32 then cast
    workspace = rows * cols * (4 + c) + rows * a.dim * 4 + (N * a.dim * 4 + a.vocab_size * a.dim * (4 + c) if full else 0)
    out = {
        # FSDP2 shards parameters, not buffers: the NF4 codes (buffers) stay whole on every GPU
        "weights": ((P - q_numel) * base.itemsize) // shard + weights - (P - q_numel) * base.itemsize,
        "adapters (float32)": A * 4 // shard,
        "gradients (float32)": trainable * 4 // shard,
        "AdamW states (2 x float32)": trainable * 8 // shard,
        # autocast casts each float32 weight a matmul reads (not the embedding's, not the norms') to the compute
        # dtype and keeps the copy until backward; FSDP's mixed precision instead gathers each block in the
        # compute dtype, two blocks at a time (the one computing and the one prefetched)
        "weight copies (autocast / FSDP gather)": (2 * layer_params * c if world > 1 else
                                                   matmul_weights * c if c != 4 else 0),
        "frozen reference copy (--ref copy)": weights // shard if ref == "copy" else 0,
        "activations (no --checkpointing)": act[False],
        "activations (--checkpointing)": act[True],
        "log-prob workspace (nca.TILE)": workspace,
    }
    fixed = sum(v for k, v in out.items() if not k.startswith("activations"))
    out["peak in training"] = fixed + act[checkpointing]
    biggest = max(p.numel() for p in m.parameters())
    # load: one process builds the model one tensor at a time on its GPU; under --quantize 4bit the 16-bit base
    # is never whole (lora.qlora): the NF4 weights plus one tensor in flight, at most a preset's float32 draw,
    # its cast, and quantize_nf4's float32 copy and int32 codes. Under torchrun rank 0 reads it onto its CPU and
    # each GPU receives its shards one tensor at a time (shard)
    if world > 1:
        out["peak at load"] = out["weights"] + out["adapters (float32)"] + biggest * base.itemsize
    else:
        out["peak at load"] = (weights + biggest * (12 + c) if quantize == "4bit" else P * base.itemsize) + A * 4
    # export (host memory of rank 0, final_model): the model in the training dtype plus one float32 product;
    # several processes first gather the state as stored (full fine-tuning: float32), then cast it
    out["peak at export (host)"] = (P * base.itemsize if world > 1 else P * c) + biggest * 4
    return out


def print_plan(args):
    """--plan: what a run with these flags needs per GPU, from the model's config alone."""
    init_dir = resolve_init(args.init)
    a = init_args(init_dir, args.init)
    K = args.k or len(prepare_examples(args.data, args, "--data")[0].responses)  # one K for all (prepare_examples)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16  # on CUDA auto means bf16
    ref = "none" if args.loss == "sft" else args.ref if args.ref != "auto" else "adapters" if args.lora_rank else "precompute"
    plan = memory_plan(a, lora_rank=args.lora_rank, targets=args.lora_targets, dropout=args.lora_dropout,
                       quantize=args.quantize, dtype=dtype, world=args.nproc, dist_mode=args.dist, ref=ref,
                       batch=args.batch_size, K=K, length=args.max_length, checkpointing=args.checkpointing,
                       tile=nca.TILE["cuda"])
    print(f"--init {args.init}: {a}\nper GPU, {args.nproc} process(es), --batch-size {args.batch_size} x K = {K} "
          f"sequences of --max-length {args.max_length} tokens, {dtype}:")
    for k, v in plan.items():
        print(f"  {k:42s} {v / 2**30:9.2f} GiB")
    if args.gpu_memory:
        need = max(plan["peak in training"], plan["peak at load"])
        print(f"{'fits' if need <= args.gpu_memory * 2**30 else 'does NOT fit'} in --gpu-memory {args.gpu_memory:g} GiB "
              f"(needs {need / 2**30:.2f} GiB; the CUDA context and the allocator's slack, ~1 GiB, not counted)")
    return plan


# ----------------------------------------------------------------------------- the reference policy mu

@torch.no_grad()
def reference_cache(run, model, tok, examples, data_path, key):
    """log mu(y|x) [N, K] for every example, computed once and stored beside the data.

    The file holds the hash of everything the numbers depend on (model weights or preset + seed, the
    examples after pairing, tokenizer, template, max lengths, dtype) and is named by it, so a changed input
    makes a new file; a file that does not hold what its name promises (cut short, overwritten, another
    shape) is said so and recomputed. Each rank computes a share; rank 0 writes.
    """
    h = hashlib.sha256(json.dumps([key, [asdict(e) for e in examples], run.tokenizer, run.template,
                                   run.max_length, run.max_prompt_length]).encode()).hexdigest()
    cache = Path(f"{data_path}.ref-{h[:16]}.pt")
    if cache.is_file():
        try:
            saved = model_lib.torch_load(cache, "reference cache")
            why = ("not a reference cache" if not isinstance(saved, dict) or set(saved) != {"key", "logps"} else
                   "made for other inputs" if saved["key"] != h else
                   f"shape {list(saved['logps'].shape)}, expected [{len(examples)}, {run.K}]"
                   if saved["logps"].shape != (len(examples), run.K) else None)
        except ValueError as e:
            why = str(e).split(": ", 1)[1]
        if why is None:
            return saved["logps"]
        if run.master:
            print(f"reference cache {cache} ignored ({why}): recomputing it")
    mine, out = list(range(run.rank, len(examples), run.world)), [torch.zeros(0)]
    n_batches = math.ceil(math.ceil(len(examples) / run.world) / run.batch_size)  # the same on every rank: FSDP
    for b in range(n_batches):                                                    # gathers weights collectively
        ids = mine[b * run.batch_size:(b + 1) * run.batch_size]
        with autocast(run):
            logps = log_probs(model, collate(run, tok, [examples[j] for j in ids or [0]]))  # [B, K]
        out.append(logps.float().cpu()[:len(ids)])  # a filler batch (no ids) keeps nothing
    parts = [(mine, torch.cat(out))]
    if run.world > 1:  # every rank's share, to every rank
        parts, share = [None] * run.world, parts[0]
        dist.all_gather_object(parts, share)
    ref = torch.zeros(len(examples), run.K)  # [N, K]
    for idx, vals in parts:
        ref[idx] = vals.view(len(idx), -1)
    if run.master:
        model_lib.atomic_write(cache, lambda f: torch.save({"key": h, "logps": ref}, f))
        print(f"reference log-probs of {len(examples)} examples cached in {cache}")
    return ref


def reference_logps(run, model, ref, ids, batch):
    """log mu(y|x) [B, K] of a micro-batch, whichever way this run gets the reference policy mu:
        precompute  ref is the [N, K] cache of the initial weights (reference_cache), ids index it
        adapters    the policy itself with its LoRA adapters switched off: at B = 0 the model IS mu
        copy        ref is a frozen copy of the initial model
    (None for SFT, which has no reference.)"""
    if run.ref == "none":
        return None
    if run.ref == "precompute":
        return to_device(ref[ids], run.device)
    with torch.no_grad(), autocast(run), lora.disabled(model) if run.ref == "adapters" else nullcontext():
        return log_probs(ref if run.ref == "copy" else model, batch)


# ----------------------------------------------------------------------------- one micro-batch

def to_device(t, device):
    """A host tensor onto the device without making the host wait: CUDA copies from pageable memory
    synchronously (the host waits for the queued kernels), from pinned memory asynchronously."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def forward(run, model, tok, ref, examples, ids):
    """(loss, metrics, tokens) of one micro-batch of prompts examples[ids]; tokens counts each prompt token once
    plus each response token, whatever the layout. Nothing here waits for the device (tests/test_train.py
    counts): the batch is made on the host and copied asynchronously, the scored positions come from
    collate, value checks run on the device (nca.require), and the metrics stay 0-dim tensors or numbers
    until the step's one all_mean."""
    batch = collate(run, tok, [examples[i] for i in ids])
    rewards = batch["rewards"]
    with autocast(run):
        logps = log_probs(model, batch)  # [B, K] float32
    stats = {"truncated": batch["responses_truncated"] / rewards.numel()}  # share of responses cut at --max-length
    if run.loss == "sft":  # mean NLL per response token, averaged over sequences
        return -(logps / batch["response_lengths"].clamp(min=1)).mean(), stats, batch["n_tokens"]
    ref_logps = reference_logps(run, model, ref, ids, batch)  # [B, K]
    temperature = {} if run.loss in nca.PAIR_LOSSES else {"alpha": run.alpha}  # pairs have no reward temperature
    loss = nca.LOSSES[run.loss](logps, ref_logps, rewards, beta=run.beta, **temperature).mean()
    return loss, {**nca.metrics(logps.detach(), ref_logps, rewards, beta=run.beta), **stats}, batch["n_tokens"]


@torch.no_grad()
def evaluate(run, model, tok, ref, examples):
    """Loss and metrics over the held-out examples; every rank runs the same number of forwards
    (FSDP gathers weights collectively) and weighs its means by the rows that are not filler."""
    model.eval()  # no LoRA dropout: the metrics are deterministic and draw nothing from training's RNG
    mine = list(range(run.rank, len(examples), run.world))
    n_batches = math.ceil(math.ceil(len(examples) / run.world) / run.batch_size)
    sums, n = {}, 0
    for b in range(n_batches):
        ids = mine[b * run.batch_size:(b + 1) * run.batch_size]
        loss, stats, _ = forward(run, model, tok, ref, examples, ids or [0])
        for k, v in {"loss": loss, **stats}.items():
            sums[k] = sums.get(k, 0.0) + v * len(ids)
        n += len(ids)
    totals = all_mean([*sums.values(), n], run)  # per-rank sums: their ratio is the global mean
    model.train()
    return {k: v / totals[-1] for k, v in zip(sums, totals)}


def all_mean(values, run):
    """Mean over ranks of a list of numbers and 0-dim tensors, as floats: one all-reduce, ON the device
    (NCCL serves CUDA tensors only), and the step's one host sync."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=run.device) for v in values])
    if run.world > 1:
        dist.all_reduce(t)
        t /= run.world
    return t.tolist()


# ----------------------------------------------------------------------------- training

def train(args):
    rank, world, device = setup_distributed(args)
    examples, eval_examples, eval_path = load_data(args)
    run = configure(args, examples, rank, world, device)
    tok = data.load_tokenizer(run.tokenizer)
    ckpt = read_checkpoint(run) if args.resume else None  # now, not after the reference log-probs
    if (run.out / "ckpt" / "state.pt").is_file() and not args.resume:  # a fresh run would overwrite it
        raise ValueError(f"--out {run.out} holds the checkpoint of an earlier run ({run.out / 'ckpt' / 'state.pt'}):"
                         " pass --resume to continue it, or another --out to start afresh")

    model, frozen = build_model(run, tok)
    trainable, total = lora.count_parameters(model)
    if run.master:
        print(f"{len(examples)} training prompts x K = {run.K}, {len(eval_examples)} held out | {trainable:,} of "
              f"{total:,} parameters train | reference: {run.ref} | {world} process(es), global batch "
              f"{run.global_batch} prompts | {run.steps} steps")
    samples = (eval_examples or examples)[:run.sample]
    if run.sample and world == 1:  # before compiling: generation's growing KV cache is no shape to compile for
        print_samples(run, model, tok, samples, "before")
    if run.compile:
        for block in model.layers:
            block.compile()
    if world > 1:
        shard(model, run)
        if frozen is not None:
            shard(frozen, run)
    # now, before any forward: a forward without backward leaves the root's parameters gathered (FSDP2 does not
    # reshard the root after forward), and those are not the sharded parameters that train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=run.lr, betas=(0.9, 0.95), weight_decay=run.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, run))
    if world > 1 and run.sample:  # every rank generates (FSDP gathers the weights collectively), rank 0 prints
        print_samples(run, model, tok, samples, "before")
    ref, eval_ref = frozen, frozen
    if run.ref == "precompute":  # before any training: with LoRA the fresh adapters are zero anyway
        key = [init_key(run), run.quantize, str(run.base_dtype), str(run.dtype)]
        with lora.disabled(model) if run.lora_rank else nullcontext():
            ref = reference_cache(run, model, tok, examples, args.data, key)
            eval_ref = reference_cache(run, model, tok, eval_examples, eval_path, key) if eval_examples else None
    start = resume(run, ckpt, model, optimizer, schedule) if ckpt else start_log(run)

    model.train()
    t0, log = time.time(), {}
    for step in range(start, run.steps):
        t_step, sums, n_tok = time.time(), {}, 0
        ids = batch_indices(step, len(examples), run.global_batch, run.seed)[rank::world]  # this rank's share
        for m in range(run.grad_accum):
            loss, stats, ntok = forward(run, model, tok, ref, examples, ids[m * run.batch_size:(m + 1) * run.batch_size])
            (loss / run.grad_accum).backward()
            for k, v in {"loss": loss.detach(), **stats}.items():
                sums[k] = sums.get(k, 0.0) + v / run.grad_accum
            n_tok += ntok
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.grad_clip or math.inf)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        *vals, grad_norm = all_mean([*sums.values(), grad_norm], run)  # the step's one host sync
        log = dict(zip(sums, vals))
        if not (math.isfinite(log["loss"]) and math.isfinite(grad_norm)):  # before the update: weights stay clean
            raise FloatingPointError(f"non-finite loss {log['loss']} or gradient norm {grad_norm} at step "
                                     f"{step + 1}: stopped, nothing saved (last good checkpoint: "
                                     f"{run.out / 'ckpt' / 'state.pt'}); try a lower --lr or --beta")
        lr_used = schedule.get_last_lr()[0]  # after schedule.step() it is the next step's
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done, elapsed = step + 1, time.time() - t0
        record = {"step": done, "split": "train", **log, "lr": lr_used, "grad_norm": grad_norm,
                  "tokens_per_s": n_tok * world / (time.time() - t_step), "elapsed_s": elapsed}
        if run.master:
            data.append_jsonl(run.out / "metrics.jsonl", record)
            print(progress_line(record, run.steps, elapsed / (done - start) * (run.steps - done)), flush=True)
        if eval_examples and (done % run.eval_every == 0 or done == run.steps):
            ev = evaluate(run, model, tok, eval_ref, eval_examples)
            if run.master:
                data.append_jsonl(run.out / "metrics.jsonl", {"step": done, "split": "eval", **ev})
                print(f"eval step {done}: " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()), flush=True)
            log.update({f"eval/{k}": v for k, v in ev.items()})
        if done % run.save_every == 0 or done == run.steps:
            save_checkpoint(run, model, optimizer, schedule, done)
    finish(run, model, tok, samples)
    return log


def lr_factor(run, s):
    """Linear warmup over run.warmup steps, then cosine decay to 0 at run.steps."""
    if s < run.warmup:
        return (s + 1) / run.warmup
    return 0.5 * (1 + math.cos(math.pi * (s - run.warmup) / max(1, run.steps - run.warmup)))


def finish(run, model, tok, sample_examples):
    """The curves, the samples after training, and the trained policy as a plain model (LoRA merged) in OUT/final."""
    if run.master:
        plot_curves(run.out)
    if run.sample:  # from the model it trained (LoRA unmerged, on its NF4 base; sharded: every rank generates)
        print_samples(run, model, tok, sample_examples, "after")
    if run.export:
        final = final_model(run, model)
        if run.master:
            export_final(run, final, run.out / "final")
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def progress_line(r, steps, eta):
    parts = [f"step {r['step']}/{steps}", f"loss {r['loss']:.4f}"]
    if "rewards/accuracies" in r:
        parts += [f"acc {r['rewards/accuracies']:.2f}",
                  f"log pi/mu chosen {r['logratio/chosen']:+.3f} rejected {r['logratio/rejected']:+.3f}",
                  f"margin {r['rewards/margins']:+.4f}"]
    parts += [f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:,.0f} tok/s", f"{hms(r['elapsed_s'])} elapsed",
              f"ETA {hms(eta)}"]
    return " | ".join(parts)


def hms(seconds):
    return str(datetime.timedelta(seconds=int(seconds)))


# ----------------------------------------------------------------------------- checkpoints and export

def save_checkpoint(run, model, optimizer, schedule, step):
    """Model (or only the adapters), optimizer, schedule, step (= data position), per-rank RNG, written
    atomically. One process: one file, OUT/ckpt/state.pt. Under torchrun nothing is gathered: each rank writes
    its own shards with PyTorch Distributed Checkpoint into OUT/ckpt/step-N/ (built as step-N.tmp, files
    fsynced, then renamed), and only then rank 0 replaces state.pt, which holds the rest and names that
    directory. A save that fails anywhere before leaves the previous state.pt and the directory it names."""
    # with LoRA the frozen base is --init itself: keep only what trains (and do not copy 7B frozen weights to
    # the CPU to drop them)
    opts = StateDictOptions(full_state_dict=run.world == 1, cpu_offload=run.world == 1,
                            ignore_frozen_params=bool(run.lora_rank))
    if run.world > 1:
        model.reshard()  # a forward without backward (evaluate) leaves the root gathered: the state-dict
        # utilities find the optimizer's parameters, the sharded ones, among the model's only once resharded
    state = get_model_state_dict(model, options=opts)
    if run.lora_rank:
        state = lora.adapter_state(state)
    optim = get_optimizer_state_dict(model, optimizer, options=opts)
    ckpt = {"step": step, "schedule": schedule.state_dict(), "model_args": asdict(model.args),
            "config": resume_key(run), "world": run.world}
    rng = [(torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None)]
    path = run.out / "ckpt" / "state.pt"
    if run.world == 1:
        model_lib.atomic_write(path, lambda f: torch.save({**ckpt, "model": state, "optimizer": optim, "rng": rng}, f))
        return
    shards = run.out / "ckpt" / f"step-{step}"
    tmp = shards.with_name(shards.name + ".tmp")
    if run.master:  # left by a save that failed, or that no state.pt names (a later step than the resumed one)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save({"model": state, "optimizer": optim}, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    except Exception as e:  # DCP gathers every rank's failure into one exception, raised on every rank
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise OSError(f"{shards}: write failed ({reason}); the previous checkpoint {path} is unchanged") from None
    rngs = [None] * run.world
    dist.all_gather_object(rngs, rng[0])
    if run.master:
        tmp.rename(shards)
        fd = os.open(shards.parent, os.O_RDONLY)  # the rename on disk before the state.pt that names it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        model_lib.atomic_write(path, lambda f: torch.save({**ckpt, "shards": shards.name, "rng": rngs}, f))
        for old in shards.parent.glob("step-*"):
            if old != shards:
                shutil.rmtree(old, ignore_errors=True)


def read_checkpoint(run):
    """state.pt, refused unless the run that saved it had the same settings (resume_key) and, if sharded,
    the same number of processes."""
    path = run.out / "ckpt" / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} does not exist")
    ckpt = model_lib.torch_load(path, "checkpoint of this train.py (--resume)", mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
        raise ValueError(f"--resume: {path} is not a checkpoint of this train.py (no settings recorded in it)")
    saved = ckpt["config"]
    diff = [f"{k} {saved.get(k)!r} (this run: {v!r})" for k, v in resume_key(run).items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"--resume: {path} was saved by a run with {', '.join(diff)}; resume with the same "
                         f"settings, or start afresh in another --out")
    if "shards" in ckpt and not (path.parent / ckpt["shards"]).is_dir():
        raise ValueError(f"--resume: {path} names the shards {path.parent / ckpt['shards']}, which do not exist")
    if ckpt.get("world", 1) != run.world:  # each rank restores its own RNG and shards
        raise ValueError(f"--resume: {path} was saved by {ckpt.get('world', 1)} process(es), this run has "
                         f"{run.world}: resume with the same number")
    return ckpt


def resume(run, ckpt, model, optimizer, schedule):
    """Restore everything a run's future depends on; drop the metrics logged after the checkpoint."""
    if ckpt["model_args"] != asdict(model.args):  # e.g. the --init directory now holds another model
        raise ValueError(f"--resume: {run.out / 'ckpt' / 'state.pt'} was saved for model {ckpt['model_args']}; "
                         f"--init {run.init} builds {asdict(model.args)}")
    opts = StateDictOptions(full_state_dict="shards" not in ckpt, strict=not run.lora_rank)
    model_state, optim_state = ckpt.get("model"), ckpt.get("optimizer")
    if "shards" in ckpt:  # each rank reads its own slices into the (sharded) state dicts it already has
        model.reshard()  # as in save_checkpoint: the reference pass left the root gathered
        model_state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=bool(run.lora_rank)))
        if run.lora_rank:
            model_state = lora.adapter_state(model_state)
        optim_state = get_optimizer_state_dict(model, optimizer)
        shards = run.out / "ckpt" / ckpt["shards"]
        try:
            dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=shards)
        except Exception as e:
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise ValueError(f"--resume: {shards}: not a readable sharded checkpoint ({type(e).__name__}"
                             f"{': ' + reason if reason else ''})") from None
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
    schedule.load_state_dict(ckpt["schedule"])
    cpu_rng, cuda_rng = ckpt["rng"][run.rank]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    if run.master:  # metrics logged after the checkpoint belong to the lost future
        rows = [r for r in data.read_jsonl(run.out / "metrics.jsonl", log=True) if r["step"] <= ckpt["step"]]
        data.write_jsonl(run.out / "metrics.jsonl", rows)  # atomically: a crash here keeps the old log
        print(f"resumed from {run.out / 'ckpt' / 'state.pt'} at step {ckpt['step']}")
    return ckpt["step"]


def start_log(run):
    """A fresh run: OUT/ckpt created only now, when every input has been checked; a fresh metrics log."""
    if run.master:
        try:
            (run.out / "ckpt").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {run.out}: cannot create {run.out / 'ckpt'} ({e.strerror})") from None
        (run.out / "metrics.jsonl").unlink(missing_ok=True)
    return 0


def final_model(run, model):
    """The trained policy as a plain Transformer on rank 0's CPU, in the dtype it trained in (--dtype: full
    fine-tuning's float32 master weights are rounded to it, as HF checkpoints are stored), LoRA merged
    (W + alpha/r B A) one weight at a time; the other ranks get None."""
    if run.world > 1:
        model.reshard()  # as in save_checkpoint: a last evaluate leaves the root gathered
    # one process: the weights where they are, copied to the host one at a time below, never all in float32
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=run.world > 1))
    if not run.master:
        return None
    if run.quantize == "4bit":  # merging into NF4 would requantise: merge into the 16-bit base as it is read again
        adapters = {k: v.cpu() for k, v in lora.adapter_state(state).items()}
        return load_base(run, "cpu", run.base_dtype, lora.merging(adapters, run.lora_alpha / run.lora_rank))
    for k, v in state.items():  # to the host one at a time (merged there, not beside the base on the GPU)
        state[k] = v.to("cpu", v.dtype if run.lora_rank else run.dtype)  # LoRA: the base is in --dtype already
    if run.lora_rank:
        state = lora.merged_state(state, run.lora_alpha / run.lora_rank)
    with torch.device("meta"):
        final = model_lib.Transformer(model.args)
    final.load_state_dict(state, assign=True)
    return final


def export_final(run, model, path):
    """HF layout via model.save_hf, plus the tokenizer (copied if it is a file) and template in config.json,
    so the next stage (evaluation, a second round) can load model and tokenizer from this one directory.
    Written beside it and swapped in whole: a failed export leaves an earlier OUT/final as it was."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    spec = run.tokenizer
    try:
        if spec != "byte":
            src = Path(spec)
            src = src if src.is_file() else data.tokenizer_file(src)
            tmp.mkdir(parents=True, exist_ok=True)
            model_lib.atomic_write(tmp / src.name, lambda f: f.write(src.read_bytes()))
            spec = src.name
        model_lib.save_hf(model, tmp, config={"nca_tokenizer": spec, "nca_template": run.template})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    print(f"exported {path} (Hugging Face layout)")


def print_samples(run, model, tok, examples, when):
    """Greedy continuations of the prompts, tokenized exactly as in training (collate's prompt part)."""
    prompts = data.prompt_ids([e.prompt for e in examples], tok, template=run.template,
                              max_length=run.max_length, max_prompt_length=run.max_prompt_length)
    training = model.training
    model.eval()  # no LoRA dropout in what the model says
    with autocast(run):  # a bf16 base under float32 adapters: the matmuls need autocast's common dtype
        outs = model_lib.generate(model, prompts, max_new_tokens=min(128, run.max_length - run.max_prompt_length),
                                  eos_id=data.end_of_turn(tok, run.template))  # stop where training ends a turn
    model.train(training)
    for e, o in zip(examples, outs if run.master else []):
        # a model whose vocabulary is larger than the tokenizer's (padded presets) may emit ids it cannot decode
        print(f"[{when}] {str(e.prompt)!r} -> {tok.decode([i for i in o if i < tok.vocab_size])!r}")


def plot_curves(out):
    """OUT/curves.png from OUT/metrics.jsonl: loss, chosen / rejected log-ratio log pi - log mu (the
    likelihood-decrease curve, nca.metrics), reward accuracy; eval points as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = data.read_jsonl(Path(out) / "metrics.jsonl", log=True)
    if not rows:
        raise FileNotFoundError(f"{out}/metrics.jsonl: no metrics to plot")
    panels = [("loss", ["loss"]), ("log pi - log mu", ["logratio/chosen", "logratio/rejected"]),
              ("reward accuracy", ["rewards/accuracies"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, keys) in zip(axes, panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            for j, k in enumerate(keys):
                pts = [(r["step"], r[k]) for r in rows if r.get("split") == split and k in r]
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


# ----------------------------------------------------------------------------- processes

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
        if args.plan:
            return print_plan(args)
        return train(args)
    except (ValueError, OSError, FloatingPointError) as e:  # bad input, a failed write, a blow-up: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
