"""data.py against independent references: ids recorded from sentencepiece, tiktoken's r50k_base and
mistral-common (tests/make_data_fixtures.py), tokenisations worked by hand on small files written in
each format, and hand-built batches."""
import importlib.util
import json
import random
import re
import struct
import unicodedata
from pathlib import Path

import pytest

import data

FIX = Path(__file__).parent / "fixtures" / "data"
IDS = json.loads((FIX / "tokenizer_ids.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sp_v1():
    return data.load_tokenizer(FIX / "mistral_v1.model")


@pytest.fixture(scope="module")
def sp_v3():
    return data.load_tokenizer(FIX / "mistral_v3.model")


# ----------------------------------------------------------------------------- formats and pairs

Q1, Q2 = "What is 2+2?", "Name a colour."
EXPECTED = [data.Example(Q1, ["4", "5"], [1.0, 0.0]), data.Example(Q2, ["Blue.", "Loud."], [1.0, 0.0])]


@pytest.mark.parametrize("name", ["reward", "ultrafeedback", "preference"])
def test_reward_ultrafeedback_and_preference_files_load_into_the_same_examples(name):
    assert data.load_examples(FIX / f"{name}.jsonl") == EXPECTED
    assert data.load_examples(FIX / f"{name}.jsonl", format=name) == EXPECTED


def test_chat_preference_with_explicit_or_implicit_prompt_loads_as_a_user_message():
    chat = [data.Example([{"role": "user", "content": ex.prompt}], ex.responses, ex.rewards) for ex in EXPECTED]
    assert data.load_examples(FIX / "preference_chat.jsonl") == chat
    for template in data.TEMPLATES:  # a single user message renders exactly like the plain string
        assert data.render(template, chat[0].prompt) == data.render(template, Q1)


def test_prompt_already_in_the_conversations_is_not_asked_twice(tmp_path):
    # UltraFeedback-binarized / Zephyr rows: `prompt` plus chosen / rejected that open with that question
    sys_msg, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1}
    earlier = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    rows = [(Q1, [user]), (Q1, [sys_msg, user]), ([user], [user]), (Q1, earlier)]
    path = tmp_path / "ufb.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": h + [{"role": "assistant", "content": "4"}],
                                        "rejected": h + [{"role": "assistant", "content": "5"}]}) + "\n"
                            for p, h in rows), encoding="utf-8")
    prompts = [ex.prompt for ex in data.load_examples(path)]
    # the last row's conversation does not hold the prompt: it is history, and the prompt follows it
    assert prompts == [[user], [sys_msg, user], [user], [user] + earlier]


def test_sft_file_loads_as_k1_with_zero_reward():
    assert data.load_examples(FIX / "sft.jsonl") == [data.Example(Q1, ["4"], [0.0]), data.Example(Q2, ["Blue."], [0.0])]


R = [3.0, 1.0, 3.0, 2.0]  # responses 0 and 2 tie for best


def _pairs(mode, seed=0):
    ex = data.Example("q", ["a", "b", "c", "d"], R)
    return [(p.responses, p.rewards) for p in data.to_pairs([ex], mode, seed)]


def test_dpo_all_gives_every_untied_pair_ordered_by_reward(capsys):
    assert _pairs("dpo_all") == [(["a", "b"], [3, 1]), (["a", "d"], [3, 2]), (["c", "b"], [3, 1]),
                                 (["d", "b"], [2, 1]), (["c", "d"], [3, 2])]  # pairs (i, j), i < j, winner first
    assert "1 examples -> 5 pairs; dropped 1 tied pairs" in capsys.readouterr().out


def test_dpo_x3_gives_the_best_against_each_lower_response(capsys):
    assert _pairs("dpo_x3") == [(["a", "b"], [3, 1]), (["a", "d"], [3, 2])]
    assert "dropped 1 tied pairs" in capsys.readouterr().out


def test_dpo_gives_the_best_against_one_random_lower_response_fixed_by_the_seed():
    picks = {tuple(_pairs("dpo", seed)[0][0]) for seed in range(20)}
    assert picks == {("a", "b"), ("a", "d")}
    assert _pairs("dpo", 7) == _pairs("dpo", 7)


def test_an_all_tied_example_gives_no_pair_and_is_counted(capsys):
    assert data.to_pairs([data.Example("q", ["a", "b", "c"], [2.0, 2.0, 2.0])], "dpo_all") == []
    assert "dropped 3 tied pairs (1 examples gave no pair)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

GOOD = '{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 2]}'


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 2]', "malformed JSON line"),
    ('{"prompt": "p", "responses": ["a", "b"]}', "missing key 'rewards'"),
    ('{"prompt": "p", "responses": ["a"], "rewards": [1]}', "field 'responses': expected a list of K >= 2"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1]}', "field 'rewards': expected a list of 2 numbers"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, "7"]}', "field 'rewards[1]': expected a number"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [true, 1]}', "field 'rewards[0]': expected a number"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, NaN]}', "field 'rewards[1]': expected a finite number"),
    ('{"prompt": "p", "responses": ["a", "b"], "rewards": [Infinity, 1]}',
     "field 'rewards[0]': expected a finite number"),
    pytest.param('{"prompt": "p", "responses": ["a", "b"], "rewards": [1, 1' + "0" * 400 + ']}',
                 "field 'rewards[1]': expected a finite number, got an integer too large", id="huge integer"),
    ('{"prompt": "p", "responses": ["a", " "], "rewards": [1, 2]}', "field 'responses[1]': empty response"),
    ('{"prompt": 3, "responses": ["a", "b"], "rewards": [1, 2]}', "field 'prompt': expected a string"),
    ('[1, 2]', "expected a JSON object"),
    pytest.param("[" * 100_000, "JSON line nested too deeply", id="deep nesting"),  # json would raise RecursionError
])
def test_bad_reward_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{re.escape(message)}"):
        data.load_examples(path)


