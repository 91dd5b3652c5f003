"""Data: reward and preference datasets, tokenisers, chat templates and [B, K] batches.

Read top to bottom:
1. `Example` and `load_examples`: four JSON Lines formats -> one internal form (prompt, K responses,
   K rewards), validated with errors that name file, line and field. `to_pairs` turns reward data
   into the paper's DPO baselines (Chen et al. 2024, Sec. 5).
2. `Tokenizer` and `load_tokenizer`: every tokeniser is a tiktoken `Encoding` built offline from the
   file that ships with a checkpoint (Llama 3, Tekken, Mistral SentencePiece, GPT-2, a Hugging Face
   byte-level BPE tokenizer.json such as Qwen2.5's) or from nothing (bytes, the default for tiny models).
3. `TEMPLATES`, `render` and `encode_chat`: chat templates equal to the models' official formats; only
   template markup makes control tokens, message text never does.
4. `collate`: tokens [B*K, T], loss_mask [B*K, T], rewards [B, K] (train.py picks the examples of each
   step in a seeded, resumable order); `pack`: the same ids with each prompt computed once for its K responses.
"""
import base64
import json
import math
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch

from model import atomic_write

# ----------------------------------------------------------------------------- examples


@dataclass
class Example:
    prompt: str | list[dict]  # a string, or chat messages [{"role": ..., "content": ...}]
    responses: list[str]  # K responses (K = 1 for SFT data)
    rewards: list[float]  # K rewards r_i; preference data: [1.0, 0.0] for [chosen, rejected]


# format: the keys that identify it, in the order they are tried
FORMATS = {
    "reward": ("prompt", "responses", "rewards"),
    "ultrafeedback": ("instruction", "completions"),
    "preference": ("chosen", "rejected"),  # TRL's form; "prompt" is implicit when chosen is a chat
    "sft": ("prompt", "response"),
}


def load_examples(path, format=None) -> list[Example]:
    """Read a JSON Lines file of one format (detected from the first record's keys unless given)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {sorted(FORMATS)}")
    examples = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        if format is None:
            format = next((f for f, keys in FORMATS.items() if all(k in obj for k in keys)), None)
            if format is None:
                raise ValueError(f"{where}: cannot tell the format from keys {sorted(obj)}; expected "
                                 + "; ".join(f"{f}: {', '.join(keys)}" for f, keys in FORMATS.items()))
        for key in FORMATS[format]:
            if key not in obj:
                raise ValueError(f"{where}: missing key {key!r} ({format} format needs {', '.join(FORMATS[format])})")
        examples.append(_PARSERS[format](obj, where))
    if not examples:
        raise ValueError(f"{path}: no examples (empty file)")
    return examples


def read_jsonl(path, *, log=False) -> list[dict]:
    """The objects of a JSON Lines file; an error names path:line. log=True reads an append-only log
    (train.py's OUT/metrics.jsonl): a missing file is empty, and a last line without its newline, cut
    short by a crash mid-append, is skipped (resuming rewrites the file without it)."""
    if log and not Path(path).is_file():
        return []
    return [obj for _, obj in _read_jsonl(path, log)]


def write_jsonl(path, rows):
    """A whole JSON Lines file, written atomically (model.atomic_write)."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_jsonl(path, skip_unfinished=False):
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line number
        for lineno, raw in enumerate(f, 1):
            if skip_unfinished and not raw.endswith(b"\n"):
                return
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start:e.start + 1]!r} at column "
                                 f"{e.start + 1}); data files must be UTF-8 JSON Lines") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg} at column {e.colno})") from None
            except RecursionError:  # json's decoder recurses once per nested [ or {
                raise ValueError(f"{path}:{lineno}: JSON line nested too deeply") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            yield lineno, obj


def _prompt(value, where, key="prompt"):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: field {key!r}: expected a string or a non-empty list of "
                     f"{{\"role\": str, \"content\": str}} messages")


def _response(value, where, key):
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {key!r}: empty response")
    return value


def _reward(value, where, key):
    # bool is an int in Python, but `true` is not a score
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: field {key!r}: expected a number, got {json.dumps(value)}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer can have any number of digits
        raise ValueError(f"{where}: field {key!r}: expected a finite number, got an integer too large "
                         f"for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: field {key!r}: expected a finite number, got {value}")
    return value


