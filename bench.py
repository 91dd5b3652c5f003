"""Benchmarks, one subcommand each: `python bench.py logprob | lora | train | gpu`.

Every number is a ratio measured side by side in one run (these machines are noisy), against the
best existing implementation we can run here. README records each table with its command.
"""
import argparse
import math
import statistics
import sys
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(runs, reps, device, reset):
    """Median seconds of each closure in runs (name -> fn) over reps rounds after a warm-up round.
    Rounds interleave the variants, so a burst of load elsewhere on the machine hits every one alike;
    reset() (clearing gradients) runs before each call, outside the timing."""
    times = {name: [] for name in runs}
    for i in range(reps + 1):
        for name, run in runs.items():
            reset()
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- logprob (nca.py)
def logprob_variants(N, d, V, *, frozen, device, dtype):
    """name -> fwd+bwd closure over the same inputs, and the inputs (h, W, targets, g = d loss / d log p)."""
    import torch.nn.functional as F

    import nca
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=gen).to(device, dtype).requires_grad_()
    W = (torch.randn(V, d, generator=gen) / d ** 0.5).to(device, dtype).requires_grad_(not frozen)
    t = torch.randint(0, V, (N,), generator=gen).to(device)
    g = torch.randn(N, generator=gen).to(device)  # d loss / d log p_n: differs per row, as in training
    ones = torch.ones(1, N, dtype=torch.bool, device=device)
    lce_options = getattr(torch.nn, "LinearCrossEntropyOptions", None)

    @torch.no_grad()
    def floor():  # the matmuls alone, as written: h @ W.T, dz @ W and (W trained) dz.T @ h
        z = h @ W.T  # [N, V], standing in for dz
        h.grad, W.grad = z @ W, None if frozen else z.T @ h

    rows, cols = nca.TILE.get(device.type, nca.TILE["cpu"])

    @torch.no_grad()
    def floor_tiled():  # the same matmuls over the fused kernel's tiles, into reused buffers: the tightest floor
        z, h.grad = torch.empty(min(rows, N), min(cols, V), device=device, dtype=dtype), torch.zeros_like(h)
        W.grad = None if frozen else torch.zeros_like(W)
        for i in range(0, N, rows):
            for j in range(0, V, cols):
                h_i, W_j = h[i:i + rows], W[j:j + cols]
                z_ij = torch.mm(h_i, W_j.T, out=z[:len(h_i), :len(W_j)])
                h.grad[i:i + rows].addmm_(z_ij, W_j)
                if not frozen:
                    W.grad[j:j + cols].addmm_(z_ij.T, h_i)

    variants = {
        "reference": lambda: (nca.sequence_logps(h[None], W, t[None], ones, impl="reference") @ g[:1]).backward(),
        "fused": lambda: (nca.FusedLogp.apply(h, W, t, (rows, cols)).float() @ g).backward(),
        "torch F.linear_cross_entropy": lambda: (F.linear_cross_entropy(h, W, t, reduction="none").float() @ -g).backward(),
        "floor: matmuls, full [N, V]": floor,
        "floor: matmuls, tiled": floor_tiled,
    }
    if lce_options is not None:  # torch >= 2.13: the chunked path, recomputing in backward for "none"
        variants["torch F.linear_cross_entropy chunked"] = lambda: (F.linear_cross_entropy(
            h, W, t, reduction="none", options=lce_options()).float() @ -g).backward()
    return variants, (h, W, t, g)


