"""Continuous batching must not change what a sequence says: greedy answers
to requests that decode in one batch must equal the answers each request
gets alone.

mistralrs 0.8.1 on the CPU failed this (found in fusion data, where answers
about a restaurant bill counted seashells): its decode-step attention kernel
kept its scratch buffers without a batch index, so every sequence of a
batched step got the last sequence's attention output. The workspace patches
it (vendor/README.md). The batched test sends three prompts of exactly equal
token count together, while a longer request keeps the engine busy so that
all three wait and are prefilled in one step. Against the unpatched build it
failed on every run (two of the three answers took the third one's words);
patched, the answers and their logprobs are identical to the ones each
request gets alone.

The patched engine also decodes sequences of different lengths in one step
(llama, qwen2 and gemma3 on the CPU: their KV caches are left-padded to the
longest and the attention skips the padding). The staggered requests
exercise that: each joins while the earlier ones decode, so they decode
together at different lengths, and must still answer exactly as alone.
(Upstream, they decoded one length at a time; the serving benchmark shows
the difference.) It runs for each of the three GGUF files served as they
are; Gemma's set adds a prompt longer than its 512-token sliding window, so
that its local layers cut the padded cache while shorter sequences decode
beside it.

The batched test runs twice: on SmolLM2's float weights, and on the Q8_0
weights config/serve.toml serves. Quantized layers run fusechat-kernels
(kernels/), which compute each row of a batch with the same instructions as
a row alone; with candle's quantized matmul the Q8_0 logprobs moved by up to
0.15 when batched and a greedy answer took another turn after 19 tokens.

Chunked prefill (`prefill_chunk`) must not change an answer either: the same
model served twice, prompts read whole and 96 tokens a step, gives the same
tokens and logprobs on all three models (Gemma's long prompt crosses its
sliding window inside a chunk). And it must do what it is for: a stream
keeps streaming while a 1,500-token prompt is read, where with whole
prompts it stalls for the entire prefill (the control in the same test).
"""

import threading
import time

from openai import OpenAI

import pytest

from conftest import BASE_SMOLLM2, GEMMA, QWEN, SMOL, Server, metric, scrape

MODEL = "smollm2-135m-instruct"
GGUF = {"smollm2-135m-instruct": SMOL, "qwen2.5-coder-0.5b-instruct": QWEN, "gemma-3-270m": GEMMA}

# Three word problems of exactly 24 tokens each (SmolLM2's tokenizer), so
# their chat prompts have equal lengths and the engine may batch them.
EQUAL_LENGTH = [
    "Tom has 9 yellow balloons. Sara has 8 yellow balloons. How many yellow balloons do they have in total?",
    "Sam has 7 red apples. Dan has 5 red apples. How many red apples do they have in total?",
    "Tom has 9 blue marbles. Sara has 8 blue marbles. How many blue marbles do they have in total?",
]

STAGGERED = [
    "Joan found 70 seashells on the beach. She gave Sam some of her seashells. She has 27 seashells left. How many seashells did she give to Sam?",
    "After eating at the restaurant, Sally, Sam, and Alyssa decided to divide the bill evenly. If each person paid 45 dollars, what was the total of the bill?",
    "Mary is baking a cake. The recipe wants 8 cups of flour. She already put in 2 cups. How many more cups does she need to add?",
    "Tom has 9 yellow balloons. Sara has 8 yellow balloons. How many yellow balloons do they have in total?",
    "Tim's cat had kittens. He gave 3 to Jessica and 6 to Sara. He now has 9 kittens left. How many kittens did he have to start with?",
]


def serve_toml_like(max_seqs: int) -> str:
    """SmolLM2 quantized as config/serve.toml has it (Q8_0)."""
    return f"""
[[models]]
id = "{MODEL}"
path = "{SMOL}"
max_seqs = {max_seqs}
max_waiting = 16
isq = "q8_0"
"""