@pytest.mark.parametrize("fmt, line, message", [
    ("ultrafeedback", '{"instruction": "p", "completions": [{"response": "a", "overall_score": 1}]}',
     "field 'completions': expected a list of K >= 2"),
    ("ultrafeedback", '{"instruction": "p", "completions": [{"response": "a", "overall_score": 1}, {"response": "b"}]}',
     "field 'completions[1]': missing key 'overall_score'"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": ""}', "field 'rejected': empty response"),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}',
     "'chosen'/'rejected': must both be strings or both chats"),
    ("preference", '{"chosen": "a", "rejected": "b"}', "missing key 'prompt'"),
    ("sft", '{"prompt": "p"}', "missing key 'response'"),
])
def test_bad_lines_of_other_formats_name_file_line_and_field(tmp_path, fmt, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:1: .*{re.escape(message)}"):
        data.load_examples(path, format=fmt)


def test_a_file_that_is_not_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((GOOD + "\n" + '{"prompt": "caf\xe9", "responses": ["a", "b"], "rewards": [1, 2]}\n')
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8"):
        data.load_examples(path)


def test_unknown_keys_say_which_formats_exist(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"odd.jsonl:1: cannot tell the format .*reward: prompt, responses, rewards"):
        data.load_examples(path)


# ----------------------------------------------------------------------------- tokenisers


@pytest.mark.parametrize("name", ["mistral_v1", "mistral_v3", "gpt2"])
def test_token_ids_equal_the_recorded_reference_tokenisers(name):
    tok = data.load_tokenizer(FIX / ("gpt2.tiktoken" if name == "gpt2" else f"{name}.model"))
    for text, ids in zip(IDS["texts"], IDS[name]):
        assert tok.encode(text) == ids, text
        if "▁" not in text:  # SentencePiece itself decodes a literal ▁ to a space
            assert tok.decode(ids) == text


def test_mistral_vocabularies_have_the_model_sizes(sp_v1):
    v3 = data.load_tokenizer(FIX / "mistral_v3.model")
    assert (sp_v1.vocab_size, sp_v1.bos_id, sp_v1.eos_id) == (32000, 1, 2)
    assert (v3.vocab_size, v3.special_ids["[INST]"], v3.special_ids["[/INST]"]) == (32768, 3, 4)


def test_gpt2_reads_hello_world_as_the_published_ids():
    tok = data.load_tokenizer(FIX / "gpt2.tiktoken")
    assert tok.encode("Hello, world!") == [15496, 11, 995, 0]
    assert (tok.eos_id, tok.vocab_size) == (50256, 50257)


def test_sentencepiece_matches_the_library_on_random_text(sp_v1):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "mistral_v1.model"))
    rnd = random.Random(0)
    chars = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), 0x2581, 0x3042, 0x4E00, 0xAC00, 0x1F600, 10, 9]]
    words = IDS["texts"][1].split() + IDS["texts"][10].split()
    for _ in range(1000):
        text = ("".join(rnd.choice(chars) for _ in range(rnd.randint(1, 30))) if rnd.random() < 0.5 else
                (" " * rnd.randint(0, 3)).join(rnd.choice(words) for _ in range(rnd.randint(1, 12))))
        assert sp_v1.encode(text) == sp.encode(text), text
        assert sp_v1.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def _pb(num, value):
    """One protobuf field: varint for int, fixed32 for float, length-delimited for str/bytes."""
    def varint(x):
        out = b""
        while x > 0x7F:
            out, x = out + bytes([x & 0x7F | 0x80]), x >> 7
        return out + bytes([x])
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, float):
        return varint(num << 3 | 5) + struct.pack("<f", value)
    value = value.encode() if isinstance(value, str) else value
    return varint(num << 3 | 2) + varint(len(value)) + value


SP_SPECIAL_AND_BYTES = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)] + [(f"<0x{b:02X}>", 0.0, 6)
                                                                                   for b in range(256)]


def _sp_model(pieces):
    """A SentencePiece ModelProto: pieces (piece, score, type), BPE with byte fallback, identity normaliser."""
    model = b"".join(_pb(1, _pb(1, p) + _pb(2, s) + _pb(3, t)) for p, s, t in pieces)
    return model + _pb(2, _pb(3, 2) + _pb(35, 1)) + _pb(3, _pb(1, "identity") + _pb(3, 1) + _pb(4, 0) + _pb(5, 1))


@pytest.mark.parametrize("model, message", [
    pytest.param(_sp_model(SP_SPECIAL_AND_BYTES + [("a", 0.0, 1), ("a", -1.0, 1)]), "piece 260 'a' appears twice",
                 id="repeated piece"),
    pytest.param(_sp_model(SP_SPECIAL_AND_BYTES[:100] + [("a", 0.0, 1)]), "97 byte pieces; byte fallback needs all 256",
                 id="missing byte pieces"),
    pytest.param(_sp_model(SP_SPECIAL_AND_BYTES[:3] + [("<0x0g>", 0.0, 6)] + SP_SPECIAL_AND_BYTES[4:]),
                 "piece 3 '<0x0g>' is a byte piece; expected the name <0xXX>", id="bad byte piece"),
    pytest.param(_sp_model(SP_SPECIAL_AND_BYTES + [("a", 0.0, 9)]),
                 "piece 259: expected {piece: string, score: float, type: 1 .. 6}", id="unknown type"),
    pytest.param(_pb(1, _pb(1, 5)), "piece 0: expected {piece: string", id="piece text is a number"),
    pytest.param(_pb(1, _pb(1, "a") + _pb(2, "ab")), "piece 0: expected {piece: string, score: float",
                 id="short score"),
    pytest.param(b"\n\x0aabc", "field 1 says 10 bytes, 3 are left: truncated file?", id="length past the end"),
    pytest.param(b"\n\x80", "a varint runs past the end: truncated file?", id="varint past the end"),
])
def test_a_malformed_sentencepiece_model_names_the_file_and_problem(tmp_path, model, message):
    (tmp_path / "tokenizer.model").write_bytes(model)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.model")) + ".*" + re.escape(message)):
        data.load_tokenizer(tmp_path)