def _parse_reward(obj, where):
    responses, rewards = obj["responses"], obj["rewards"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError(f"{where}: field 'responses': expected a list of K >= 2 responses")
    if not isinstance(rewards, list) or len(rewards) != len(responses):
        n = len(rewards) if isinstance(rewards, list) else type(rewards).__name__
        raise ValueError(f"{where}: field 'rewards': expected a list of {len(responses)} numbers "
                         f"(one per response), got {n}")
    return Example(_prompt(obj["prompt"], where),
                   [_response(y, where, f"responses[{i}]") for i, y in enumerate(responses)],
                   [_reward(r, where, f"rewards[{i}]") for i, r in enumerate(rewards)])


def _parse_ultrafeedback(obj, where):
    completions = obj["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise ValueError(f"{where}: field 'completions': expected a list of K >= 2 completions")
    responses, rewards = [], []
    for i, c in enumerate(completions):
        for key in ("response", "overall_score"):
            if not isinstance(c, dict) or key not in c:
                raise ValueError(f"{where}: field 'completions[{i}]': missing key {key!r}")
        responses.append(_response(c["response"], where, f"completions[{i}].response"))
        rewards.append(_reward(c["overall_score"], where, f"completions[{i}].overall_score"))
    return Example(_prompt(obj["instruction"], where, "instruction"), responses, rewards)


def _parse_preference(obj, where):
    prompt = _prompt(obj["prompt"], where) if "prompt" in obj else None
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise ValueError(f"{where}: fields 'chosen'/'rejected': must both be strings or both chats "
                         f"(lists of messages), got {type(chosen).__name__} and {type(rejected).__name__}")
    if isinstance(chosen, str):
        if prompt is None:
            raise ValueError(f"{where}: missing key 'prompt' (needed when chosen/rejected are strings)")
        return Example(prompt, [_response(chosen, where, "chosen"), _response(rejected, where, "rejected")],
                       [1.0, 0.0])
    # conversational: the last message is the answer; the messages before it (if any) extend the prompt
    chosen, rejected = _prompt(chosen, where, "chosen"), _prompt(rejected, where, "rejected")
    for key, chat in (("chosen", chosen), ("rejected", rejected)):
        if chat[-1]["role"] != "assistant":
            raise ValueError(f"{where}: field {key!r}: expected a chat ending with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{where}: fields 'chosen'/'rejected': the messages before the answers differ")
    if prompt is None and not chosen[:-1]:
        raise ValueError(f"{where}: missing key 'prompt' (chosen holds no messages before the answer)")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    # UltraFeedback-binarized / Zephyr rows give `prompt` AND full conversations that already hold it:
    # then the conversation alone is the prompt, or the question would be asked twice
    history = chosen[:-1]
    held = prompt is None or any(history[i:i + len(prompt)] == prompt for i in range(len(history)))
    prompt = history if held else prompt + history
    return Example(prompt, [_response(chosen[-1]["content"], where, "chosen"),
                            _response(rejected[-1]["content"], where, "rejected")], [1.0, 0.0])


def _parse_sft(obj, where):
    return Example(_prompt(obj["prompt"], where), [_response(obj["response"], where, "response")], [0.0])


_PARSERS = {"reward": _parse_reward, "ultrafeedback": _parse_ultrafeedback,
            "preference": _parse_preference, "sft": _parse_sft}


def common_k(examples, where) -> int:
    """The number of responses K that every example has: a batch is [B, K], and the losses contrast K
    responses per prompt. An error names the first example that differs."""
    if not examples:
        raise ValueError(f"{where}: no examples")
    K = len(examples[0].responses)
    for i, ex in enumerate(examples):
        if len(ex.responses) != K:
            raise ValueError(f"{where}: example {i} has K = {len(ex.responses)} responses, example 0 has K = {K}; "
                             f"every prompt needs the same K (pairs, e.g. train.py --pairs dpo, have K = 2)")
    return K


def pair_indices(rewards, mode, rng):
    """The paper's DPO baselines (Chen et al. 2024, Sec. 5) on one prompt's K rewards: (winner, loser) index pairs.
    "dpo" best vs one random other (Zephyr), "dpo_x3" best vs each other, "dpo_all" all C(K, 2) pairs.
    Pairs with equal rewards carry no preference: dropped before "dpo" draws its one (with the numpy
    Generator `rng`). Returns (pairs, number of tied pairs dropped)."""
    if mode not in ("dpo", "dpo_x3", "dpo_all"):
        raise ValueError(f"unknown pair mode {mode!r}; expected 'dpo', 'dpo_x3' or 'dpo_all'")
    K = len(rewards)
    best = max(range(K), key=lambda i: rewards[i])  # first of the best
    if mode == "dpo_all":
        candidates = [(i, j) for i in range(K) for j in range(i + 1, K)]
    else:
        candidates = [(best, j) for j in range(K) if j != best]
    kept = [(i, j) if rewards[i] > rewards[j] else (j, i) for i, j in candidates if rewards[i] != rewards[j]]
    ties = len(candidates) - len(kept)
    if mode == "dpo" and kept:
        kept = [kept[rng.integers(len(kept))]]
    return kept, ties


def to_pairs(examples, mode, seed=0) -> list[Example]:
    """Reward data -> pairs [chosen, rejected] by `pair_indices`, with a log line of the ties dropped."""
    rng = np.random.default_rng(seed)
    pairs, ties, no_pair = [], 0, 0
    for n, ex in enumerate(examples):
        r, K = ex.rewards, len(ex.responses)
        if K < 2:
            raise ValueError(f"to_pairs: example {n} has K = {K} responses; pairs need K >= 2")
        kept, tied = pair_indices(r, mode, rng)
        ties += tied
        no_pair += not kept
        pairs += [Example(ex.prompt, [ex.responses[i], ex.responses[j]], [r[i], r[j]]) for i, j in kept]
    print(f"to_pairs({mode}): {len(examples)} examples -> {len(pairs)} pairs; dropped {ties} tied pairs"
          f" ({no_pair} examples gave no pair)")
    return pairs


# ----------------------------------------------------------------------------- tokenisers


@dataclass
class Tokenizer:
    enc: tiktoken.Encoding
    bos_id: int | None
    eos_id: int | None
    pad_id: int  # padding sits after the causal sequence and is masked out, so any valid id will do
    vocab_size: int  # model ids are 0 .. vocab_size - 1
    decoder: list[bytes]  # model id -> bytes (special tokens -> their name)
    special_ids: dict[str, int] = field(default_factory=dict)  # control tokens, made only by markup (encode_chat)
    # SentencePiece only: tiktoken rank -> model ids, and the "▁" prefix SentencePiece adds to every text
    sp_ids: list[tuple] | None = None
    dummy_prefix: bool = False
    nfc: bool = False  # Unicode NFC before splitting (a tokenizer.json's NFC normalizer: Qwen2)

    def encode(self, text: str) -> list[int]:
        """Text -> model ids. Special-token names in `text` stay plain text, as mistral-common and Meta's
        tokenizer encode message text: only a chat template's markup makes control tokens (see render)."""
        if self.sp_ids is None:
            text = unicodedata.normalize("NFC", text) if self.nfc else text
            return [i for piece in _pieces(text) for i in self.enc.encode(piece, disallowed_special=())]
        if not text:
            return []
        text = ("▁" if self.dummy_prefix else "") + text.replace(" ", "▁")
        return [i for rank in self.enc.encode(text, allowed_special="all") for i in self.sp_ids[rank]]

    def decode(self, ids) -> str:
        if bad := [i for i in ids if not 0 <= i < len(self.decoder)]:  # a negative id would index from the end
            raise ValueError(f"decode: token id {bad[0]} is out of range for tokenizer {self.enc.name!r} "
                             f"(ids 0 .. {len(self.decoder) - 1})")
        text = b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")
        return text[1:] if self.dummy_prefix and text.startswith(" ") else text


def _pieces(text):
    """`text` in pieces that tiktoken's regex can take: a run of a few hundred thousand spaces overflows
    its stack (the pattern's `\\s+(?!\\S)` backtracks), so, as Meta's reference tokenizer does
    (llama_models/llama3/tokenizer.py, TIKTOKEN_MAX_ENCODE_CHARS and MAX_NO_WHITESPACES_CHARS), cut the
    text into 400,000-character chunks and each run of whitespace or of non-whitespace every 25,000
    characters. Ids differ from an uncut encoding only at these cuts."""
    for i in range(0, len(text), 400_000):
        chunk, start = text[i:i + 400_000], 0
        for run in re.finditer(r"\s+|\S+", chunk):
            for cut in range(run.start() + 25_000, run.end(), 25_000):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


# looked for, in this order, in a directory: a Mistral HF directory has its tokenizer.model beside a tokenizer.json
TOKENIZER_FILES = ("tekken.json", "tokenizer.model", "gpt2.tiktoken", "tokenizer.json")


def tokenizer_file(directory):
    """The tokenizer file a checkpoint directory holds (the first of TOKENIZER_FILES there), or None."""
    return next((Path(directory) / n for n in TOKENIZER_FILES if (Path(directory) / n).is_file()), None)


def recorded_file(directory, name) -> Path:
    """A file that a checkpoint's config.json records (its tokenizer), inside `directory`: a bare file
    name, as export writes it and as shard names are (model._read_hf); a path that could lead elsewhere
    ("../x", "/etc/x", "sub/x") is refused, so a downloaded checkpoint cannot make us read other files."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{Path(directory) / 'config.json'}: field 'nca_tokenizer': {name!r} is not a file name; "
                         f"expected 'byte' or the name of a tokenizer file in {directory}")
    return Path(directory) / name


def load_tokenizer(spec="byte") -> Tokenizer:
    """"byte", or a tokenizer file / the checkpoint directory holding it: tekken.json,
    tokenizer.model (Llama 3's tiktoken text or Mistral's SentencePiece protobuf, told apart by
    content), gpt2.tiktoken or a Hugging Face tokenizer.json (byte-level BPE; told from tekken.json
    by content)."""
    if spec == "byte":
        return _byte_tokenizer()
    path = Path(spec)
    if path.is_dir():
        path = tokenizer_file(path)
        if path is None:
            raise ValueError(f"tokenizer {spec}: directory has no {', '.join(TOKENIZER_FILES)}")
    if not path.is_file():
        raise ValueError(f"tokenizer {spec!r}: no such file; expected 'byte', a tokenizer file or a checkpoint "
                         f"directory")
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # also UnicodeDecodeError
            raise ValueError(f"{path}: not a JSON file ({e})") from None
        return _hf_tokenizer(path, obj) if isinstance(obj, dict) and "model" in obj else _tekken(path, obj)
    data = path.read_bytes()
    if data[:1] == b"\n":  # protobuf field 1 (ModelProto.pieces), length-delimited: a SentencePiece model
        return _sentencepiece(path, data)
    ranks = _tiktoken_ranks(path, data)
    return _gpt2(ranks) if path.suffix == ".tiktoken" else _llama3(ranks)


def _tokenizer(name, pat_str, ranks, specials, bos, eos, pad, enc_specials=None):
    """A tiktoken-native tokeniser: model id = tiktoken rank."""
    vocab_size = max([*ranks.values(), *specials.values()]) + 1
    decoder = [b""] * vocab_size
    for b, r in ranks.items():
        decoder[r] = b
    for s, r in specials.items():
        decoder[r] = s.encode()
    enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                            special_tokens=specials if enc_specials is None else enc_specials)
    # a tekken.json may have no <pad>: padding is masked out, so id 0 does as well
    return Tokenizer(enc, specials.get(bos), specials.get(eos), specials.get(pad, 0), vocab_size, decoder, specials)


def _byte_tokenizer():
    # 256 byte tokens + 3 specials: no file, no merges; the default for tiny models
    specials = {"<|bos|>": 256, "<|eos|>": 257, "<|pad|>": 258}
    ranks = {bytes([b]): b for b in range(256)}
    return _tokenizer("byte", r"\S+|\s+", ranks, specials, "<|bos|>", "<|eos|>", "<|pad|>")


def _tiktoken_ranks(path, data):
    """tiktoken's text format: one `base64(token) rank` per line, ranks 0 .. n-1 each once (the special
    tokens are numbered from n, and tiktoken itself panics on a repeated rank)."""
    ranks, line_of = {}, {}  # token -> rank, rank -> line
    for lineno, line in enumerate(data.splitlines(), 1):
        try:
            token, rank = line.split()
            token, rank = base64.b64decode(token, validate=True), int(rank)
        except ValueError:  # also binascii.Error
            raise ValueError(f"{path}:{lineno}: expected 'base64-token rank' (a tiktoken BPE file) "
                             f"or a SentencePiece protobuf model") from None
        if rank < 0 or rank in line_of:
            raise ValueError(f"{path}:{lineno}: rank {rank}: expected ranks 0, 1, 2, ... each once"
                             + (f" (rank {rank} is also at line {line_of[rank]})" if rank in line_of else ""))
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} already has rank {ranks[token]} (line "
                             f"{line_of[ranks[token]]}); expected each token once")
        ranks[token], line_of[rank] = rank, lineno
    if not ranks:
        raise ValueError(f"{path}: no tokens; expected 'base64-token rank' lines (a tiktoken BPE file)")
    if (top := max(line_of)) >= len(ranks):
        raise ValueError(f"{path}:{line_of[top]}: rank {top}: expected ranks 0 .. {len(ranks) - 1} "
                         f"({len(ranks)} tokens)")
    _check_bytes(path, ranks)
    return ranks


def _check_bytes(path, ranks):
    # BPE starts from single bytes: one without a token could not be encoded (tiktoken would panic)
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise ValueError(f"{path}: no token for byte 0x{missing[0]:02x} ({len(missing)} bytes missing); "
                         f"a BPE vocabulary needs all 256 single bytes")


# Llama 3 (meta-llama/llama3, llama/tokenizer.py): cl100k-like split, 256 special tokens after the BPE ranks
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   *(f"<|reserved_special_token_{i}|>" for i in range(5, 251))]


def _llama3(ranks):
    specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}  # 128000 .. 128255 for the real file
    return _tokenizer("llama3", LLAMA3_PATTERN, ranks, specials,
                      "<|begin_of_text|>", "<|end_of_text|>", "<|end_of_text|>")


# GPT-2 = tiktoken's r50k_base (tiktoken_ext/openai_public.py); <|endoftext|> also serves as BOS
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _gpt2(ranks):
    specials = {"<|endoftext|>": len(ranks)}  # 50256
    return _tokenizer("gpt2", R50K_PATTERN, ranks, specials, "<|endoftext|>", "<|endoftext|>", "<|endoftext|>")


# Tekken files older than v7 carry no special-token list; mistral-common fills in this one
TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                   "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[TOOL_CONTENT]"]


def _tekken(path, model):
    """Mistral's tekken.json: {config: {pattern, default_vocab_size, default_num_special_tokens},
    vocab: [{rank, token_bytes (base64)}], special_tokens: [{rank, token_str}] (optional)}.
    Model id = n_special + BPE rank, the BPE vocabulary cut to default_vocab_size - n_special."""

    def need(ok, key, expected):
        if not ok:
            raise ValueError(f"{path} (read as Mistral's tekken.json): field {key!r}: expected {expected}")

    def count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    need(isinstance(model, dict) and isinstance(model.get("config"), dict), "config", "an object")
    config, vocab, special = model["config"], model.get("vocab"), model.get("special_tokens") or []
    n_special, size = config.get("default_num_special_tokens"), config.get("default_vocab_size")
    need(count(n_special), "config.default_num_special_tokens", "an integer >= 0")
    need(isinstance(vocab, list) and len(vocab) >= 256, "vocab", "a list of {rank, token_bytes}, 256 or more")
    need(count(size) and n_special + 256 <= size <= n_special + len(vocab), "config.default_vocab_size",
         f"an integer in {n_special + 256} .. {n_special + len(vocab)} (the special tokens + 256 bytes at least, "
         f"+ all of vocab at most)")
    need(isinstance(config.get("pattern"), str), "config.pattern", "a regular expression string")
    ranks = {}
    for i, t in enumerate(vocab[:size - n_special]):
        need(isinstance(t, dict) and t.get("rank") == i and isinstance(t.get("token_bytes"), str), f"vocab[{i}]",
             f"{{rank: {i}, token_bytes: base64 string}}")
        try:
            b = base64.b64decode(t["token_bytes"], validate=True)
        except ValueError:  # binascii.Error
            b = None
        need(b is not None and b not in ranks, f"vocab[{i}].token_bytes", "the base64 of a token not seen before")
        ranks[b] = n_special + i
    _check_bytes(path, ranks)
    need(isinstance(special, list) and all(isinstance(t, dict) and count(t.get("rank")) and t.get("token_str")
                                           and isinstance(t["token_str"], str) for t in special),
         "special_tokens", "a list of {rank: int, token_str: non-empty string}")
    names = [t["token_str"] for t in sorted(special, key=lambda t: t["rank"])] or TEKKEN_SPECIALS
    need(sorted(t["rank"] for t in special) == list(range(len(special))) and len(set(names)) == len(names),
         "special_tokens", "ranks 0, 1, 2, ... and names, each once")
    need(len(names) <= n_special, "config.default_num_special_tokens", f">= {len(names)}, the number of special tokens")
    specials = {s: i for i, s in enumerate(names + [f"<SPECIAL_{i}>" for i in range(len(names), n_special)])}
    try:
        return _tokenizer("tekken", config["pattern"], ranks, specials, "<s>", "</s>", "<pad>", enc_specials={})
    except ValueError as e:  # tiktoken compiles the pattern only now
        raise ValueError(f"{path}: field 'config.pattern': not a valid regular expression ({e})") from None


# ----- a Hugging Face tokenizer.json holding a byte-level BPE (Qwen2 / Qwen2.5, Llama 3's HF form, GPT-2 style)
#
# `tokenizers` splits the text by a regex (a Split pre-tokenizer, or ByteLevel's own GPT-2 pattern), spells
# each piece's UTF-8 bytes as printable characters (GPT-2's bytes_to_unicode) and applies the merges in list
# order. tiktoken merges the adjacent pair whose concatenation has the lowest rank: the same algorithm when
# rank = vocabulary id, provided the merges make their tokens in id order and every token of two or more
# bytes is made by some merge (both checked). Not checked: a token that also splits into a pair of tokens the
# merges do not list, which tiktoken would merge if BPE brought the pair together (Llama 3's HF form lists
# every split; on BPEs trained by `tokenizers` the tests find the same ids). Added tokens are control
# tokens, made only by template markup (encode_chat).
# GPT-2's pattern as tokenizers' ByteLevel pre-tokenizer compiles it (pre_tokenizers/byte_level.rs)
BYTE_LEVEL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table (openai/gpt-2, encoder.py): printable Latin-1 bytes stand
    for themselves, the others for chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _hf_tokenizer(path, tok):
    def need(ok, key, expected):
        if not ok:
            raise ValueError(f"{path} (read as a Hugging Face tokenizer.json): field {key!r}: expected {expected}")

    model, norm, pre = tok["model"], tok.get("normalizer"), tok.get("pre_tokenizer")
    need(isinstance(model, dict) and model.get("type") == "BPE" and not model.get("dropout")
         and not model.get("byte_fallback") and not model.get("continuing_subword_prefix")
         and not model.get("end_of_word_suffix"), "model",
         "a byte-level BPE (type BPE; no dropout, byte_fallback, continuing_subword_prefix or end_of_word_suffix)")
    need(norm is None or norm == {"type": "NFC"}, "normalizer", "null or NFC (others cannot be expressed exactly)")
    # ByteLevel's own GPT-2 split, or a Split by regex (isolating each match) then ByteLevel without its regex
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if isinstance(steps, list) and steps and isinstance(steps[-1], dict) else {}
    split = steps[0] if len(steps) == 2 and isinstance(steps[0], dict) else {}
    pattern = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
    need(byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space")
         and (len(steps) == 1 and byte_level.get("use_regex", True)
              or split.get("type") == "Split" and isinstance(pattern, str) and split.get("behavior") == "Isolated"
              and not split.get("invert") and not byte_level.get("use_regex", True)), "pre_tokenizer",
         "ByteLevel (use_regex, no add_prefix_space), or Sequence [Split (Regex, Isolated), ByteLevel (no regex)]")
    if pattern is None:
        pattern = BYTE_LEVEL_PATTERN
    else:  # tiktoken drops text no alternative matches, where Split keeps it as a piece: match that run too
        pattern = f"{pattern}|(?:(?!{pattern})[\\s\\S])+"
    added = tok.get("added_tokens") or []
    need(isinstance(added, list) and all(isinstance(t, dict) and isinstance(t.get("id"), int) and t.get("content")
                                         and isinstance(t["content"], str) and not t.get("lstrip")
                                         and not t.get("rstrip") and not t.get("single_word") for t in added),
         "added_tokens", "a list of {id: int, content: non-empty string}, none with lstrip, rstrip or single_word")
    specials = {t["content"]: t["id"] for t in added}
    need(len(specials) == len(added) == len(set(specials.values())), "added_tokens", "each content and id once")

    char_byte = {c: b for b, c in _bytes_to_unicode().items()}
    vocab, merges = model.get("vocab"), model.get("merges")
    need(isinstance(vocab, dict) and all(isinstance(i, int) and i >= 0 for i in vocab.values())
         and len(set(vocab.values())) == len(vocab), "model.vocab", "an object of token -> id, each id once")
    ranks = {}
    for t, i in vocab.items():
        if t in specials:  # an added token kept in the vocabulary too: a marker, not a BPE token
            need(specials[t] == i, f"model.vocab[{t!r}]", f"the id of the added token, {specials[t]}")
            continue
        need(t and all(c in char_byte for c in t), f"model.vocab[{t!r}]", "a token spelled in byte-level characters")
        ranks[bytes(char_byte[c] for c in t)] = i
    _check_bytes(path, ranks)
    need(isinstance(merges, list), "model.merges", "a list")
    made, last = set(), -1
    for n, m in enumerate(merges):
        pair = m.split(" ") if isinstance(m, str) else m  # "a b" (older files) or ["a", "b"]
        ok = isinstance(pair, list) and len(pair) == 2 and all(p in vocab for p in pair) and "".join(pair) in vocab
        need(ok, f"model.merges[{n}]", "two tokens of the vocabulary whose concatenation is one too")
        i = vocab["".join(pair)]
        need(i >= last, f"model.merges[{n}]", f"a merge making a token of id >= {last} (the merges make their tokens "
                                              f"in id order, the order tiktoken's ranks give)")
        made.add(i)
        last = i
    if unmade := [t for t, i in vocab.items() if t not in specials and len(t) > 1 and i not in made]:
        need(False, "model.merges", f"a merge for every token of two or more bytes; none makes {unmade[0]!r}")
    config_file = Path(path).with_name("tokenizer_config.json")  # which tokens are EOS and padding, when present
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError
        raise ValueError(f"{config_file}: not a JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    eos, pad = ((t.get("content") if isinstance(t, dict) else t) for t in (config.get("eos_token"),
                                                                          config.get("pad_token")))
    for key, name in (("eos_token", eos), ("pad_token", pad)):
        if name is not None and name not in specials:
            raise ValueError(f"{config_file}: field {key!r}: {name!r} is not an added token of {path}")
    # BOS is what a TemplateProcessing post-processor puts first (Llama 3: <|begin_of_text|>; Qwen2.5: nothing)
    post = tok.get("post_processor") or {}
    template = next((p for p in [post, *post.get("processors", [])] if p.get("type") == "TemplateProcessing"), {})
    bos = (template.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
    try:
        out = _tokenizer(Path(path).name, pattern, ranks, specials, bos, eos, pad or eos, enc_specials={})
    except ValueError as e:  # tiktoken compiles the pattern only now
        raise ValueError(f"{path}: the pre-tokenizer's regex is not one tiktoken can compile ({e})") from None
    out.nfc = norm is not None
    return out


# ----- Mistral 7B's SentencePiece BPE, as a tiktoken Encoding
#
# SentencePiece BPE starts from the characters of "▁" + text.replace(" ", "▁") and repeatedly merges
# the adjacent pair whose concatenation is a piece of highest score (ties: leftmost); a final symbol
# that is not a piece becomes its UTF-8 bytes, <0xXX> ("byte fallback"). tiktoken merges the adjacent
# pair whose concatenation has the lowest rank (ties: leftmost) -- the same algorithm, on bytes. So:
# - ranks 0..255 are the bytes; next come the pieces that are single characters, and the UTF-8
#   prefixes needed to build them, so every character is formed before any real merge;
# - then the longer pieces by score, highest first. Whitespace-only pieces all share one score, where
#   SentencePiece's leftmost rule grows the first run of "▁" first: ranking them longest first does that;
# - no piece holds a "▁" after another character, so the split pattern cuts before each "▁" run that
#   follows a word: runs of "▁" stay attached to the word after them, and no merge crosses a cut;
# - tiktoken ranks -> SentencePiece ids by a table: a char piece -> its id, bytes of a character that is
#   not a piece -> the <0xXX> ids, and a piece that BPE cannot build from its own characters -> the
#   pieces BPE really gives (tiktoken returns a chunk that is a whole token without running BPE; no
#   Mistral piece needs this, but a vocabulary may hold such pieces).
SP_PATTERN = r"▁*[^▁]+|▁+"
SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER_DEFINED, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type


def _protobuf(buf):
    """Yield (field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 2, 5):  # fixed64, length-delimited, fixed32
            n, i = _varint(buf, i) if wire == 2 else (8 if wire == 1 else 4, i)
            if i + n > len(buf):
                raise ValueError(f"field {key >> 3} says {n} bytes, {len(buf) - i} are left: truncated file?")
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(buf, i):
    x = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("a varint runs past the end: truncated file?")
        b = buf[i]
        x |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return x, i