def gguf_as_it_is(model: str, max_seqs: int) -> str:
    """The model's GGUF file served as it is: every tensor in its own type."""
    return f"""
[[models]]
id = "{model}"
path = "{GGUF[model]}"
max_seqs = {max_seqs}
max_waiting = 16
"""


def float_weights(max_seqs: int) -> str:
    if not (BASE_SMOLLM2 / "model.safetensors").is_file():
        pytest.fail(f"{BASE_SMOLLM2} is missing: the Rust import test writes it (scripts/test.sh)")
    return f"""
[[models]]
id = "{MODEL}"
path = "{BASE_SMOLLM2}"
max_seqs = {max_seqs}
max_waiting = 16
"""


def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key="none", timeout=600)


class Answer:
    """A greedy answer with its tokens and their logprobs."""

    def __init__(self, text: str, prompt_tokens: int, tokens):
        self.text = text
        self.prompt_tokens = prompt_tokens
        self.tokens = tokens

    @classmethod
    def of(cls, r):
        choice = r.choices[0]
        return cls(
            choice.message.content,
            r.usage.prompt_tokens,
            [(t.token, t.logprob) for t in choice.logprobs.content],
        )

    def __repr__(self):
        return repr(self.text)


def ask(c: OpenAI, question: str, model: str = MODEL) -> Answer:
    r = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=48,
        temperature=0,
        logprobs=True,
    )
    return Answer.of(r)


def ask_streamed(c: OpenAI, question: str, model: str, decoding: threading.Event) -> Answer:
    """`ask`, streamed: sets `decoding` once the second token has arrived, so
    that the caller knows this sequence is in its decode steps."""
    text, tokens, prompt_tokens = "", [], None
    try:
        for chunk in c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": question}],
            max_tokens=48,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage:
                prompt_tokens = chunk.usage.prompt_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.logprobs:
                    tokens += [(t.token, t.logprob) for t in choice.logprobs.content]
            if len(tokens) >= 2:
                decoding.set()
    finally:
        # A request that failed or ended early must not hold up the next one.
        decoding.set()
    return Answer(text, prompt_tokens, tokens)


def difference(alone: Answer, together: Answer):
    """Where `together` departs from `alone`, or None where they are the same
    tokens with the same logprobs."""
    for i, ((a, a_lp), (t, t_lp)) in enumerate(zip(alone.tokens, together.tokens)):
        if a != t:
            return f"token {i}: {a!r} alone, {t!r} together"
        if abs(a_lp - t_lp) > 1e-4:
            return f"token {i} {a!r}: logprob {a_lp:.5f} alone, {t_lp:.5f} together"
    if len(alone.tokens) != len(together.tokens) or alone.text != together.text:
        return f"{len(alone.tokens)} tokens alone, {len(together.tokens)} together"
    return None


def check(questions, alone, together):
    problems = [
        f"[{q[:40]}...] {why}\n    alone:    {a!r}\n    together: {t!r}"
        for q, a, t in zip(questions, alone, together)
        if (why := difference(a, t))
    ]
    assert not problems, "answers changed when requests were decoded together:\n" + "\n".join(problems)


def in_threads(n: int, body):
    """body(0) .. body(n - 1), each on its own thread; returns when all are
    done and raises the first error any of them raised."""
    errors = []

    def guarded(i):
        try:
            body(i)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def running(server: Server, model: str = MODEL) -> int:
    """The model's fusechat_num_requests_running gauge."""
    value = metric(scrape(server.base), "fusechat_num_requests_running", model=model)
    assert value is not None, "no fusechat_num_requests_running for the model in /metrics"
    return int(value)


def alone_answers(server: Server, questions, model: str = MODEL):
    c = client(server)
    return [ask(c, q, model) for q in questions]