def logprob_peak_bytes(N, d, V, *, frozen, device, dtype, name):
    """Peak memory of one fwd+bwd of one variant above its inputs and the gradients it leaves.
    CUDA: the allocator's peak.
    CPU: the process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs), run in
    a fresh process per variant so no freed-but-kept heap of another variant hides an allocation."""
    variants, (h, W, *_) = logprob_variants(N, d, V, frozen=frozen, device=device, dtype=dtype)
    kept = lambda: sum(x.grad.nbytes for x in (h, W) if x.grad is not None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        variants[name]()
        return torch.cuda.max_memory_allocated() - before - kept()

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    variants[name]()
    return status("VmHWM:") - before - kept()


def bench_logprob(argv):
    """Fused log-probs vs the reference, torch's linear_cross_entropy and the matmul floor."""
    import subprocess
    p = argparse.ArgumentParser(prog="bench.py logprob")
    p.add_argument("--shapes", default="2048,512,32000;4096,1024,32000;2048,1024,128256", help="N,d,V;...")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per variant (median), after a warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 (e.g. --device cuda --dtype bfloat16)")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: "N,d,V,frozen,name" in a fresh process
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.peak_of:
        N, d, V, frozen, name = args.peak_of.split(",", 4)
        print(logprob_peak_bytes(int(N), int(d), int(V), frozen=frozen == "1", device=device, dtype=dtype, name=name))
        return

    print(f"fwd+bwd of per-token log p, {args.dtype} on {args.device}, {args.threads} threads, median of {args.reps}")
    print("peak = memory above the inputs and the gradients left in h.grad / W.grad (the workspace), "
          + ("the CUDA allocator's peak" if device.type == "cuda" else "resident high-water mark, a fresh process each"))
    for shape in args.shapes.split(";"):
        N, d, V = map(int, shape.split(","))
        for frozen in (False, True):
            variants, (h, W, *_) = logprob_variants(N, d, V, frozen=frozen, device=device, dtype=dtype)

            def reset():
                h.grad = W.grad = None
            t = interleaved_medians(variants, args.reps, device, reset)
            variants = h = W = None  # freed before the peak-memory runs
            peak = {}
            for name in t:
                if device.type == "cuda":
                    peak[name] = logprob_peak_bytes(N, d, V, frozen=frozen, device=device, dtype=dtype, name=name)
                else:
                    cmd = [sys.executable, __file__, "logprob", "--threads", str(args.threads), "--dtype", args.dtype,
                           "--peak-of", f"{N},{d},{V},{int(frozen)},{name}"]
                    peak[name] = int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            floor, tiled, ref = (t[k] for k in ("floor: matmuls, full [N, V]", "floor: matmuls, tiled", "reference"))
            print(f"\n(N, d, V) = ({N}, {d}, {V}), W {'frozen' if frozen else 'trained'}")
            print(f"  {'':38s} {'seconds':>8s} {'/floor':>7s} {'/tiled':>7s} {'/ref':>6s} {'peak MiB':>9s} {'/ref':>6s}")
            for name in t:
                print(f"  {name:38s} {t[name]:8.3f} {t[name] / floor:7.2f} {t[name] / tiled:7.2f} {t[name] / ref:6.2f} "
                      f"{peak[name] / 2**20:9.0f} {peak[name] / peak['reference']:6.3f}")


# ----------------------------------------------------------------------------- lora (lora.py)
def lora_memory(preset, r):
    """Bytes of the frozen weights of a whole model built on the meta device (shapes only, no RAM):
    the adapted linears in bf16 vs NF4; embeddings, norms and the LM head stay bf16 (as in QLoRA)."""
    import lora
    from model import PRESETS, Transformer
    with torch.device("meta"):
        model = Transformer(PRESETS[preset]).to(torch.bfloat16)
    whole = sum(p.numel() for p in model.parameters()) * 2
    mods = lora.lora_modules(lora.inject(model, r=r, alpha=2.0 * r)).values()
    linears = sum(m.weight.numel() for m in mods) * 2
    lora.quantize_4bit(model)
    nf4 = sum(m.weight_nf4.nbytes + m.weight_absmax.nbytes for m in mods)
    return whole, linears, nf4, lora.count_parameters(model)[0]


def lora_time(out_f, in_f, *, tokens, r, reps, device, dtype):
    """Median forward+backward seconds of one [out, in] projection per variant, interleaved rounds."""
    import copy

    import lora
    trainable = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    frozen = copy.deepcopy(trainable).requires_grad_(False)
    adapted = lora.LoRALinear(copy.deepcopy(frozen), r, 2.0 * r)
    nf4 = lora.quantize_4bit(lora.LoRALinear(copy.deepcopy(frozen), r, 2.0 * r))
    variants = {"linear, frozen": frozen, "linear, trained (full FT)": trainable, f"LoRA r={r}": adapted,
                f"LoRA r={r} on NF4 base": nf4}
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)  # grad to x, as inside a model
    gy = torch.randn(tokens, out_f, device=device, dtype=dtype)
    runs = {name: lambda layer=layer: layer(x).backward(gy) for name, layer in variants.items()}

    def reset():
        x.grad = None
        for layer in variants.values():
            layer.zero_grad(set_to_none=True)
    return interleaved_medians(runs, reps, device, reset)


