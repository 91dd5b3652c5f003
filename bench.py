"""Benchmarks, one subcommand each: `python bench.py logprob | lora | train`.

Every number is a ratio measured side by side in one run (these machines are noisy), against the
best existing implementation we can run here. README records each table with its command.
"""
import argparse
import sys

import torch


# ----------------------------------------------------------------------------- logprob (nca.py)
# (section owned by the fused-kernel work)


# ----------------------------------------------------------------------------- lora (lora.py)
# (section owned by the LoRA work)


# ----------------------------------------------------------------------------- train (train.py)
# (section owned by the training work)


BENCHES = {}

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bench", choices=sorted(BENCHES))
    args, rest = p.parse_known_args()
    BENCHES[args.bench](rest)
