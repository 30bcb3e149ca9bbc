"""The folders written by `fusechat import` load in Hugging Face transformers and behave like
the GGUF files they came from.

Inputs:

* FUSECHAT_IMPORTED_DIR: a folder with the imported models in subfolders
  `smollm2-135m-instruct`, `gemma-3-270m`, `qwen2.5-coder-0.5b-instruct`. The Rust test
  `models/tests/import_roundtrip.rs`, run with the same variable set, writes them there, plus
  `<name>.greedy.json` with the greedy ids mistral.rs produced from the imported folder (and,
  where mistral.rs runs the GGUF file correctly, from the GGUF file).
* The GGUF files in `$FUSECHAT_HOME/models` (default `~/.cache/fusechat/models`).

The reference is the GGUF file itself, read by code nobody here wrote: transformers' own GGUF
loader (it dequantizes the file and converts its tokenizer) and, for Gemma's SentencePiece
vocabulary, Google's sentencepiece library. Checks:

1. transformers loads each folder with AutoTokenizer and AutoModelForCausalLM.
2. The folder's tokenizer encodes a set of strings (ASCII, digits, unicode, code, whitespace
   runs, chat-templated text) to the same ids as the reference tokenizer.
3. Greedy decoding of the folder in transformers starts with the same tokens as transformers
   running the GGUF file, and as mistral.rs running the folder.
"""

import json
import os
from pathlib import Path

import pytest

import torch
import transformers

MODELS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m": "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}

# How many leading greedy tokens must agree with mistral.rs running the GGUF file.
FIRST_TOKENS = 5

STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces, trailing spaces  ",
    "Numbers: 12345, 3.14159, 1,000,000 and 2024-11-27; 007",
    "unicode: café naïve Ünïcödé — “quotes” … 日本語のテキスト 中文 한국어 Ελληνικά",
    (EMOJI := "emoji 🙂👍🏽 👨‍👩‍👧‍👦 symbols ©®™ ∑∫√ ½"),
    "code:\ndef add(a, b):\n    return a + b\n\n\tif x:\n\t\treturn [i**2 for i in range(10)]\n",
    'JSON {"key": [1, 2, 3], "nested": {"a": null}}',
    "mixed CaSe I'm you're we'll they'd DON'T",
    "multiple\n\n\nnewlines\r\nand CRLF\n",
    "URL https://example.com/path?q=1&r=2#frag",
    "     many     spaces     ",
    "a",
    " ",
    "\n",
    "",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


def imported_dir():
    value = os.environ.get("FUSECHAT_IMPORTED_DIR")
    if not value:
        pytest.fail("FUSECHAT_IMPORTED_DIR is not set (run models/tests/import_roundtrip.rs with it first)")
    return Path(value)


def model_folder(name):
    folder = imported_dir() / name
    if not (folder / "config.json").is_file():
        pytest.fail(f"{folder} has no imported model")
    return folder


def gguf_file(name):
    home = Path(os.environ.get("FUSECHAT_HOME") or Path.home() / ".cache" / "fusechat")
    path = home / "models" / MODELS[name]
    if not path.is_file():
        pytest.fail(f"{path} not found")
    return path


def load_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def texts_for(tokenizer):
    """The test strings plus the chat-templated conversation (when there is a template)."""
    texts = list(STRINGS)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
    return texts