def _sentencepiece(path, data):
    # ModelProto: pieces = 1 {piece = 1, score = 2 (float), type = 3}, trainer_spec = 2, normalizer_spec = 3
    pieces, trainer, normalizer = [], {}, {}
    try:
        for num, value in _protobuf(data):
            if num == 1:
                p = dict(_protobuf(value))
                piece, score, kind = p.get(1), p.get(2, b"\0\0\0\0"), p.get(3, SP_NORMAL)
                if not isinstance(piece, bytes) or not isinstance(score, bytes) or len(score) != 4 \
                        or kind not in range(SP_NORMAL, SP_BYTE + 1):
                    raise ValueError(f"piece {len(pieces)}: expected {{piece: string, score: float, type: 1 .. 6}}")
                pieces.append((piece.decode(), struct.unpack("<f", score)[0], kind))
            elif num in (2, 3):
                (trainer if num == 2 else normalizer).update(_protobuf(value))
    except ValueError as e:  # also UnicodeDecodeError
        raise ValueError(f"{path}: not a SentencePiece model nor a tiktoken BPE file ({e})") from None
    # TrainerSpec: model_type = 3 (BPE = 2), byte_fallback = 35; NormalizerSpec: name = 1,
    # add_dummy_prefix = 3 (default on), remove_extra_whitespaces = 4 (default on), escape_whitespaces = 5
    if trainer.get(3, 1) != 2 or not trainer.get(35) or normalizer.get(1, b"") != b"identity" \
            or normalizer.get(4, 1) or not normalizer.get(5, 1) or any(t == SP_UNUSED for _, _, t in pieces):
        raise ValueError(f"{path}: only SentencePiece BPE models with byte fallback, identity normalisation, "
                         "no whitespace removal and no unused pieces (Llama 2 / Mistral 7B style) are supported")
    seen = set()
    for n, (p, _, t) in enumerate(pieces):
        if p in seen:
            raise ValueError(f"{path}: piece {n} {p!r} appears twice; expected each piece once")
        if t == SP_BYTE and not re.fullmatch("<0x[0-9A-F]{2}>", p):
            raise ValueError(f"{path}: piece {n} {p!r} is a byte piece; expected the name <0xXX>")
        seen.add(p)
    ids = {p: i for i, (p, _, t) in enumerate(pieces) if t in (SP_NORMAL, SP_USER_DEFINED)}
    score = {p: s for p, s, t in pieces if t == SP_NORMAL}
    byte_id = {int(p[3:5], 16): i for i, (p, _, t) in enumerate(pieces) if t == SP_BYTE}
    if len(byte_id) != 256:
        raise ValueError(f"{path}: {len(byte_id)} byte pieces; byte fallback needs all 256, <0x00> .. <0xFF>")

    ranks = {bytes([b]): b for b in range(256)}
    sp_ids = [(ids[chr(b)],) if b < 128 and chr(b) in score else (byte_id[b],) for b in range(256)]
    for c in sorted(p for p in score if len(p) == 1):
        b = c.encode()
        for k in range(2, len(b) + 1):
            if b[:k] not in ranks:
                ranks[b[:k]] = len(ranks)
                sp_ids.append((ids[c],) if k == len(b) else tuple(byte_id[x] for x in b[:k]))
    words = sorted((p.encode() for p in score if len(p) > 1), key=lambda b: (-score[b.decode()], -len(b)))
    for b in words:
        ranks[b] = len(ranks)
        sp_ids.append((ids[b.decode()],))
    # user-defined pieces (e.g. v3's [REFERENCE_DOC_0]) are matched whole in the text by SentencePiece
    user = {p: len(ranks) + n for n, (p, _, t) in enumerate(q for q in pieces if q[2] == SP_USER_DEFINED)}
    sp_ids += [(ids[p],) for p in user]
    enc = tiktoken.Encoding(name=Path(path).name, pat_str=SP_PATTERN, mergeable_ranks=ranks, special_tokens=user)
    # BPE each piece alone: followed by a private-use character it is no whole token, so tiktoken runs
    # BPE on it; the character's own tokens (`tail`) never merge with it and are cut off again
    tail = enc.encode("\ue000")
    for b in words:
        built = enc.encode(b.decode() + "\ue000", disallowed_special=())[:-len(tail)]
        if built != [ranks[b]]:
            sp_ids[ranks[b]] = tuple(i for r in built for i in sp_ids[r])

    special_ids = {p: i for i, (p, _, t) in enumerate(pieces) if t in (SP_CONTROL, SP_UNKNOWN)}
    decoder = [bytes([int(p[3:5], 16)]) if t == SP_BYTE
               else p.replace("▁", " ").encode() if t in (SP_NORMAL, SP_USER_DEFINED)
               else p.encode()  # control pieces decode to their name
               for p, _, t in pieces]
    return Tokenizer(enc, special_ids.get("<s>"), special_ids.get("</s>"), special_ids.get("</s>", 0), len(pieces),
                     decoder, special_ids, sp_ids=sp_ids, dummy_prefix=bool(normalizer.get(3, 1)))