def test_a_truncated_mistral_model_is_reported_as_truncated(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((FIX / "mistral_v1.model").read_bytes()[:300_000])
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model .*truncated file"):
        data.load_tokenizer(tmp_path)


def test_sentencepiece_piece_that_bpe_cannot_build_is_split_as_sentencepiece_does(tmp_path):
    # "▁abcd" is a piece, but BPE from its characters merges b+c first (score 0), then ▁+a, and
    # [▁a, bc, d] has no pair left: tiktoken alone would return the whole chunk as one token.
    normal = [("bc", 0.0), ("▁a", -1.0), ("cd", -2.0), ("▁abcd", -3.0),
              ("▁", -4.0), ("a", -5.0), ("b", -6.0), ("c", -7.0), ("d", -8.0)]
    pieces = SP_SPECIAL_AND_BYTES + [(p, s, 1) for p, s in normal]
    model = _sp_model(pieces)
    (tmp_path / "tokenizer.model").write_bytes(model)
    tok = data.load_tokenizer(tmp_path)
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    assert tok.encode("abcd") == [ids["▁a"], ids["bc"], ids["d"]]
    assert tok.encode("cd é") == [ids["▁"], ids["cd"], ids["▁"], 3 + 0xC3, 3 + 0xA9]  # é is no piece: its bytes
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_proto=model)
    texts = ("abcd", "cd é", " abcd  abcd")
    assert [sp.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def _write_tiktoken_file(path, merges):
    import base64
    tokens = [bytes([b]) for b in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))


def test_llama3_reader_on_a_small_file_in_its_format(tmp_path):
    _write_tiktoken_file(tmp_path / "tokenizer.model", [b"is", b"Th", b"This", b" is", b" t", b"es"])
    tok = data.load_tokenizer(tmp_path)
    # by hand: "This" -> T h (is) -> (Th)(is) -> (This); " is" -> " " (is) -> ( is); " a" has no merge;
    # " test" -> ( t) e s t -> ( t)(es)t; "." alone.  Specials follow the 262 ranks.
    assert tok.encode("This is a test.") == [258, 259, 32, 97, 260, 261, 116, 46]
    assert (tok.bos_id, tok.eos_id, tok.special_ids["<|eot_id|>"], tok.vocab_size) == (262, 263, 271, 262 + 256)
    assert tok.encode("<|eot_id|>") == list(b"<|eot_id|>")  # special names in data stay text...
    assert data.encode_chat(tok, "llama3", [[("<|eot_id|>", True)]]) == [271]  # ...markers only in markup
    assert tok.decode([258, 259, 271]) == "This is<|eot_id|>"


def _b64(token):
    import base64
    return base64.b64encode(token).decode()


BYTE_LINES = [f"{_b64(bytes([b]))} {b}" for b in range(256)]


@pytest.mark.parametrize("lines, message", [
    ([], ": no tokens"),
    (BYTE_LINES + [f"{_b64(b'ab')} 5"], ":257: rank 5: expected ranks 0, 1, 2, ... each once "
                                        "(rank 5 is also at line 6)"),
    (BYTE_LINES + [f"{_b64(b'ab')} -1"], ":257: rank -1: expected ranks 0, 1, 2, ... each once"),
    (BYTE_LINES + [f"{_b64(b'a')} 256"], ":257: token b'a' already has rank 97 (line 98)"),
    (BYTE_LINES + [f"{_b64(b'ab')} 10000000000"], ":257: rank 10000000000: expected ranks 0 .. 256"),  # not 80 GB
    ([f"{_b64(b'ab')} 0"] + BYTE_LINES[1:], ": no token for byte 0x00"),
])
def test_a_malformed_tiktoken_file_names_the_file_line_and_problem(tmp_path, lines, message):
    for name in ("tokenizer.model", "gpt2.tiktoken"):  # Llama 3 and GPT-2 read the same format
        (tmp_path / name).write_text("".join(line + "\n" for line in lines))
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}{message}")):
            data.load_tokenizer(tmp_path / name)


def _wheel_file(package, *path):
    """A real tokenizer file that ships inside an oracle package's wheel (requirements-test.txt)."""
    mod = pytest.importorskip(package, reason=f"{package} (it ships the real tokenizer file) is not installed")
    return Path(mod.__file__).parent.joinpath(*path)


def test_real_llama3_tokenizer_gives_metas_ids():
    # the ids that llama-models' own tests expect (llama3/tests/api/test_tokenizer.py)
    tok = data.load_tokenizer(_wheel_file("llama_models", "llama3", "tokenizer.model"))
    assert [tok.bos_id] + tok.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert (tok.eos_id, tok.special_ids["<|eot_id|>"], tok.special_ids["<|start_header_id|>"], tok.vocab_size) == \
        (128001, 128009, 128006, 128256)


TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"  # tekken_240718's
                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_tekken(path, special_tokens=None):
    import base64
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b"zz"]
    model = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": len(tokens), "default_vocab_size": 24 + 258,
                        "default_num_special_tokens": 24, "version": "v3"},
             "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(), "token_str": None}
                       for r, t in enumerate(tokens)]}
    if special_tokens:
        model["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True}
                                   for i, s in enumerate(special_tokens)]
    path.write_text(json.dumps(model))