def staggered(server: Server, interruptions: int = 0, questions=STAGGERED, model: str = MODEL, together=True):
    """The answers to `questions` when each request joins while the earlier
    ones decode: request i is sent once request i - 1 has streamed its second
    token (a fixed delay let a fast machine finish each answer before the
    next one arrived). With `interruptions`, one-token requests keep arriving
    meanwhile: each is a prompt step between decode steps that ends its
    sequence at once, after which only waiting sequences are left
    (upstream's scheduler then prefilled the decoding ones all over again).
    With `together`, fails when no two of them ever ran at once (the running
    gauge)."""
    c = client(server)
    answers = [None] * len(questions)
    seen = []
    done = threading.Event()

    decoding = [threading.Event() for _ in questions]

    def join(i):
        if i > 0:
            assert decoding[i - 1].wait(600), f"request {i - 1} never started decoding"
        answers[i] = ask_streamed(c, questions[i], model, decoding[i])

    def interrupt(j):
        time.sleep(0.5 + 0.3 * j)
        c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"Say {j}."}],
            max_tokens=1,
        )

    def watch():
        while not done.is_set():
            seen.append(running(server, model))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    n = len(questions)
    try:
        in_threads(n + interruptions, lambda i: join(i) if i < n else interrupt(i - n))
    finally:
        done.set()
        watcher.join()
    assert not together or max(seen, default=0) >= 2, (
        f"the requests never decoded together (running gauge: {sorted(set(seen))}): the test proves nothing"
    )
    return answers


def equal_lengths_in_one_step(server: Server):
    c = client(server)
    alone = alone_answers(server, EQUAL_LENGTH)
    lengths = {a.prompt_tokens for a in alone}
    assert len(lengths) == 1, f"the prompts must have one length to be batched, got {lengths}"

    # A longer request keeps the engine stepping; the three arrive while it
    # decodes, so they wait together and are scheduled together.
    blocker = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": " ".join(STAGGERED)}],
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    chunks = iter(blocker)
    next(chunks)
    together = [None] * len(EQUAL_LENGTH)
    barrier = threading.Barrier(len(EQUAL_LENGTH))
    seen = []  # the running gauge while they decode: were they batched?
    done = threading.Event()

    def at_once(i):
        barrier.wait()
        together[i] = ask(c, EQUAL_LENGTH[i])

    def watch():
        while not done.is_set():
            seen.append(running(server))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        in_threads(len(EQUAL_LENGTH), at_once)
    finally:
        done.set()
        watcher.join()
    for _ in chunks:
        pass
    assert max(seen, default=0) >= len(EQUAL_LENGTH), (
        f"the requests never ran together (running gauge: {sorted(set(seen))}): the test proves nothing"
    )
    return alone, together


def test_one_sequence_at_a_time_answers_as_alone():
    s = Server(serve_toml_like(1), "batch1")
    try:
        check(STAGGERED, alone_answers(s, STAGGERED), staggered(s, together=False))
    finally:
        s.stop()


@pytest.mark.parametrize("weights", ["float", "q8_0"])
def test_batched_decoding_answers_as_alone(weights):
    config = float_weights(4) if weights == "float" else serve_toml_like(4)
    s = Server(config, f"batch4-{weights}")
    try:
        check(EQUAL_LENGTH, *equal_lengths_in_one_step(s))
        alone = alone_answers(s, STAGGERED)
        check(STAGGERED, alone, staggered(s))
        check(STAGGERED, alone, staggered(s, interruptions=8))
        assert s.alive(), s.tail()
    finally:
        s.stop()


# Longer than Gemma 3's 512-token sliding window once templated.
LONG = "Answer the last question. " + " ".join(STAGGERED * 6)