# ----------------------------------------------------------------------------- chat templates
#
# A rendered conversation is a list of units, each a list of (text, is_markup) pieces. Two rules:
# - Only markup (the template's own strings) makes control tokens: it is split on the tokenizer's
#   special-token names; message text (and the role) never is, so a line of data that spells
#   "<|eot_id|>", "[INST]" or "</s>" cannot forge a turn (mistral-common and Meta's tokenizer encode
#   message text as ordinary text too). Between two control tokens, the text of the markup and of the
#   messages is encoded as one run, as a tokenizer does with the whole rendered string.
# - The units are what the official implementation encodes on its own: mistral-common encodes every
#   message on its own and concatenates the ids (one unit per message), while transformers'
#   apply_chat_template renders the whole conversation to one string and tokenises it (one unit).
#   Meta's Llama 3 reference encodes header, content and end marker piece by piece, but stripped
#   content never merges with the header's "\n\n", so one unit gives the same ids.
# So the scored response is rendered inside the conversation, and its ids are the tail of the whole
# conversation's ids: the tokens the model generates after the prompt at inference.

# name: (one message, the text that opens the assistant's turn, the end-of-turn marker that is scored;
# None: the tokeniser's EOS, like "</s>", which always means EOS)
TEMPLATES = {
    "none": ("{content}", "", None),  # plain text; the response ends with the tokeniser's EOS
    # Meta's reference (meta-llama/llama3, ChatFormat.encode_message) and the published Llama 3 Instruct
    # template ("| trim") strip each message's content
    "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    # v1 SentencePiece (Mistral 7B v0.1/v0.2): mistral-common encodes "[INST] {content} [/INST]" as text
    "mistral": ("[INST] {content} [/INST]", "", "</s>"),
    # v3 SentencePiece (Mistral 7B v0.3) and Tekken: [INST] and [/INST] are control tokens, and
    # mistral-common encodes the text between them on its own: "<s>[INST] Hi[/INST] Yo</s>"
    "mistral_v3": ("[INST]{content}[/INST]", "", "</s>"),
    # HuggingFaceH4/zephyr-7b-beta's chat_template: eos_token after every message, "\n" after that
    "zephyr": ("<|{role}|>\n{content}</s>\n", "<|assistant|>\n", "</s>"),
    "chatml": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "qwen": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),  # see render
}
PER_MESSAGE = ("none", "mistral", "mistral_v3")  # each message is a unit (see above); the others: one unit
# Qwen2.5's template (Qwen/Qwen2.5-7B-Instruct, tokenizer_config.json) opens with this when no system message leads
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def end_of_turn(tok, template) -> list[int]:
    """The ids that close a response under `template`: scored in training, the stop tokens when sampling.
    "</s>" is the tokeniser's EOS, whatever it is called; any other marker must be one special token,
    or the model would be trained to end its turns by spelling the marker out (10 bytes for <|eot_id|>)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
    eot = TEMPLATES[template][2]
    # v3 and Tekken tokenizers made [INST] a control token: each Mistral template fits one kind only
    if template in ("mistral", "mistral_v3") and ("[INST]" in tok.special_ids) != (template == "mistral_v3"):
        raise ValueError(f"template {template!r} does not fit tokenizer {tok.enc.name!r}, where [INST] is "
                         + ("a control token: use 'mistral_v3'" if "[INST]" in tok.special_ids
                            else "plain text: use 'mistral'"))
    if eot is None or eot == "</s>":
        if tok.eos_id is None:
            raise ValueError(f"template {template!r} ends a response with EOS, but tokenizer {tok.enc.name!r} has none")
        return [tok.eos_id]
    if eot not in tok.special_ids:
        raise ValueError(f"template {template!r}: its end-of-turn marker {eot!r} is not a special token of "
                         f"tokenizer {tok.enc.name!r}; use the template that goes with the tokenizer")
    return [tok.special_ids[eot]]


def _fill(fmt, **fields):
    """A template string with its {fields} filled in, as (text, is_markup) pieces: only its own text is markup."""
    return [(fields[part], False) if n % 2 else (part, True) for n, part in enumerate(re.split(r"\{(\w+)\}", fmt))]


def render(template, prompt, response=None) -> list[list[tuple[str, bool]]]:
    """The conversation `prompt` (a string: one user message) as units of (text, is_markup) pieces (see
    above), up to the opening of the assistant's turn, or, given `response`, up to and including the
    end-of-turn marker after it. BOS is not included: collate adds the tokeniser's BOS."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
    turn, opening, eot = TEMPLATES[template]
    eot = eot or "</s>"
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if template == "none":
        units = [[("\n\n".join(m["content"] for m in prompt), False)]]
        return units if response is None else units + [[(response, False), (eot, True)]]
    if template == "qwen" and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": QWEN_SYSTEM}] + prompt
    if template in ("mistral", "mistral_v3"):
        # [INST] has no system turn: mistral-common joins the system messages and prepends them to the
        # first user turn (v1) or the last (v3)
        system = "\n\n".join(m["content"] for m in prompt if m["role"] == "system" and m["content"])
        prompt = [m for m in prompt if m["role"] != "system"]
        users = [i for i, m in enumerate(prompt) if m["role"] != "assistant"]
        if system and users:
            i = users[0 if template == "mistral" else -1]
            prompt = prompt[:i] + [{**prompt[i], "content": system + "\n\n" + prompt[i]["content"]}] + prompt[i + 1:]
    messages = prompt + ([] if response is None else [{"role": "assistant", "content": response}])
    units = []
    for m in messages:
        content = m["content"]
        if template == "llama3":
            content = content.strip()
        elif template == "mistral_v3" and m["role"] == "assistant":
            content = content.rstrip(" ")  # mistral-common (v2+) strips trailing spaces off every answer
        if template in ("mistral", "mistral_v3") and m["role"] == "assistant":
            units.append([(content, False), (eot, True)])  # each answer is encoded on its own, then EOS
        elif m is messages[-1] and response is not None:
            units.append(_fill(opening) + [(content, False), (eot, True)])  # the turn ends at its marker
        else:
            units.append(_fill(turn, role=m["role"], content=content))
    if response is None:
        units.append(_fill(opening))
    return units