def test_tekken_reader_on_a_small_file_in_its_format(tmp_path):
    _write_tekken(tmp_path / "tekken.json")
    tok = data.load_tokenizer(tmp_path)
    # ids = 24 specials + rank; "zz" lies beyond default_vocab_size, so " zz" stays three bytes
    assert tok.encode("abc zz") == [24 + 257, 24 + 32, 24 + 122, 24 + 122]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 11, 282)
    # markup [INST] is the control token; the same name in message text stays bytes
    assert data.encode_chat(tok, "mistral_v3", [[("[INST]", True), ("x[INST]", False)]]) == \
        [3] + [24 + b for b in b"x[INST]"]
    assert tok.special_ids["<SPECIAL_23>"] == 23  # fillers up to default_num_special_tokens
    # mistral_v3 (Mistral Nemo's format): [INST] ab [/INST] abc </s> [INST] z z [/INST], no spaces added
    chat = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "abc"},
            {"role": "user", "content": "zz"}]
    assert data.encode_chat(tok, "mistral_v3", data.render("mistral_v3", chat)) == \
        [3, 24 + 256, 4, 24 + 257, 2, 3, 24 + 122, 24 + 122, 4]
    _write_tekken(tmp_path / "tekken.json", ["<unk>", "<s>", "</s>", "<pad>"])
    assert data.load_tokenizer(tmp_path / "tekken.json").pad_id == 3
    _write_tekken(tmp_path / "tekken.json", ["<unk>", "<s>", "</s>"])  # no <pad>: padding is masked, id 0 will do
    no_pad = data.load_tokenizer(tmp_path / "tekken.json")
    assert (no_pad.bos_id, no_pad.eos_id, no_pad.pad_id) == (1, 2, 0)


def _set(key, value):
    """A change to a tekken.json dict: key "a.b.0.c" -> m["a"]["b"][0]["c"] = value (None deletes it)."""
    def change(m):
        *path, last = [int(k) if k.isdigit() else k for k in key.split(".")]
        for k in path:
            m = m[k]
        if value is None:
            del m[last]
        else:
            m[last] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set("config", None), "field 'config': expected an object"),
    (_set("config.default_num_special_tokens", "24"), "field 'config.default_num_special_tokens': expected an integer"),
    (_set("config.default_vocab_size", 20), "field 'config.default_vocab_size': expected an integer in 280 .. 283"),
    (_set("vocab", {}), "field 'vocab': expected a list"),
    (_set("vocab.3.rank", 4), "field 'vocab[3]': expected {rank: 3, token_bytes: base64 string}"),
    (_set("vocab.4.token_bytes", "Aw=="), "field 'vocab[4].token_bytes': expected the base64 of a token not seen"),
    (_set("vocab.4.token_bytes", "!!"), "field 'vocab[4].token_bytes': expected the base64"),
    (_set("vocab.3.token_bytes", "eHk="), "no token for byte 0x03"),  # b"xy": byte 3 is gone
    (_set("config.pattern", "("), "field 'config.pattern': not a valid regular expression"),
    (_set("special_tokens.1.token_str", None), "field 'special_tokens': expected a list of {rank: int, token_str"),
    (_set("special_tokens.1.rank", 7), "field 'special_tokens': expected ranks 0, 1, 2, ... and names, each once"),
    (_set("special_tokens.1.token_str", "<unk>"), "field 'special_tokens': expected ranks 0, 1, 2, ... and names"),
    (lambda m: m["special_tokens"].extend({"rank": i, "token_str": f"<x{i}>"} for i in range(4, 30)),
     "field 'config.default_num_special_tokens': expected >= 30"),  # 30 names for 24 ids
])
def test_a_malformed_tekken_file_names_the_file_and_the_field(tmp_path, change, message):
    path = tmp_path / "tekken.json"
    _write_tekken(path, ["<unk>", "<s>", "</s>", "<pad>"])
    model = json.loads(path.read_text())
    change(model)
    path.write_text(json.dumps(model))
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(message)):
        data.load_tokenizer(path)
    path.write_bytes(b"\xff{")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a JSON file")):
        data.load_tokenizer(path)


def test_real_tekken_gives_mistral_commons_ids():
    tok = data.load_tokenizer(_wheel_file("mistral_common", "data", "tekken_240718.json"))
    assert [tok.bos_id] + tok.encode("This is a test sentence.") == [1, 4380, 1395, 1261, 2688, 19286, 1046]
    assert [tok.encode(t) for t in IDS["texts"]] == IDS["tekken_240718"]