@pytest.mark.parametrize("model", list(GGUF))
def test_gguf_decoding_of_different_lengths_answers_as_alone(model):
    # Gemma's long prompt first: it decodes past its window while the short
    # ones join.
    questions = [LONG] + STAGGERED if model == "gemma-3-270m" else STAGGERED
    s = Server(gguf_as_it_is(model, 8), f"ragged-{model}")
    try:
        alone = alone_answers(s, questions, model)
        if model == "gemma-3-270m":
            assert alone[0].prompt_tokens > 512, f"the long prompt has {alone[0].prompt_tokens} tokens"
        check(questions, alone, staggered(s, questions=questions, model=model))
        check(questions, alone, staggered(s, interruptions=8, questions=questions, model=model))
        assert s.alive(), s.tail()
    finally:
        s.stop()


def whole_and_chunked(model: str, chunk: int) -> str:
    """The model's GGUF twice: `whole` prefills a prompt in one step,
    `chunked` `chunk` tokens a step."""
    return "".join(
        f"""
[[models]]
id = "{name}"
path = "{GGUF[model]}"
max_seqs = 4
max_waiting = 16
prefill_chunk = {tokens}
"""
        for name, tokens in (("whole", 0), ("chunked", chunk))
    )


@pytest.mark.parametrize("model", list(GGUF))
def test_chunked_prefill_answers_as_whole(model):
    # Chunks of 96 tokens: Gemma's long prompt crosses its 512-token sliding
    # window in the middle of a chunk.
    s = Server(whole_and_chunked(model, 96), f"chunked-{model}")
    lengths = []
    try:
        c = client(s)
        for question in (LONG, STAGGERED[0]):
            whole, chunked = ask(c, question, "whole"), ask(c, question, "chunked")
            why = difference(whole, chunked)
            assert why is None, f"[{question[:40]}...] {why}\n    whole:   {whole!r}\n    chunked: {chunked!r}"
            lengths.append(chunked.prompt_tokens)
        assert lengths[0] > 512 and lengths[1] < 96, f"prompt lengths {lengths}: one must be chunked, one not"
    finally:
        s.stop()


# About 1,500 prompt tokens for SmolLM2.
VERY_LONG = "Answer the last question. " + " ".join(STAGGERED * 13)


def longest_stall(c: OpenAI, model: str):
    """While a stream decodes, a very long prompt arrives on the same model:
    returns the longest gap (s) between two streamed tokens during its
    prefill, the tokens streamed meanwhile, and its prompt length."""
    stamps = []
    started = threading.Event()

    def stream():
        for _ in c.completions.create(
            model=model, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=400, temperature=0, stream=True
        ):
            stamps.append(time.monotonic())
            if len(stamps) == 5:
                started.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert started.wait(120), "the stream did not start"
    sent = time.monotonic()
    long = c.completions.create(model=model, prompt=VERY_LONG, max_tokens=1, temperature=0)
    answered = time.monotonic()
    streamer.join()
    assert stamps[-1] > answered, "the stream ended before the long prompt was read: the test proves nothing"
    during = [t for t in stamps if sent <= t <= answered]
    edges = [sent] + during + [answered]
    return max(b - a for a, b in zip(edges, edges[1:])), len(during), long.usage.prompt_tokens


def test_chunked_prefill_keeps_streams_going():
    s = Server(whole_and_chunked("smollm2-135m-instruct", 64), "chunked-stall")
    try:
        c = client(s)
        whole_gap, _, prompt_tokens = longest_stall(c, "whole")
        chunked_gap, chunked_tokens, _ = longest_stall(c, "chunked")
        assert prompt_tokens > 1200, f"the long prompt has only {prompt_tokens} tokens"
        # Whole, the stream waits for the entire prefill; chunked, for one
        # chunk of 64 tokens (and a decode step) at a time.
        assert chunked_tokens >= 5 and chunked_gap < whole_gap / 3, (
            f"longest gap between streamed tokens while a {prompt_tokens}-token prompt was read: "
            f"{whole_gap:.3f} s whole, {chunked_gap:.3f} s chunked ({chunked_tokens} tokens streamed meanwhile)"
        )
        assert s.alive(), s.tail()
    finally:
        s.stop()