def encode_chat(tok, template, units) -> list[int]:
    """Ids of rendered `units` (see render): markup split on the tokeniser's special-token names ("</s>" is
    its EOS), every run of text between them encoded as ordinary text; units joined into one unless
    the template is one of PER_MESSAGE."""
    markers = dict(tok.special_ids)
    if tok.eos_id is not None:
        markers["</s>"] = tok.eos_id
    # longest first: the regex takes the first name that matches, so none may cut a longer one short
    split = re.compile("(" + "|".join(map(re.escape, sorted(markers, key=len, reverse=True))) + ")")
    if template not in PER_MESSAGE:
        units = [[piece for unit in units for piece in unit]]
    ids = []
    for unit in units:
        run = ""
        for text, markup in unit:
            # re.split with a group alternates text, marker, text, ...: the odd parts are the markers
            parts = split.split(text) if markup and markers else [text]
            for n, part in enumerate(parts):
                if n % 2:
                    ids += tok.encode(run) + [markers[part]]
                    run = ""
                else:
                    run += part
        ids += tok.encode(run)
    return ids


# ----------------------------------------------------------------------------- batching


def encode(examples, tok, *, template="none", max_length=1024, max_prompt_length=512):
    """B examples of K responses -> [(prompt ids, [K response ids])] and how many prompts / responses were
    truncated: the ids collate and pack both lay out, so the padded and packed batches cannot drift.

    The response is rendered inside the conversation, as the official implementation encodes it (see
    "chat templates"), and its ids are what follows the prompt's; they end with the end of turn,
    `end_of_turn`. A long prompt keeps its BOS and its end (the question sits next to the answer); a
    long response keeps its start, so that prompt + response fits max_length."""
    common_k(examples, "collate")
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    bos = [] if tok.bos_id is None else [tok.bos_id]
    end_of_turn(tok, template)  # refuses a template that does not fit the tokeniser
    groups, n_prompt, n_response = [], 0, 0
    for ex in examples:
        p = whole_p = encode_chat(tok, template, render(template, ex.prompt))
        if len(bos) + len(p) > max_prompt_length:
            n_prompt += 1
            p = p[len(p) - (max_prompt_length - len(bos)):]
        p = bos + p
        if not p:
            raise ValueError("collate: empty prompt and no BOS token: the first response token could not be scored")
        responses = []
        for y in ex.responses:
            units = render(template, ex.prompt, y)
            whole = encode_chat(tok, template, units)
            # the response's ids are the tail of the whole conversation's: what the model generates after
            # the prompt. Only if a merge crosses the boundary (a tiktoken "\n" + "\n" after ChatML's
            # "assistant\n") can no split give both, and the response is encoded on its own after the prompt
            r = whole[len(whole_p):] if whole[:len(whole_p)] == whole_p else \
                encode_chat(tok, template, [units[-1][-2:]])  # [(response, False), (end-of-turn marker, True)]
            if len(p) + len(r) > max_length:
                n_response += 1
                r = r[:max_length - len(p)]
            responses.append(r)
        groups.append((p, responses))
    return groups, n_prompt, n_response