def bench_lora(argv):
    p = argparse.ArgumentParser(prog="bench.py lora")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128, help="rows of x per forward (batch * sequence)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads: with 1, a core busy with other work "
                   "cannot stall every small op at an OpenMP barrier (seen on a shared 2-core machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32   # CPU bf16 matmuls are not representative
    from model import PRESETS
    print(f"## frozen weights, LoRA r={args.r} on q,k,v,o,gate,up,down (model built on the meta device)\n")
    print("| model | params | linears bf16 | linears NF4 | ratio | whole model bf16 | with NF4 linears | ratio | adapter params (bf16) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in ("tiny", "mistral-7b"):
        whole, linears, nf4, trainable = lora_memory(preset, args.r)
        with_nf4 = whole - linears + nf4
        gb = lambda n: f"{n / 2**30:.3f} GiB" if n > 2**28 else f"{n / 2**20:.2f} MiB"
        print(f"| {preset} | {whole / 2e6:.2f} M | {gb(linears)} | {gb(nf4)} | {linears / nf4:.2f}x | {gb(whole)} "
              f"| {gb(with_nf4)} | {whole / with_nf4:.2f}x | {trainable:,} = {gb(2 * trainable)} |")
    print(f"\n## forward+backward of one projection, {args.tokens} tokens, {dtype}, {device}, {args.threads} thread(s) "
          f"(median of {args.reps} interleaved rounds; ratio vs the frozen linear)\n")
    print("| layer [out, in] | variant | ms | ratio |")
    print("|---|---|---|---|")
    for preset in ("tiny", "mistral-7b"):
        a = PRESETS[preset]
        reps = args.reps * 10 if preset == "tiny" else args.reps    # tiny layers are fast and noisy
        times = lora_time(a.dim, a.dim, tokens=args.tokens, r=args.r, reps=reps, device=device, dtype=dtype)
        for name, t in times.items():
            print(f"| {preset} wq [{a.dim}, {a.dim}] | {name} | {t * 1e3:.2f} | {t / times['linear, frozen']:.2f}x |")


# ----------------------------------------------------------------------------- train (train.py)
TRAIN_VARIANTS = {
    "plain, frozen copy": "a plain loop: full [B*K, T, V] logits, log_softmax, gather; reference = frozen copy",
    "plain, precomputed": "the same loop, reference log-probs read from a precomputed cache",
    "train.py": "nca.batch_logps (one forward, nca's fused log-prob) + precomputed reference",
    "train.py, packed": "the same, each prompt once for its K responses (data.packed_batch, nca.packed_logps)",
}


def train_variant(variant, vocab, steps, threads):
    """Run in a fresh process (so ru_maxrss is this variant's own peak): tokens/s of full training steps
    (forward, NCA loss, backward, AdamW) on a dim-256 Llama-shaped model, 8 pairs of 64 + 192 tokens."""
    import copy
    import json
    import resource

    import data
    import nca
    from model import ModelArgs, Transformer
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=688, vocab_size=vocab,
                                  max_seq_len=256))
    ref_model = copy.deepcopy(model).requires_grad_(False) if variant == "plain, frozen copy" else None
    B, K, P, R = 8, 2, 64, 192
    tokens = torch.randint(0, vocab, (B * K, P + R))  # [B*K, T]
    mask = torch.zeros(B * K, P + R, dtype=torch.bool)
    mask[:, P:] = True  # the response tokens are scored
    rewards = torch.tensor([[1.0, 0.0]] * B)  # [B, K]
    cached_ref = torch.randn(B, K) - 400  # what a precomputed cache hands over: a lookup
    packed = {**data.packed_batch([(tokens[b * K, :P].tolist(), [r[P:].tolist() for r in tokens[b * K:b * K + K]])
                                   for b in range(B)], pad_id=0), "rewards": rewards}

    def plain_logps(m):  # the readable reference: full [B*K, T-1, V] logits
        return nca.sequence_logps_reference(m.hidden(tokens[:, :-1]), m.output.weight, tokens[:, 1:],
                                            mask[:, 1:]).view(B, K)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    times = []
    for i in range(steps + 1):  # step 0 warms up (allocator, first-touch pages)
        t0 = time.perf_counter()
        if variant == "train.py":
            logps, ref = nca.batch_logps(model, tokens, mask).view(B, K), cached_ref
        elif variant == "train.py, packed":
            logps, ref = nca.packed_logps(model, packed), cached_ref
        else:
            logps = plain_logps(model)
            if ref_model is None:
                ref = cached_ref
            else:
                with torch.no_grad():
                    ref = plain_logps(ref_model)
        nca.nca_loss(logps, ref, rewards, alpha=0.01, beta=0.01).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    print(json.dumps({"tokens_per_s": B * K * (P + R) / step_s, "step_s": step_s,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


# --lengths ultrafeedback: micro-batches of 2 prompts x K = 4 responses with UltraFeedback-like lengths
# (issue 14): prompt ~ LogNormal(median 100, sigma 0.8) cut to [8, 512] (mean ~140, 1% at 512); response ~
# LogNormal(median 250, sigma 0.5) cut to [1, 1024 - prompt] (mean ~280). Token ids are random: the cost
# of a step does not depend on them.
PACK_SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192),  # PRESETS["tiny"]
    "wide": dict(dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32000, hidden_dim=2816),
}
PACK_B, PACK_K, PACK_MAX = 2, 4, 1024


def ultrafeedback_groups(gen, vocab):
    """One micro-batch: [(prompt ids, [K response ids])] * PACK_B with the lengths above."""
    def ids(n):
        return torch.randint(0, vocab, (n,), generator=gen).tolist()

    def lognormal(median, sigma):
        return math.exp(math.log(median) + sigma * torch.randn((), generator=gen).item())
    groups = []
    for _ in range(PACK_B):
        P = min(max(round(lognormal(100, 0.8)), 8), 512)
        groups.append((ids(P), [ids(min(max(round(lognormal(250, 0.5)), 1), PACK_MAX - P)) for _ in range(PACK_K)]))
    return groups


def pack_variant(shape, path, steps, threads, pack_tokens, device):
    """Run in a fresh process (its peak memory is this path's own: ru_maxrss, or CUDA's allocator peak):
    forward + backward of the NCA loss over steps + 1 seeded micro-batches (the first warms up), padded (collate's layout, batch_logps) or packed
    (data.packed_batch, packed_logps). Tokens counted: each prompt token once plus each response token."""
    import json
    import resource

    from torch.utils.flop_counter import FlopCounterMode

    import data
    import nca
    from model import ModelArgs, Transformer
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device)
    model = Transformer(ModelArgs(**PACK_SHAPES[shape], max_seq_len=PACK_MAX)).to(device)
    gen = torch.Generator().manual_seed(0)
    rewards = torch.arange(PACK_K, dtype=torch.float32, device=device).expand(PACK_B, PACK_K)  # [B, K]

    def step(groups):  # -> the tokens the transformer ran over
        if path == "padded":
            b = data.padded_batch(groups, pad_id=0)
            logps = nca.batch_logps(model, b["tokens"].to(device), tuple(x.to(device) for x in b["scored"]))
            logps = logps.view(PACK_B, PACK_K)
        else:
            b = {k: tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device)
                 for k, v in data.packed_batch(groups, pad_id=0, pack_tokens=pack_tokens).items()}
            b["rewards"] = rewards
            logps = nca.packed_logps(model, b)
        nca.nca_loss(logps, logps.detach() - 1, rewards, alpha=1.0, beta=0.1).mean().backward()
        model.zero_grad(set_to_none=True)
        return b["tokens"].numel()

    batches = [ultrafeedback_groups(gen, model.args.vocab_size) for _ in range(steps + 1)]  # the first warms up
    times, computed = [], []
    for groups in batches:
        sync(device)
        t0 = time.perf_counter()
        computed.append(step(groups))
        sync(device)
        times.append(time.perf_counter() - t0)
    with FlopCounterMode(display=False) as flops:  # again, untimed: counting dispatches every op through Python
        for groups in batches[1:]:
            step(groups)
    counted = [sum(len(p) + sum(map(len, rs)) for p, rs in groups) for groups in batches]
    print(json.dumps({"tokens_per_s": sum(counted[1:]) / sum(times[1:]), "computed_x": sum(computed) / sum(counted),
                      "gflop": flops.get_total_flops() / 1e9 / steps,
                      "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_pack(args):
    import json
    import subprocess
    print(f"forward + backward (NCA loss), {PACK_B} prompts x K = {PACK_K} per micro-batch, UltraFeedback-like "
          f"lengths (bench.py: PACK_SHAPES), float32 on {args.device} ({args.threads} CPU threads), pack_tokens "
          f"{args.pack_tokens}; "
          f"each path in a fresh process, {args.steps} seeded micro-batches after one warm-up, best of {args.rounds} "
          f"interleaved rounds. tokens/s counts each prompt token once plus each response token; 'computed' is "
          f"the tokens the transformer runs over, per counted token; GFLOP: matmul FLOPs per micro-batch (torch's "
          f"FlopCounterMode; it counts no CPU attention kernel), whose ratio is the speed-up if matmuls were all; "
          f"peak MB: RSS on CPU, allocated on CUDA")
    print(f"{'shape':>5} {'path':7s} {'tokens/s':>9} {'computed':>9} {'GFLOP':>7} {'flop x':>7} {'peak MB':>8} "
          f"{'speed x':>8} {'mem x':>6}")
    for shape in args.shapes:
        rows = {}
        for _ in range(args.rounds):
            for path in ("padded", "packed"):
                out = subprocess.run([sys.executable, __file__, "train", "--lengths", "ultrafeedback", "--variant",
                                      path, "--shapes", shape, "--steps", str(args.steps), "--threads",
                                      str(args.threads), "--pack-tokens", str(args.pack_tokens), "--device",
                                      args.device],
                                     capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                if path not in rows or r["tokens_per_s"] > rows[path]["tokens_per_s"]:
                    rows[path] = r
        for path, r in rows.items():
            print(f"{shape:>5} {path:7s} {r['tokens_per_s']:>9.0f} {r['computed_x']:>9.2f} {r['gflop']:>7.1f} "
                  f"{rows['padded']['gflop'] / r['gflop']:>7.2f} {r['peak_mb']:>8.0f} "
                  f"{r['tokens_per_s'] / rows['padded']['tokens_per_s']:>8.2f} "
                  f"{r['peak_mb'] / rows['padded']['peak_mb']:>6.2f}")


def bench_train(argv):
    """python bench.py train [--vocab 32000 128256] [--steps 2] [--rounds 2] [--threads 2];
    python bench.py train --lengths ultrafeedback [--shapes tiny wide] [--pack-tokens N]: padded vs packed"""
    import json
    import subprocess
    p = argparse.ArgumentParser(prog="bench.py train", description=bench_train.__doc__)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--steps", type=int, default=2, help="timed steps per process (median), after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all variants, interleaved; best round kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", choices=["fixed", "ultrafeedback"], default="fixed",
                   help="fixed: the training step below; ultrafeedback: padded vs packed batches (see PACK_SHAPES)")
    p.add_argument("--shapes", nargs="+", choices=sorted(PACK_SHAPES), default=["tiny", "wide"])
    p.add_argument("--pack-tokens", type=int, default=0, help="packed row budget (data.packed_batch); 0: train.py's "
                                                                "default, the micro-batch in one row")
    p.add_argument("--device", default="cpu", help="--lengths ultrafeedback: cpu or cuda")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    if args.lengths == "ultrafeedback":
        if args.variant:
            return pack_variant(args.shapes[0], args.variant, args.steps, args.threads, args.pack_tokens,
                                args.device)
        return bench_pack(args)
    if args.variant:
        return train_variant(args.variant, args.vocab[0], args.steps, args.threads)
    print(f"training step, dim 256, 4 layers, 8 pairs (K = 2) x (64 + 192) tokens, float32, {args.threads} threads; "
          f"each variant in a fresh process, median of {args.steps} steps, best of {args.rounds} interleaved rounds")
    for name, what in TRAIN_VARIANTS.items():
        print(f"  {name:20s} {what}")
    print(f"{'vocab':>7} {'variant':20s} {'tokens/s':>9} {'peak MB':>8} {'speed x':>8} {'mem x':>6}")
    for vocab in args.vocab:
        rows = {}
        for _ in range(args.rounds):  # interleaved, so a burst of load elsewhere hits every variant alike
            for name in TRAIN_VARIANTS:
                out = subprocess.run([sys.executable, __file__, "train", "--variant", name, "--vocab", str(vocab),
                                      "--steps", str(args.steps), "--threads", str(args.threads)],
                                     capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                if name not in rows or r["tokens_per_s"] > rows[name]["tokens_per_s"]:
                    rows[name] = r
        base = rows["plain, frozen copy"]
        for name, r in rows.items():  # ratios against the plain loop with a frozen reference copy
            print(f"{vocab:>7} {name:20s} {r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>8.0f} "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:>8.2f} {r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f}")


# ----------------------------------------------------------------------------- gpu: everything a lent GPU should measure
# `python bench.py gpu` (issue 13, "Measure on a GPU when one is lent"): each part in its own process, one
# JSON line per figure; a part that fails prints its error as a JSON line and the next part runs.
# `--smoke` runs every part at toy sizes (e.g. `--smoke --device cpu`): numbers that only show the script works.
FULL = dict(N=8192, d=4096, V=(32000, 128256), preset="mistral-7b", K=4, T=1024, prompt=64, steps=5, reps=3,
            gen_prompt=128, gen_new=128)
SMOKE = dict(N=256, d=64, V=(512, 1000), preset="tiny", K=4, T=64, prompt=8, steps=1, reps=1, gen_prompt=8, gen_new=8)
# dense bf16 tensor-core peak (no sparsity), from NVIDIA's data sheets; --peak-tflops for other devices
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class Figures:
    """Prints one JSON line per figure, each naming its part, device and whether it is a smoke run."""

    def __init__(self, args, part):
        self.device = torch.device(args.device)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "host CPU"
        self.base = {"part": part, "device": f"{self.device} ({name})", "smoke": args.smoke}

    def __call__(self, figure, value, **context):
        import json
        print(json.dumps({**self.base, **context, "figure": figure, "value": value}), flush=True)


def peak_tflops(args):
    if args.peak_tflops:
        return args.peak_tflops
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


class HostPeak:
    """The process's resident high-water mark above its size on entry (VmHWM, reset through /proc/self/clear_refs)."""

    def __enter__(self):
        self.before = self.status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.bytes = self.status("VmHWM:") - self.before

    @staticmethod
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def device_peak(device, reset=False):
    """Bytes: the CUDA allocator's peak since the last reset; on the CPU the process's ru_maxrss."""
    import resource
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def gpu_logprob(args, s, out):
    """Fused log-prob vs the reference and torch's F.linear_cross_entropy, bf16, W trained: values and gradients
    against a float32 reference on the same bf16 inputs, time and peak memory as ratios to the reference."""
    import torch.nn.functional as F

    import nca
    device, dtype = torch.device(args.device), torch.bfloat16
    for V in s["V"]:
        shape = dict(N=s["N"], d=s["d"], V=V, dtype="bfloat16")
        variants, (h, W, t, g) = logprob_variants(s["N"], s["d"], V, frozen=False, device=device, dtype=dtype)
        rows = {"reference": lambda h, W: nca.sequence_logps_reference(h[:, None], W, t[:, None], t[:, None] >= 0),
                "fused": lambda h, W: nca.FusedLogp.apply(h, W, t, nca.TILE.get(device.type, nca.TILE["cpu"])),
                "torch F.linear_cross_entropy": lambda h, W: -F.linear_cross_entropy(h, W, t, reduction="none")}

        def value_and_grads(fn, h, W):
            h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
            logp = fn(h, W).float()
            (logp @ g).backward()
            return logp.detach(), h.grad.float(), W.grad.float()
        exact = value_and_grads(rows["reference"], h.float(), W.float())  # float32 logits of the same bf16 inputs
        for name, fn in rows.items():
            got = value_and_grads(fn, h, W)
            out("logp max abs error vs float32", (got[0] - exact[0]).abs().max().item(), variant=name, **shape)
            for what, a, b in zip(("d h", "d W"), got[1:], exact[1:]):
                out(f"{what} relative error vs float32", ((a - b).norm() / b.norm()).item(), variant=name, **shape)
        del exact

        def reset():
            h.grad = W.grad = None
        times = interleaved_medians({k: variants[k] for k in rows}, s["reps"], device, reset)
        variants = None
        peaks = {k: logprob_peak_bytes(s["N"], s["d"], V, frozen=False, device=device, dtype=dtype, name=k) for k in rows}
        for name in rows:
            out("fwd+bwd seconds", times[name], variant=name, **shape)
            out("time / reference", times[name] / times["reference"], variant=name, **shape)
            out("peak workspace MiB", peaks[name] / 2**20, variant=name, **shape)
            out("peak / reference", peaks[name] / peaks["reference"], variant=name, **shape)


def step_flops(a, *, tokens, length, scored, r, targets):
    """Model FLOPs of one NCA LoRA step: policy forward and backward, reference forward (adapters off). A matmul
    [m, k] x [k, n] counts 2mkn. The frozen base weights get no weight gradient under LoRA, so the backward
    through a base linear is one matmul (the input gradient), as much as its forward, not two; the adapters
    (targets, rank r) get both. Attention (QK^T and PV) is causal: half of the T x T square, backward twice the
    forward. The LM head runs on the scored tokens only (nca.FusedLogp): its forward, the input gradient (which
    the kernel forms in forward) and the reference's forward. tokens: the positions the model runs on (B K (T - 1)),
    scored: the response tokens. Not counted: the recompute of activation checkpointing (MFU counts the model's
    work, as PaLM's definition does), norms, softmax, RoPE."""
    hd = a.head_dim or a.dim // a.n_heads
    q, kv, d, F = a.n_heads * hd, a.n_kv_heads * hd, a.dim, a.hidden_dim
    shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, F), "up": (d, F), "down": (F, d)}
    base = 2 * sum(i * o for i, o in shapes.values()) * a.n_layers  # forward FLOPs per token
    adapters = 2 * sum(r * (i + o) for t, (i, o) in shapes.items() if t in targets) * a.n_layers
    attn = 2 * 2 * q * length / 2 * a.n_layers  # QK^T and PV per token of sequences of `length`, causal
    # block 0's q, k, v read the frozen embedding, which needs no gradient: their input gradients are skipped
    first = 2 * sum(i * o + (r * i if t in targets else 0) for t, (i, o) in shapes.items() if t in ("q", "k", "v"))
    n, head = tokens, 2 * a.vocab_size * d
    policy = n * (base + adapters + attn) + n * (base + 2 * adapters + 2 * attn - first) + 2 * scored * head
    reference = n * (base + attn) + scored * head
    return policy + reference


def gpu_lora_step(args, s, out, quantize):
    """train.py's own micro-batch (train.forward, one prompt x K responses of T tokens) on the mistral-7b preset
    (random init): LoRA r = 16 on all seven projections, NCA, bf16, checkpointing, reference = adapters off."""
    import json
    import tempfile
    import time as _time

    import data
    import model as model_lib
    import train
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/data.jsonl"
        with open(path, "w") as f:  # byte tokens: responses long enough to be cut at --max-length, every row T long
            f.write(json.dumps({"prompt": "q" * (s["prompt"] - 1), "responses": [c * s["T"] for c in "abcd"[:s["K"]]],
                                "rewards": [4.0, 3.0, 2.0, 1.0][:s["K"]]}) + "\n")
        flags = ["--data", path, "--init", s["preset"], "--lora-rank", "16", "--loss", "nca", "--checkpointing",
                 "--dtype", "bfloat16", "--max-length", str(s["T"]), "--max-prompt-length", str(s["prompt"]),
                 "--batch-size", "1", "--device", args.device, "--out", f"{tmp}/out", "--quantize", quantize,
                 "--no-pack"]  # the padded rows step_flops counts
        targs = train.parse_args(flags)
        examples = train.prepare_examples(path, targs, "--data")
        run = train.configure(targs, examples, 0, 1, device)
        tok = data.load_tokenizer("byte")
        device_peak(device, reset=True)
        t0 = _time.perf_counter()
        with HostPeak() as host:
            model, _ = train.build_model(run, tok)
        setup = dict(preset=s["preset"], lora_rank=16, quantize=quantize, K=s["K"], T=s["T"], loss="nca",
                     checkpointing=True, dtype="bfloat16", reference="adapters off")
        out("build seconds", _time.perf_counter() - t0, **setup)
        out("peak GiB at load" + (" (CUDA allocator)" if device.type == "cuda" else " (process RSS)"),
            device_peak(device, reset=True) / 2**30, **setup)
        out("host peak GiB at load (VmHWM above start)", host.bytes / 2**30, **setup)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95))
        times = []
        for i in range(s["steps"] + 1):  # step 0 warms up (allocator, kernels, optimizer states)
            sync(device)
            t0 = _time.perf_counter()
            loss, _, n_tok = train.forward(run, model, tok, None, examples, [0])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(_time.perf_counter() - t0)
        step = statistics.median(times[1:])
        flops = step_flops(model_lib.PRESETS[s["preset"]], tokens=s["K"] * (s["T"] - 1), length=s["T"],
                           scored=s["K"] * (s["T"] - s["prompt"]), r=16, targets=run.lora_targets.split(","))
        out("step seconds (median)", step, steps=s["steps"], tokens=n_tok, **setup)
        out("tokens/s", n_tok / step, **setup)
        out("peak GiB in training" + (" (CUDA allocator)" if device.type == "cuda" else " (process RSS)"),
            device_peak(device) / 2**30, **setup)
        out("model FLOPs per step", flops, count=" ".join(step_flops.__doc__.split()), **setup)
        peak = peak_tflops(args)
        out("MFU", flops / step / (peak * 1e12) if peak else None, peak_tflops=peak, **setup)


