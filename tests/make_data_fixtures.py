"""Record the reference tokenisers' ids for tests/test_data.py (run once; not part of the test suite).

    pip download --no-deps mistral-common -d /tmp/mc && unzip -q /tmp/mc/*.whl -d /tmp/mc/x
    pip download --no-deps --no-binary :all: openai-whisper -d /tmp/ow && tar xzf /tmp/ow/*.tar.gz -C /tmp/ow
    pip install sentencepiece          # the oracle for Mistral's tokenizer.model
    python tests/make_data_fixtures.py --mistral-common /tmp/mc/x --whisper /tmp/ow/openai_whisper-20250625

Copies the Apache-2.0 Mistral tokenizer.model v1 / v3 (mistral-common wheel) and the MIT gpt2.tiktoken
(openai-whisper sdist) into tests/fixtures/data/, and writes tokenizer_ids.json with the ids of TEXTS from
- sentencepiece (v1, v3),
- tiktoken's own r50k_base (its pattern, fed the local gpt2.tiktoken through tiktoken's cache: no download),
- mistral-common's Tekkenizer on tekken_240718.json (if mistral_common imports; the 15 MB file itself
  is not committed: tests read it from the installed mistral-common wheel and compare with these ids).
None of these libraries is used by data.py.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "data"

TEXTS = [
    "This is a test sentence.",
    "Noise contrastive alignment optimises the absolute likelihood of each response, not only the margin "
    "between a chosen and a rejected answer; the chosen likelihood therefore no longer falls during training.",
    "def sequence_logps(h, W, targets, mask):\n    logits = h @ W.T  # [B, T, V]\n\treturn (logits * mask).sum(-1)\n",
    "In 2023, 1,234,567 people paid $3.50 (≈€3.20) — 12.5% more than in 1999; π ≈ 3.14159, e^(iπ) = -1.",
    "  two leading spaces, double  spaces,   three, and a trailing space ",
    " one leading space",
    "a" + " " * 20 + "twenty spaces" + " " * 37 + "thirty-seven",
    "Line one\nLine two\n\n\nafter three newlines\r\nwindows line\r\n",
    "\ttab\t\tdouble tab\n",
    "Français : « déjà vu », naïve café, Straße, Ærøskøbing, żółć, Ελληνικά, Русский текст.",
    "中文分词测试：今天天气很好。日本語のテキスト、カタカナとひらがな。한국어 문장입니다.",
    "العربية وهي لغة جميلة · हिन्दी भाषा · ภาษาไทย · עברית",
    "Emoji 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣ and ✨⭐.",
    "Rare symbols that fall back to bytes: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓂀 🜁 \U0010fffd",
    "Control characters: \x00\x01\x07\x1b[31m end",
    '{"prompt": "What is 2+2?", "responses": ["4", "5"], "rewards": [10, 1]}',
    "https://example.com/path?query=1&x=%20y#frag and user@example.org",
    "$$\\int_0^1 x^2\\,dx = \\frac{1}{3}$$ and \\(\\alpha \\to 0\\)",
    "[INST] What is the capital of France? [/INST] Paris.</s>",
    "<s> <|user|>\nHello</s>\n<|assistant|>\n",
    "[REFERENCE_DOC_3] a user-defined piece in Mistral v3",
    "UPPERCASE lowercase MiXeD CamelCaseWord snake_case_word kebab-case-word",
    "don't won't it's we're they've I'm you'll he'd",
    "x",
    " ",
    "",
    "▁ a literal lower one eighth block ▁▁ twice",
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mistral-common", required=True, help="unpacked mistral-common wheel (holds mistral_common/data)")
    p.add_argument("--whisper", required=True, help="unpacked openai-whisper sdist (holds whisper/assets)")
    args = p.parse_args()
    data = Path(args.mistral_common) / "mistral_common" / "data"
    FIXTURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(data / "tokenizer.model.v1", FIXTURES / "mistral_v1.model")
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", FIXTURES / "mistral_v3.model")
    shutil.copy(Path(args.whisper) / "whisper" / "assets" / "gpt2.tiktoken", FIXTURES / "gpt2.tiktoken")
    out = {"texts": TEXTS}

    import sentencepiece as spm
    for name in ("mistral_v1", "mistral_v3"):
        sp = spm.SentencePieceProcessor(model_file=str(FIXTURES / f"{name}.model"))
        out[name] = [sp.encode(t) for t in TEXTS]

    import tiktoken
    import tiktoken.load
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    with tempfile.TemporaryDirectory() as cache:
        shutil.copy(FIXTURES / "gpt2.tiktoken", Path(cache) / hashlib.sha1(url.encode()).hexdigest())
        os.environ["TIKTOKEN_CACHE_DIR"] = cache  # tiktoken checks the file's sha256 against r50k_base's
        r50k = tiktoken.get_encoding("r50k_base")
        out["gpt2"] = [r50k.encode(t, disallowed_special=()) for t in TEXTS]

    sys.path.insert(0, str(args.mistral_common))
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
        tekken = Tekkenizer.from_file(data / "tekken_240718.json")
        out["tekken_240718"] = [tekken.encode(t, bos=False, eos=False) for t in TEXTS]
    except ImportError as e:
        print(f"skipping tekken ids: {e}")

    (FIXTURES / "tokenizer_ids.json").write_text(json.dumps(out, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURES / 'tokenizer_ids.json'}: {', '.join(k for k in out if k != 'texts')}")


if __name__ == "__main__":
    main()