def collate(examples, tok, *, template="none", max_length=1024, max_prompt_length=512) -> dict:
    """B examples of K responses -> tokens [B*K, T] (row b*K + k = prompt b + response k, right padded
    to the longest row), loss_mask [B*K, T] (True on the scored tokens: the response and its end of
    turn), scored (loss_mask's True positions, rows and columns [M]), and what pack returns too (see
    _sizes): rewards [B, K], response lengths, the tokens counted, how many prompts / responses were
    truncated (see encode)."""
    groups, n_prompt, n_response = encode(examples, tok, template=template, max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    return {**padded_batch(groups, tok.pad_id), **_sizes(examples, groups, n_prompt, n_response)}


def _sizes(examples, groups, n_prompt, n_response):
    """What a batch holds whatever its layout: rewards [B, K] (float32), response_lengths [B, K] (the scored
    tokens of each response), n_tokens (each prompt token once plus each response token: a throughput
    that does not count padding or repeated prompts) and the truncation counts (see encode)."""
    return {"rewards": torch.tensor([ex.rewards for ex in examples], dtype=torch.float32),
            "response_lengths": torch.tensor([[len(r) for r in responses] for _, responses in groups]),
            "n_tokens": sum(len(p) + sum(map(len, responses)) for p, responses in groups),
            "prompts_truncated": n_prompt, "responses_truncated": n_response}


def padded_batch(groups, pad_id) -> dict:
    """[(prompt ids, [K response ids])] * B -> tokens, loss_mask [B*K, T]: one row per response (see collate)."""
    rows = [(p, r) for p, responses in groups for r in responses]
    T = max(len(p) + len(r) for p, r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B*K, T]
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)  # [B*K, T]
    for i, (p, r) in enumerate(rows):
        tokens[i, :len(p) + len(r)] = torch.tensor(p + r)
        loss_mask[i, len(p):len(p) + len(r)] = True
    # loss_mask's True positions from the lengths, as (rows, cols) [M] each: found in the mask on a GPU
    # (nonzero) they would make the host wait for the device (nca.sequence_logps)
    scored = torch.tensor([(i, j) for i, (p, r) in enumerate(rows) for j in range(len(p), len(p) + len(r))],
                          dtype=torch.long).view(-1, 2)
    return {"tokens": tokens, "loss_mask": loss_mask, "scored": tuple(scored.T.contiguous())}


