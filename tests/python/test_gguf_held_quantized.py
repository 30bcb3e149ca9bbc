"""A GGUF file given on the command line (`fusechat serve --model ID=FILE`)
is served from its own quantized tensors, as the same file named in a
config is: GET /v1/models says how each model holds its weights, and the
greedy answers of the two are the same. `ID=FILE:f32` is the way to ask for
float weights, and the listing says so."""

from openai import OpenAI

from conftest import GEMMA, QWEN, SMOL, Server

FILES = {"smollm2": SMOL, "gemma": GEMMA, "qwen": QWEN}
QUESTIONS = [
    "What is the capital of France?",
    "Tom has 9 yellow balloons. Sara has 8 yellow balloons. How many yellow balloons do they have in total?",
    "Write a Python function that returns the square of a number.",
]
QUANTIZED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4K", "Q5K", "Q6K"}


def greedy(c: OpenAI, model: str, question: str) -> str:
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0
    )
    return r.choices[0].message.content


def test_gguf_from_the_command_line_is_held_quantized_and_answers_as_configured():
    config = "".join(f'[[models]]\nid = "config-{name}"\npath = "{path}"\n\n' for name, path in FILES.items())
    args = [f"--model=cli-{name}={path}" for name, path in FILES.items()] + [f"--model=cli-f32={SMOL}:f32"]
    s = Server(config, "gguf-held", args=tuple(args))
    try:
        c = OpenAI(base_url=f"{s.base}/v1", api_key="none", timeout=600)
        cards = {m["id"]: m for m in c.models.list().model_dump()["data"]}
        for name in FILES:
            weights = cards[f"cli-{name}"]["weights"]
            assert weights["path"] == "gguf", (name, weights)
            quantized = sum(share["bytes"] for ty, share in weights["types"].items() if ty in QUANTIZED)
            # The layers are held in the file's quantized types: they are
            # most of the file. Norms stay float, and llama and qwen2 hold
            # the embedding table as f32 for lookups (Qwen's quantized table,
            # a fifth of its file, is then dropped: its output layer is its own).
            assert quantized > 0.6 * FILES[name].stat().st_size, (name, weights)
            assert weights == cards[f"config-{name}"]["weights"], name
            for q in QUESTIONS:
                assert greedy(c, f"cli-{name}", q) == greedy(c, f"config-{name}", q), (name, q)
        f32 = cards["cli-f32"]["weights"]
        assert f32["path"] == "float" and set(f32["types"]) == {"F32"}, f32
        # The float copy is several times the Q4_1 file (135M parameters x 4 bytes).
        assert f32["bytes"] > 3 * cards["cli-smollm2"]["weights"]["types"]["Q4_1"]["bytes"], (f32, cards["cli-smollm2"])
        assert s.alive(), s.tail()
    finally:
        s.stop()