def ours(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- reference tokenizers


def gguf_metadata(path):
    import gguf
    reader = gguf.GGUFReader(str(path))

    def field(key):
        f = reader.fields[key]
        if len(f.types) > 1 and f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        return f.contents()

    return field


def sentencepiece_from_gguf(path):
    """Google's SentencePiece BPE run on a model proto rebuilt from the GGUF vocabulary."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    field = gguf_metadata(path)
    tokens = field("tokenizer.ggml.tokens")
    scores = field("tokenizer.ggml.scores")
    types = field("tokenizer.ggml.token_type")
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = field("tokenizer.ggml.unknown_token_id")
    proto.trainer_spec.bos_id = field("tokenizer.ggml.bos_token_id")
    proto.trainer_spec.eos_id = field("tokenizer.ggml.eos_token_id")
    proto.trainer_spec.pad_id = field("tokenizer.ggml.padding_token_id")
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix"))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        # llama.cpp's converter writes the spaces of user-defined pieces as real spaces
        # ("pre-normalize user-defined spaces"); SentencePiece matches those pieces in the
        # normalized text, where spaces are already "\u2581", so spell them that way again.
        piece.piece = token.replace(" ", "\u2581") if kind == 4 else token
        piece.score = score
        piece.type = kind  # the GGUF token types are SentencePiece's piece types
    processor = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    control = sorted((t for t, k in zip(tokens, types) if k == 3), key=len, reverse=True)
    control_ids = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == 3}

    def encode(text):
        # SentencePiece never matches control tokens in text; llama.cpp and HF do (special
        # tokens parsed), so split them off first.
        ids, rest = [], text
        while rest:
            hits = [(rest.find(c), -len(c), c) for c in control if c in rest]
            if not hits:
                ids += processor.encode(rest)
                break
            pos, _, tok = min(hits)
            if pos:
                ids += processor.encode(rest[:pos])
            ids.append(control_ids[tok])
            rest = rest[pos + len(tok):]
        return ids

    return encode


def transformers_gguf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(MODELS))
def test_folder_loads_in_transformers(name):
    folder = model_folder(name)
    tokenizer = load_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    config = json.loads((folder / "config.json").read_text())
    assert type(model).__name__ == config["architectures"][0]
    assert model.get_input_embeddings().weight.shape[0] == config["vocab_size"]
    assert len(tokenizer) <= config["vocab_size"]
    # Nothing was left uninitialized: every parameter came from model.safetensors.
    with torch.no_grad():
        ids = torch.tensor([tokenizer.encode("Hello", add_special_tokens=True)])
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_gemma_tokenizer_matches_sentencepiece():
    name = "gemma-3-270m"
    tokenizer = load_tokenizer(model_folder(name))
    encode = sentencepiece_from_gguf(gguf_file(name))
    texts = texts_for(tokenizer)
    mismatches = [(t, ours(tokenizer, t), encode(t)) for t in texts if ours(tokenizer, t) != encode(t)]
    print(f"{name}: {len(texts) - len(mismatches)}/{len(texts)} strings tokenize as SentencePiece does")
    assert not mismatches, "\n".join(f"{t!r}\n  ours: {g}\n  spm:  {e}" for t, g, e in mismatches)


@pytest.mark.parametrize("name", list(MODELS))
def test_tokenizer_matches_transformers_gguf_conversion(name):
    folder = model_folder(name)
    tokenizer = load_tokenizer(folder)
    reference = transformers_gguf_tokenizer(gguf_file(name))
    texts = texts_for(tokenizer)
    mismatches = []
    for text in texts:
        got, expected = ours(tokenizer, text), reference.encode(text, add_special_tokens=False)
        if got != expected:
            mismatches.append((text, got, expected))
    print(f"{name}: {len(texts) - len(mismatches)}/{len(texts)} strings tokenize as transformers' GGUF conversion does")
    for t, g, e in mismatches:
        print(f"differs on {t!r}:\n  ours:         {g}\n  transformers: {e}")
    # Known, not yet explained: one emoji/ZWJ string in SmolLM2's byte-level BPE (both are
    # conversions of the GGUF vocabulary; the original tokenizer.json is not reachable here).
    # Any other difference, or this one going away, fails the test.
    known = {EMOJI} if name == "smollm2-135m-instruct" else set()
    assert {t for t, _, _ in mismatches} == known, "\n".join(f"{t!r}\n  ours:         {g}\n  transformers: {e}" for t, g, e in mismatches)


def hf_greedy(model, prompt_ids, new_tokens):
    """Plain argmax decoding with the KV cache: no generation config, no early stop."""
    ids, first_logits, past = [], None, None
    step_input = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            if first_logits is None:
                first_logits = logits.numpy()
            token = int(logits.argmax())
            ids.append(token)
            step_input = torch.tensor([[token]])
    return ids, first_logits


def leading_agreement(a, b):
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def greedy_runs(name):
    runs_file = imported_dir() / f"{name}.greedy.json"
    if not runs_file.is_file():
        pytest.fail(f"{runs_file} not found (written by models/tests/import_roundtrip.rs)")
    return json.loads(runs_file.read_text())


def gguf_model(name):
    path = gguf_file(name)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_start_and_logits_match_the_gguf_file(name):
    """transformers on the folder vs transformers on the GGUF file (its own dequantization)."""
    folder = model_folder(name)
    runs = greedy_runs(name)
    reference_model = gguf_model(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for run in runs:
        n = len(run["mistralrs_imported_ids"])
        expected, ref_logits = hf_greedy(reference_model, run["prompt_ids"], n)
        got, logits = hf_greedy(model, run["prompt_ids"], n)
        same = leading_agreement(got, expected)
        diff = abs(logits - ref_logits)
        print(
            f"{name}: folder greedy agrees with the GGUF file on {same}/{n} tokens; first step "
            f"max |logit diff| {diff.max():.4f}, mean {diff.mean():.5f}"
        )
        assert same >= min(FIRST_TOKENS, n), f"folder {got}\nGGUF file {expected}"
        # bf16 rounding of dequantized weights is the only difference.
        assert diff.max() < 0.5, f"first-step logits differ by up to {diff.max()}"


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_start_matches_mistralrs(name):
    """transformers on the folder vs mistral.rs on the same folder (and on the GGUF file where
    mistral.rs runs it correctly)."""
    folder = model_folder(name)
    runs = greedy_runs(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    for run in runs:
        for key, which in (("mistralrs_imported_ids", "mistral.rs on the folder"),
                           ("mistralrs_gguf_ids", "mistral.rs on the GGUF")):
            reference = run.get(key)
            if not reference:
                continue
            got, _ = hf_greedy(model, run["prompt_ids"], len(reference))
            same = leading_agreement(got, reference)
            print(f"{name}: transformers greedy agrees with {which} on {same}/{len(reference)} tokens")
            assert same >= min(FIRST_TOKENS, len(reference)), f"transformers {got}\n{which} {reference}"