def pack(examples, tok, *, pack_tokens=None, template="none", max_length=1024, max_prompt_length=512) -> dict:
    """The batch collate makes, packed: each prompt once, followed by its K responses (see packed_batch);
    same ids, truncation, rewards [B, K] and counts (_sizes)."""
    groups, n_prompt, n_response = encode(examples, tok, template=template, max_length=max_length,
                                          max_prompt_length=max_prompt_length)
    return {**packed_batch(groups, tok.pad_id, pack_tokens), **_sizes(examples, groups, n_prompt, n_response)}


def packed_batch(groups, pad_id, pack_tokens=None) -> dict:
    """[(prompt ids, [K response ids])] * B -> R rows of at most pack_tokens tokens (default: all in one row),
    each holding whole prompt groups (a prompt, then its K responses), right padded to the longest row L. A
    row's length costs nothing in attention (below), so by default nothing is padded. Two prompts
    (b = 0: P P P P with responses x, y; b = 1: Q Q with u, v) in one row:

        tokens     P0 P1 P2 P3 | x0 x1 x2 | y0 y1 | Q0 Q1 | u0 u1 | v0 | pad
        pos         0  1  2  3 |  4  5  6 |  4  5 |  0  1 |  2  3 |  2 |   0
        prompt      0  0  0  0 |  0  0  0 |  0  0 |  1  1 |  1  1 |  1 |  -1
        response   -1 -1 -1 -1 |  0  0  0 |  1  1 | -1 -1 |  0  0 |  1 |  -1
        source                 |  3  4  5 |  3  7 |       | 10 11 | 10 |

    Only attention needs to see a response beside its prompt, so it runs in collate's rows [prompt; response k],
    gathered from the packed tokens and back (model.Attention). Padding those rows to the longest would cost
    up to its length squared for every row, so rows are sorted by length and cut into buckets, one attention
    call each, of rows at least 3/4 as long as the bucket's first (the picture's: lengths 7, 6 | 4, 3):

        to_padded  [P0 P1 P2 P3 x0 x1 x2]     [Q0 Q1 u0 u1]    each a row's tokens as flat indices into the
                   [P0 P1 P2 P3 y0 y1 . ]     [Q0 Q1 v0 . ]    packed [R * L] tokens; . is padding
        to_packed  each packed token's slot in the buckets' outputs, flattened and concatenated (a prompt
                   token: its slot in its first response's row)

    pos restarts after the prompt for every response, so response k of prompt b gets exactly the logits it
    gets alone in collate's row, and everything but attention runs once per packed token. Returns tokens,
    pos, prompt, response [R, L] (prompt: b, -1 on padding; response: k, -1 on prompt tokens and padding),
    loss_mask [R, L] (the responses' tokens, as collate's), scored (loss_mask's True positions, rows and
    columns [M], row by row as nonzero gives them), source [R, L]: for a scored token, the column whose
    hidden state predicts it (the one before it, or the prompt's last token for a response's first token,
    as collate's row predicts it), to_padded (a tuple of [N_i, S_i]) and to_packed [R, L]. Padding points at
    index 0: right padding comes after every real token of its row, where causal attention does not look.
    Groups go to the first row they fit in, in order; a group longer than pack_tokens gets a row of its own
    (a response never leaves its prompt's row)."""
    rows = []  # per row: [((b, prompt ids, responses), tokens)]
    pack_tokens = pack_tokens or sum(len(p) + sum(map(len, responses)) for p, responses in groups)
    for b, (p, responses) in enumerate(groups):
        n = len(p) + sum(map(len, responses))
        row = next((row for row in rows if sum(m for _, m in row) + n <= pack_tokens), None)
        if row is None:
            rows.append(row := [])
        row.append(((b, p, responses), n))
    L = max(sum(n for _, n in row) for row in rows)
    K = len(groups[0][1])
    length = [len(p) + len(r) for p, responses in groups for r in responses]  # of row n = b * K + k
    buckets = []  # [[n, ...]]: the longest row first
    for n in sorted(range(len(length)), key=lambda n: -length[n]):
        if not buckets or 4 * length[n] < 3 * length[buckets[-1][0]]:
            buckets.append([])
        buckets[-1].append(n)
    to_padded = [[[0] * length[bucket[0]] for _ in bucket] for bucket in buckets]
    slot, start = {}, 0  # n: (its to_padded row, the flat index of its first slot in the outputs)
    for i, bucket in enumerate(buckets):
        for j, n in enumerate(bucket):
            slot[n] = to_padded[i][j], start + j * length[bucket[0]]
        start += len(bucket) * length[bucket[0]]
    # built as lists, one tensor per field at the end: slicing into tensors costs ~10 small ops per response
    fields = {"tokens": pad_id, "pos": 0, "prompt": -1, "response": -1, "source": 0, "to_packed": 0}  # name: padding
    out = {name: [] for name in fields}  # name: [R lists of L]
    scored = ([], [])  # from the lengths, as padded_batch's: nonzero on a GPU would make the host wait
    for i, row in enumerate(rows):
        tokens, pos, prompt, response, source, to_packed = [], [], [], [], [], []
        for (b, p, responses), _ in row:
            first = len(tokens)  # the prompt's first column
            last = first + len(p) - 1  # the prompt's last column predicts every response's first token
            tokens += p
            pos += range(len(p))
            prompt += [b] * len(p)
            response += [-1] * len(p)
            source += [0] * len(p)
            to_packed += range(slot[b * K][1], slot[b * K][1] + len(p))
            for k, r in enumerate(responses):
                t = len(tokens)
                scored[0].extend([i] * len(r))
                scored[1].extend(range(t, t + len(r)))
                tokens += r
                pos += range(len(p), len(p) + len(r))
                prompt += [b] * len(r)
                response += [k] * len(r)
                source += [last, *range(t, t + len(r) - 1)]
                padded, s0 = slot[b * K + k]
                to_packed += range(s0 + len(p), s0 + len(p) + len(r))
                padded[:len(p) + len(r)] = [*range(i * L + first, i * L + first + len(p)),
                                            *range(i * L + t, i * L + t + len(r))]
        for name, values in zip(fields, (tokens, pos, prompt, response, source, to_packed)):
            out[name].append(values + [fields[name]] * (L - len(values)))
    batch = {name: torch.tensor(values, dtype=torch.long) for name, values in out.items()}  # [R, L] each
    return {**batch, "to_padded": tuple(torch.tensor(x, dtype=torch.long) for x in to_padded),
            "loss_mask": batch["response"] >= 0,
            "scored": tuple(torch.tensor(x, dtype=torch.long) for x in scored)}


def prompt_ids(prompts, tok, *, template="none", max_length=1024, max_prompt_length=512) -> list[list[int]]:
    """Token ids of each prompt exactly as collate gives them to the model (template, BOS, truncation):
    what generation must start from so that sampled responses are scored as they were produced."""
    # a stand-in response: its loss mask starts right after the prompt
    batch = collate([Example(p, ["x"], [0.0]) for p in prompts], tok, template=template, max_length=max_length,
                    max_prompt_length=max_prompt_length)
    return [row[:int(m.nonzero()[0])].tolist() for row, m in zip(batch["tokens"], batch["loss_mask"])]