# Hugging Face tokenizer.json (byte-level BPE): the oracle is the `tokenizers` library itself, run on
# files it trains and saves here, and on Llama 3's HF form converted from the real tokenizer.model
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")  # Qwen2.5's tokenizer.json
CORPUS = ["The quick brown fox jumps over the lazy dog; it's 12345 o'clock. Café naïve résumé — 東京 ここ 🙂\n\n"
          "  indented   spaces\tand tabs\r\n" + t for t in IDS["texts"]]
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(path, kind):
    """A byte-level BPE trained and saved by `tokenizers`, with its added tokens after the vocabulary as
    Qwen2.5's: "split" as Qwen2.5 (NFC, a Split regex, ByteLevel), "gpt2" (ByteLevel's own regex) or "gaps"
    (a Split regex that leaves text unmatched, which Split keeps as pieces of their own)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Regex, pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind == "gpt2")
    if kind != "gpt2":
        split = pre_tokenizers.Split(Regex(QWEN_PATTERN if kind == "split" else r"\p{L}+"), behavior="isolated")
        byte_level = pre_tokenizers.Sequence([split, byte_level])
    tok.pre_tokenizer = byte_level
    if kind == "split":
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.train_from_iterator(CORPUS, tokenizers.trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(ADDED)
    tok.add_tokens([AddedToken("<tool_call>", special=False)])  # as Qwen2.5's: added, not special
    tok.save(str(path))
    return tok


def _random_texts(n, seed=0):
    rnd = random.Random(seed)
    chars = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), 0x301, 0x3042, 0x4E00, 0x1F600, 10, 9, 13]]
    words = " ".join(CORPUS[:3]).split(" ") + ADDED + ["<tool_call>", "e\u0301", "\n\n", "  ", "2024"]
    return [("".join(rnd.choice(chars) for _ in range(rnd.randint(1, 30))) if rnd.random() < 0.5 else
             rnd.choice([" ", "", "\n", "  "]).join(rnd.choice(words) for _ in range(rnd.randint(1, 12))))
            for _ in range(n)]


@pytest.mark.parametrize("kind", ["split", "gpt2", "gaps"])
def test_hf_byte_level_bpe_gives_the_tokenizers_librarys_ids(tmp_path, kind):
    ref = _train_bpe(tmp_path / "tokenizer.json", kind)
    tok = data.load_tokenizer(tmp_path)  # the directory: tokenizer.json is found
    assert tok.special_ids == {s: ref.token_to_id(s) for s in ADDED + ["<tool_call>"]}
    assert tok.vocab_size == ref.get_vocab_size() and tok.nfc == (kind == "split")
    # message text: every added token stays text, as `tokenizers` gives it with no added tokens at all
    plain = json.loads((tmp_path / "tokenizer.json").read_text())
    plain["added_tokens"] = []
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    text_only = type(ref).from_file(str(tmp_path / "plain.json"))
    for text in _random_texts(500):
        assert data.encode_chat(tok, "chatml", [[(text, True)]]) == ref.encode(text, add_special_tokens=False).ids, text
        ids = tok.encode(text)
        assert ids == text_only.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == (unicodedata.normalize("NFC", text) if tok.nfc else text)


def test_hf_tokenizer_json_reads_bos_from_its_post_processor_and_eos_pad_from_its_config(tmp_path):
    ref = _train_bpe(tmp_path / "tokenizer.json", "split")
    assert (lambda t: (t.bos_id, t.eos_id, t.pad_id))(data.load_tokenizer(tmp_path)) == (None, None, 0)
    # Qwen2.5-Instruct's tokenizer_config.json: EOS <|im_end|>, padding <|endoftext|>, no BOS
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                                "pad_token": "<|endoftext|>"}))
    tok = data.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, ref.token_to_id("<|im_end|>"), ref.token_to_id(ADDED[0]))
    # Llama 3's tokenizer.json puts <|begin_of_text|> first with a TemplateProcessing post-processor
    from tokenizers import processors
    ref.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", ref.token_to_id("<|im_start|>"))])])
    ref.save(str(tmp_path / "tokenizer.json"))
    assert data.load_tokenizer(tmp_path).bos_id == ref.token_to_id("<|im_start|>") == \
        ref.encode("x").ids[0]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: field 'eos_token': '</s>' is not an added token"):
        data.load_tokenizer(tmp_path)


def _llama3_model_file():
    """Meta's Llama 3 tokenizer.model as the llama-models wheel ships it (pip install llama-models --no-deps)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None:
        pytest.skip("llama-models is not installed (it carries Meta's Llama 3 tokenizer.model)")
    return Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"


def test_llama3_hf_form_converted_from_the_real_tokenizer_model_gives_the_tokenizers_librarys_ids(tmp_path):
    pytest.importorskip("tokenizers")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    model_file = _llama3_model_file()
    # transformers' converter writes the HF form: the tiktoken ranks as vocabulary + merges, Llama 3's split regex
    ref = convert.TikTokenConverter(str(model_file), pattern=data.LLAMA3_PATTERN,
                                    extra_special_tokens=data.LLAMA3_SPECIALS).converted()
    ref.save(str(tmp_path / "tokenizer.json"))
    tok, meta = data.load_tokenizer(tmp_path / "tokenizer.json"), data.load_tokenizer(model_file)
    assert tok.special_ids == meta.special_ids and tok.vocab_size == meta.vocab_size == 128256
    texts = IDS["texts"] + _random_texts(200, seed=1) + [
        "This is a test sentence.", "héllo wörld  \n\n  東京 🙂 12345678 1.5e-3", "   leading\t\ttabs\r\nCRLF\n\n\n",
        "I'LL've 'S don't", "<|eot_id|>x<|begin_of_text|>y <|start_header_id|>user<|end_header_id|>\n\n"]
    for text in texts:
        assert data.encode_chat(tok, "chatml", [[(text, True)]]) == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.encode(text) == meta.encode(text), text
    assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]  # Meta's published ids