def build_random(preset, device):
    """The preset's shape, random init, in bf16 directly on the device (no float32 copy)."""
    import model as model_lib
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return model_lib.Transformer(model_lib.PRESETS[preset])
    finally:
        torch.set_default_dtype(default)


def gpu_io(args, s, out):
    """model.save_hf then model.load of the preset in bf16: seconds and host memory of each, and the round trip exact."""
    import shutil
    import tempfile
    import time as _time

    import model as model_lib
    device = torch.device(args.device)
    model = build_random(s["preset"], device)
    names = ("tok_embeddings.weight", "layers.0.attention.wq.weight", "output.weight")
    saved = {n: model.state_dict()[n].cpu() for n in names}
    tmp = tempfile.mkdtemp(dir=args.workdir)
    try:
        t0 = _time.perf_counter()
        with HostPeak() as host:
            model_lib.save_hf(model, tmp)
        out("save_hf seconds", _time.perf_counter() - t0, preset=s["preset"], dtype="bfloat16")
        out("save_hf host peak GiB (VmHWM above start)", host.bytes / 2**30, preset=s["preset"])
        out("checkpoint GiB on disk", sum(f.stat().st_size for f in __import__("pathlib").Path(tmp).iterdir()) / 2**30,
            preset=s["preset"])
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t0 = _time.perf_counter()
        with HostPeak() as host:
            model = model_lib.load(tmp, device=device, dtype=torch.bfloat16)
            sync(device)
        out("load seconds", _time.perf_counter() - t0, preset=s["preset"], to=str(device))
        out("load host peak GiB (VmHWM above start)", host.bytes / 2**30, preset=s["preset"])
        out("round trip exact", all(torch.equal(model.state_dict()[n].cpu(), saved[n]) for n in names),
            tensors=list(names))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gpu_generate(args, s, out):
    """model.generate, greedy, bf16: new tokens per second at batch 1 and 16 (prompts of random tokens, no EOS)."""
    import time as _time

    import model as model_lib
    device = torch.device(args.device)
    model = build_random(s["preset"], device)
    gen = torch.Generator().manual_seed(0)
    model_lib.generate(model, [[1, 2, 3]], max_new_tokens=2)  # warm-up
    for B in (1, 16):
        prompts = torch.randint(0, model.args.vocab_size, (B, s["gen_prompt"]), generator=gen).tolist()
        sync(device)
        t0 = _time.perf_counter()
        new = model_lib.generate(model, prompts, max_new_tokens=s["gen_new"])
        sync(device)
        seconds = _time.perf_counter() - t0
        out("generated tokens/s", sum(map(len, new)) / seconds, batch=B, prompt=s["gen_prompt"], new=s["gen_new"],
            preset=s["preset"], dtype="bfloat16")


def gpu_train_py(args, s, out):
    """Tiny `python train.py` runs on the device, each a process: seconds, exit status, last training loss."""
    import json
    import subprocess
    import tempfile
    import time as _time
    from pathlib import Path
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = f"{tmp}/data.jsonl"
        with open(path, "w") as f:
            for i in range(8):
                f.write(json.dumps({"prompt": f"{i}+{i}=", "responses": [str(2 * i), str(2 * i + 1), "no", "?"],
                                    "rewards": [9, 5, 3, 1]}) + "\n")
        common = ["--data", path, "--device", args.device, "--steps", str(s["steps"]), "--max-length", "32",
                  "--max-prompt-length", "8", "--batch-size", "4", "--beta", "0.1", "--lr", "1e-3"]
        runs = {"eager": ["--no-export"], "--compile": ["--compile", "--no-export"],
                "LoRA + 4-bit": ["--lora-rank", "8", "--quantize", "4bit", "--no-export"],
                "LoRA + --sample": ["--lora-rank", "8", "--sample", "2", "--no-export"],
                "export": [], "reload (--init OUT of export)": ["--no-export"]}
        for i, (name, flags) in enumerate(runs.items()):
            init = ["--init", f"{tmp}/run{i - 1}" if name.startswith("reload") else "tiny"]  # reload: the export's OUT
            outdir = f"{tmp}/run{i}"
            t0 = _time.perf_counter()
            p = subprocess.run([sys.executable, str(here / "train.py"), *common, *flags, *init, "--out", outdir],
                               capture_output=True, text=True, cwd=here)
            rows = [json.loads(line) for line in open(f"{outdir}/metrics.jsonl")] if p.returncode == 0 else []
            failed = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]} if p.returncode else {}
            out("train.py run", p.returncode == 0, run=name, seconds=_time.perf_counter() - t0,
                last_loss=next((r["loss"] for r in reversed(rows) if r["split"] == "train"), None), **failed)