def _edit_tokenizer_json(path, edit):
    tok = json.loads(path.read_text())
    edit(tok)
    path.write_text(json.dumps(tok))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["model"].update(type="WordPiece"), "field 'model': expected a byte-level BPE"),
    (lambda t: t["model"].update(byte_fallback=True), "field 'model': expected a byte-level BPE"),
    (lambda t: t.update(normalizer={"type": "Lowercase"}), "field 'normalizer': expected null or NFC"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True), "field 'pre_tokenizer'"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "field 'pre_tokenizer'"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(pattern={"String": " "}), "field 'pre_tokenizer'"),
    (lambda t: t["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": "("}), "regex is not one tiktoken"),
    (lambda t: t["added_tokens"][1].update(lstrip=True), "field 'added_tokens': expected .* none with lstrip"),
    (lambda t: t["added_tokens"][1].update(id=t["added_tokens"][0]["id"]), "field 'added_tokens': .* each content"),
    (lambda t: t["model"]["merges"].reverse(), r"field 'model.merges\[1\]': expected a merge making a token of id"),
    (lambda t: t["model"]["merges"].pop(), "field 'model.merges': expected a merge for every token"),
    (lambda t: t["model"]["merges"].append(["Ġ", "zzz"]), r"field 'model.merges\[\d+\]': expected two tokens"),
    (lambda t: t["model"]["vocab"].pop("Ġ"), "no token for byte 0x20"),
    (lambda t: t["model"]["vocab"].update({"\u4e00": 5000}), r"field .model.vocab\['一'\].: expected a token spelled"),
])
def test_a_tokenizer_json_it_cannot_read_exactly_is_refused_in_one_line(tmp_path, edit, message):
    path = tmp_path / "tokenizer.json"
    _train_bpe(path, "split")
    _edit_tokenizer_json(path, edit)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message) as e:
        data.load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_byte_tokenizer_is_utf8_bytes_plus_three_specials():
    tok = data.load_tokenizer("byte")
    assert tok.encode("hé!") == [104, 0xC3, 0xA9, 33]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([104, 0xC3, 0xA9, 257]) == "hé<|eos|>"
    for bad in (259, -1):  # -1 would silently decode the last token
        with pytest.raises(ValueError, match=f"token id {bad} is out of range for tokenizer 'byte'"):
            tok.decode([104, bad])


def test_tokenizer_kind_is_detected_from_directory_name_and_content(tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes((FIX / "mistral_v1.model").read_bytes())
    assert data.load_tokenizer(tmp_path / "sp").sp_ids is not None  # protobuf -> SentencePiece
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "gpt2.tiktoken").write_bytes((FIX / "gpt2.tiktoken").read_bytes())
    assert data.load_tokenizer(tmp_path / "gpt2").bos_id == 50256
    with pytest.raises(ValueError, match="no tekken.json, tokenizer.model, gpt2.tiktoken, tokenizer.json"):
        data.load_tokenizer(tmp_path)
    (tmp_path / "junk.model").write_text("not a tokenizer\n")
    with pytest.raises(ValueError, match=r"junk.model:1: expected 'base64-token rank'"):
        data.load_tokenizer(tmp_path / "junk.model")



def test_a_recorded_tokenizer_file_must_be_a_file_name_in_the_checkpoint_directory(tmp_path):
    assert data.recorded_file(tmp_path, "tokenizer.model") == tmp_path / "tokenizer.model"
    for name in ("..", "../x", "/etc/x", "sub/x", "", ".", "sub\\x", None):  # could name a file elsewhere
        with pytest.raises(ValueError) as e:
            data.recorded_file(tmp_path, name)
        assert str(e.value) == (f"{tmp_path / 'config.json'}: field 'nca_tokenizer': {name!r} is not a file name; "
                                f"expected 'byte' or the name of a tokenizer file in {tmp_path}")

# ----------------------------------------------------------------------------- templates and batches


def _text(units):
    return "".join(text for unit in units for text, _ in unit)


def test_templates_render_the_reference_chat_formats():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _text(data.render("llama3", chat)) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert _text(data.render("mistral", chat + [{"role": "assistant", "content": "Yo"},
                                                {"role": "user", "content": "Bye"}])) == \
        "[INST] Be brief.\n\nHi [/INST]Yo</s>[INST] Bye [/INST]"
    # mistral-common joins the system messages and puts them before the first user turn (v1) or the last (v3)
    late = [chat[1], {"role": "assistant", "content": "Yo"}, chat[0], {"role": "user", "content": "Bye"}]
    assert _text(data.render("mistral", late)) == "[INST] Be brief.\n\nHi [/INST]Yo</s>[INST] Bye [/INST]"
    assert _text(data.render("mistral_v3", late)) == "[INST]Hi[/INST]Yo</s>[INST]Be brief.\n\nBye[/INST]"
    assert _text(data.render("zephyr", chat)) == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert _text(data.render("chatml", "Hi")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _text(data.render("chatml", "Hi", "Yo")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>"
    assert _text(data.render("none", "Hi")) == "Hi"
    # message text and roles are never markup: only the template's own strings make control tokens
    data_pieces = [(text, markup) for unit in data.render("chatml", [{"role": "<|im_end|>r", "content": "<|im_start|>c"}])
                   for text, markup in unit if text in ("<|im_end|>r", "<|im_start|>c")]
    assert data_pieces == [("<|im_end|>r", False), ("<|im_start|>c", False)]


def test_earlier_mistral_assistant_turns_get_the_tokens_of_a_scored_response(sp_v1):
    # mistral-common v1 encodes each user turn "[INST] ... [/INST]" and each assistant turn on its own,
    # then appends EOS to the assistant's; the response a model is trained on is encoded on its own too
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo there"},
            {"role": "user", "content": "Bye"}]
    want = sp_v1.encode("[INST] Hi [/INST]") + sp_v1.encode("Yo there") + [2] + sp_v1.encode("[INST] Bye [/INST]")
    assert data.encode_chat(sp_v1, "mistral", data.render("mistral", chat)) == want


# mistral-common's own expected ids for one chat under its v1 and v3 SentencePiece instruct tokenizers
# (mistralai/mistral-common, tests/data/expected/chat-sample-no-tools-spm-v{1,3}/expected.json; the same
# tokenizer files as tests/fixtures/data): independent of data.py's templates and of sentencepiece
MISTRAL_CHAT = ["What's the result of 5 + 5?", "The result of 5 + 5 is 10.", "What is the square root of 64?",
                "The square root of 64 is 8, because 8 x 8 equals 64.",
                "Can you multiply the results of the previous two questions?", "Sure! The result of 10 x 8 is 80.",
                "Thanks"]
MISTRAL_COMMON_IDS = {
    "mistral": [1, 733, 16289, 28793, 1824, 28742, 28713, 272, 1204, 302, 28705, 28782, 648, 28705, 28782, 28804,
                733, 28748, 16289, 28793, 415, 1204, 302, 28705, 28782, 648, 28705, 28782, 349, 28705, 28740, 28734,
                28723, 2, 733, 16289, 28793, 1824, 349, 272, 7930, 5557, 302, 28705, 28784, 28781, 28804, 733,
                28748, 16289, 28793, 415, 7930, 5557, 302, 28705, 28784, 28781, 349, 28705, 28783, 28725, 1096,
                28705, 28783, 1318, 28705, 28783, 21588, 28705, 28784, 28781, 28723, 2, 733, 16289, 28793, 2418,
                368, 17669, 346, 272, 2903, 302, 272, 3454, 989, 4224, 28804, 733, 28748, 16289, 28793, 12875,
                28808, 415, 1204, 302, 28705, 28740, 28734, 1318, 28705, 28783, 349, 28705, 28783, 28734, 28723, 2,
                733, 16289, 28793, 8868, 733, 28748, 16289, 28793],
    "mistral_v3": [1, 3, 2592, 29510, 29481, 1040, 1972, 1070, 29473, 29550, 1416, 29473, 29550, 29572, 4, 1183,
                   1972, 1070, 29473, 29550, 1416, 29473, 29550, 1117, 29473, 29508, 29502, 29491, 2, 3, 2592, 1117,
                   1040, 8698, 6325, 1070, 29473, 29552, 29549, 29572, 4, 1183, 8698, 6325, 1070, 29473, 29552,
                   29549, 1117, 29473, 29551, 29493, 1864, 29473, 29551, 2086, 29473, 29551, 22356, 29473, 29552,
                   29549, 29491, 2, 3, 3186, 1136, 18437, 1114, 1040, 3671, 1070, 1040, 4222, 1757, 4992, 29572, 4,
                   13643, 29576, 1183, 1972, 1070, 29473, 29508, 29502, 2086, 29473, 29551, 1117, 29473, 29551,
                   29502, 29491, 2, 3, 9636, 4]}


@pytest.mark.parametrize("template, model, inst_end", [("mistral", "mistral_v1", 28793),  # "]" of "▁[/INST]"
                                                       ("mistral_v3", "mistral_v3", 4)])  # the [/INST] token
def test_mistral_templates_give_mistral_commons_ids(template, model, inst_end):
    tok = data.load_tokenizer(FIX / f"{model}.model")
    chat = [{"role": ("user", "assistant")[n % 2], "content": c} for n, c in enumerate(MISTRAL_CHAT)]
    want = MISTRAL_COMMON_IDS[template]
    assert data.prompt_ids([chat], tok, template=template, max_length=256, max_prompt_length=200) == [want]
    # training on the last answer: the same ids up to its EOS, scored from just after the last "[/INST]"
    eos = len(want) - 1 - want[::-1].index(2)
    start = eos - want[eos::-1].index(inst_end) + 1
    batch = data.collate([data.Example(chat[:5], [MISTRAL_CHAT[5]], [0.0])], tok, template=template)
    assert batch["tokens"][0].tolist() == want[:eos + 1]
    assert batch["loss_mask"][0].tolist() == [False] * start + [True] * (eos + 1 - start)


def test_mistral_v3_puts_the_system_prompt_in_the_last_user_turn(sp_v3):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "mistral_v3.model"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo there "}, {"role": "user", "content": "Bye"}]
    # mistral-common v3: [INST] text [/INST] with the text encoded alone; earlier answers without trailing
    # spaces, then EOS; the system prompt + "\n\n" opens the last user turn
    want = [3, *sp.encode("Hi"), 4, *sp.encode("Yo there"), 2, 3, *sp.encode("Be brief.\n\nBye"), 4]
    assert data.encode_chat(sp_v3, "mistral_v3", data.render("mistral_v3", chat)) == want


def test_a_mistral_template_that_does_not_fit_the_tokenizer_is_refused(sp_v1, sp_v3):
    # the v1 template on v3 would spell "▁" + [INST]'s text out around control tokens: wrong ids, no error
    with pytest.raises(ValueError, match=r"template 'mistral' does not fit tokenizer 'mistral_v3.model', where "
                                         r"\[INST\] is a control token: use 'mistral_v3'"):
        data.collate([data.Example("p", ["a"], [0.0])], sp_v3, template="mistral")
    with pytest.raises(ValueError, match=r"template 'mistral_v3' does not fit tokenizer 'mistral_v1.model', where "
                                         r"\[INST\] is plain text: use 'mistral'"):
        data.end_of_turn(sp_v1, "mistral_v3")


@pytest.fixture(scope="module")
def template_tokenizers(sp_v1, sp_v3, tmp_path_factory):
    """Each template with a tokeniser whose special tokens include its end-of-turn marker."""
    d = tmp_path_factory.mktemp("tok")
    _write_tiktoken_file(d / "tokenizer.model", [b"is", b"Th", b"This", b" is", b" t", b"es"])
    _write_tekken(d / "tekken.json", ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"])
    return {"none": sp_v1, "mistral": sp_v1, "mistral_v3": sp_v3, "zephyr": sp_v1,
            "llama3": data.load_tokenizer(d / "tokenizer.model"),
            "chatml": data.load_tokenizer(d / "tekken.json")}


@pytest.mark.parametrize("template", ["none", "mistral", "mistral_v3", "zephyr", "llama3", "chatml"])
def test_scored_tokens_are_exactly_the_response_tokens_and_end_of_turn(template_tokenizers, template):
    tok = template_tokenizers[template]
    examples = [data.Example("What is 2+2?", ["4", "Four, of course."], [1.0, 0.0]),
                data.Example([{"role": "user", "content": "Say hi"}], [" hi  there", "Hello!\n"], [0.5, 2.0])]
    batch = data.collate(examples, tok, template=template, max_length=512, max_prompt_length=256)
    assert batch["tokens"].shape[0] == 4 and batch["rewards"].tolist() == [[1.0, 0.0], [0.5, 2.0]]
    eot = data.TEMPLATES[template][2]
    end = [tok.eos_id] if eot in (None, "</s>") else [tok.special_ids[eot]]  # one token: the marker or EOS
    assert data.end_of_turn(tok, template) == end
    for b, ex in enumerate(examples):
        prompt = [tok.bos_id] + data.encode_chat(tok, template, data.render(template, ex.prompt))
        for k, y in enumerate(ex.responses):
            row, mask = batch["tokens"][b * 2 + k], batch["loss_mask"][b * 2 + k]
            # prompt + scored tokens = the whole conversation, up to the response's end of turn
            whole = [tok.bos_id] + data.encode_chat(tok, template, data.render(template, ex.prompt, y))
            assert row[:len(whole)].tolist() == whole and whole[-1:] == end
            assert row[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any() and mask[len(prompt)]
            n = len(whole)
            assert (row[n:] == tok.pad_id).all() and not mask[n:].any()
    assert batch["tokens"].shape[1] == max(int(m.nonzero().max()) + 1 for m in batch["loss_mask"])  # no extra padding
    assert [x.tolist() for x in batch["scored"]] == batch["loss_mask"].nonzero().T.tolist()  # the mask's True positions


def test_an_end_of_turn_marker_that_is_no_special_token_of_the_tokenizer_is_refused(sp_v1):
    byte = data.load_tokenizer("byte")
    with pytest.raises(ValueError, match=r"template 'llama3'.*'<\|eot_id\|>' is not a special token of "
                                         r"tokenizer 'byte'"):
        data.collate([data.Example("p", ["a"], [0.0])], byte, template="llama3")
    with pytest.raises(ValueError, match="template 'chatml'.*tokenizer 'mistral_v1.model'"):
        data.end_of_turn(sp_v1, "chatml")
    assert data.end_of_turn(byte, "zephyr") == [byte.eos_id]  # "</s>" means the tokeniser's own EOS


def test_truncation_keeps_bos_and_prompt_end_and_the_response_start():
    tok = data.load_tokenizer("byte")
    ex = [data.Example("0123456789", ["abcdefgh", "xy"], [1.0, 0.0])]
    batch = data.collate(ex, tok, max_length=10, max_prompt_length=5)
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    assert batch["tokens"].tolist() == [[bos, *b"6789", *b"abcde"], [bos, *b"6789", *b"xy", eos, pad, pad]]
    assert batch["tokens"][0][batch["loss_mask"][0]].tolist() == list(b"abcde")  # the EOS was cut too
    assert (batch["prompts_truncated"], batch["responses_truncated"]) == (1, 1)
    # the left edge: a response that exactly fits keeps its EOS and is not counted
    fit = data.collate([data.Example("", ["abcd"], [0.0])], tok, max_length=6, max_prompt_length=1)
    assert fit["tokens"].tolist() == [[bos, *b"abcd", eos]] and fit["responses_truncated"] == 0
    assert fit["loss_mask"].tolist() == [[False] + [True] * 5]


def test_collate_rejects_mixed_k_and_bad_lengths():
    tok = data.load_tokenizer("byte")
    with pytest.raises(ValueError, match="same K"):
        data.collate([data.Example("p", ["a", "b"], [1, 0]), data.Example("p", ["a"], [0])], tok)
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.collate([data.Example("p", ["a"], [0])], tok, max_length=8, max_prompt_length=8)




def test_prompt_ids_are_the_tokens_before_the_scored_response():
    tok = data.load_tokenizer("byte")
    ids = data.prompt_ids(["12+3=", "a much longer prompt than fits"], tok, max_length=16, max_prompt_length=8)
    assert ids[0] == [tok.bos_id] + list(b"12+3=")
    assert ids[1] == [tok.bos_id] + list(b"an fits")  # BOS kept, the end of the prompt kept: 8 tokens


# The chat_template of Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json on the Hugging Face hub, as published
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n")


@pytest.mark.parametrize("chat", [
    [{"role": "user", "content": "What is 2+2?"}],  # no system message: Qwen's default one is added
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour.\n"}],
    [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Later rules."},  # a later system: a turn
     {"role": "user", "content": " café\n\n 東京 "}],
])
def test_qwen_template_gives_transformers_apply_chat_template_text_and_ids(tmp_path, chat):
    transformers = pytest.importorskip("transformers")
    ref = _train_bpe(tmp_path / "tokenizer.json", "split")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=ref, chat_template=QWEN25_CHAT_TEMPLATE)
    tok = data.load_tokenizer(tmp_path)
    text = "".join(t for unit in data.render("qwen", chat) for t, _ in unit)
    assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert data.end_of_turn(tok, "qwen") == [ref.token_to_id("<|im_end|>")]
    want = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert data.prompt_ids([chat], tok, template="qwen", max_length=512, max_prompt_length=400) == [want]
    # training on an answer: the scored tokens are the ones the model sees in the whole conversation
    answer = "Four, of course.\nIt is 4."
    full = hf.apply_chat_template(chat + [{"role": "assistant", "content": answer}], tokenize=True,
                                  return_dict=False)
    batch = data.collate([data.Example(chat, [answer], [0.0])], tok, template="qwen", max_length=512,
                         max_prompt_length=400)
    assert batch["tokens"][0].tolist() == full[:-1]  # the template's last "\n" after <|im_end|> is not scored
    assert batch["tokens"][0][batch["loss_mask"][0]].tolist() == full[len(want):-1]