GPU_PARTS = {
    "logprob": gpu_logprob,
    "lora-step": lambda args, s, out: gpu_lora_step(args, s, out, "none"),
    "lora-step-nf4": lambda args, s, out: gpu_lora_step(args, s, out, "4bit"),
    "save-load": gpu_io,
    "generate": gpu_generate,
    "train.py": gpu_train_py,
}


def run_gpu_parts(parts, flags, budget):
    """Each part in a fresh process (its own peak memory, and a crash or an out-of-memory ends only that part),
    within `budget` seconds in all; returns {part: (ok, figure lines)}."""
    import json
    import subprocess
    t_end, results = time.time() + budget, {}
    for name in parts:
        left = t_end - time.time()
        t0 = time.time()
        try:
            if left < 5:
                raise TimeoutError(f"not started: the {budget:.0f} s budget is spent")
            p = subprocess.run([sys.executable, __file__, "gpu", "--part", name, *flags], capture_output=True,
                               text=True, timeout=left)
            lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
            for line in lines:
                print(line, flush=True)
            if p.returncode:
                raise RuntimeError((p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1])
            results[name] = (True, [json.loads(line) for line in lines])
        except (subprocess.TimeoutExpired, TimeoutError, RuntimeError) as e:
            print(json.dumps({"part": name, "error": str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"}),
                  flush=True)
            results[name] = (False, [])
        print(f"# part {name!r}: {'ok' if results[name][0] else 'FAILED'} in {time.time() - t0:.1f} s", flush=True)
    return results


def bench_gpu(argv):
    """python bench.py gpu [--smoke] [--device cuda] [--parts a,b] [--budget 470]"""
    import json
    p = argparse.ArgumentParser(prog="bench.py gpu", description=bench_gpu.__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="every part at toy sizes: shows the script works, measures nothing")
    p.add_argument("--parts", default=",".join(GPU_PARTS), help="comma list of: " + ", ".join(GPU_PARTS))
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for MFU (default: known GPUs)")
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together (each gets what is left)")
    p.add_argument("--workdir", help="where the checkpoint round trip writes (default: the system's temp directory)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = p.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    if args.part:
        return GPU_PARTS[args.part](args, s, Figures(args, args.part))
    parts = args.parts.split(",")
    if bad := [x for x in parts if x not in GPU_PARTS]:
        raise SystemExit(f"bench.py gpu: unknown part(s) {bad}; expected some of {list(GPU_PARTS)}")
    flags = ["--device", args.device] + ["--smoke"] * args.smoke + ["--peak-tflops", str(args.peak_tflops)] * bool(
        args.peak_tflops) + ["--workdir", args.workdir] * bool(args.workdir)
    print(f"# bench.py gpu{' --smoke (toy sizes: no number below is a measurement)' if args.smoke else ''}, "
          f"every part on --device {args.device}, each in its own process; one JSON line per figure")
    results = run_gpu_parts(parts, flags, args.budget)
    steps = {q: next((f["value"] for f in results.get(q, (0, []))[1] if f["figure"] == "step seconds (median)"), None)
             for q in ("lora-step", "lora-step-nf4")}
    if all(steps.values()):
        print(json.dumps({"part": "summary", "smoke": args.smoke, "figure": "NF4 step / bf16-base step",
                          "value": steps["lora-step-nf4"] / steps["lora-step"]}))
    for name, (ok, figures) in results.items():
        devices = sorted({f["device"] for f in figures}) or ["-"]
        print(f"# {name:22s} {'ok' if ok else 'FAILED':6s} {len(figures):3d} figures on {', '.join(devices)}")
    return results


BENCHES = {"logprob": bench_logprob, "lora": bench_lora, "train": bench_train, "gpu": bench_gpu}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted(BENCHES))
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the benchmark's own flags (bench.py NAME -h)")
    args = p.parse_args()
    BENCHES[args.bench](args.flags)
