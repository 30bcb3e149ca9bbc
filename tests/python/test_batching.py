"""Continuous batching must not change what a sequence says: greedy answers
to requests that arrive while others are decoding must equal the answers
each request gets alone.

mistralrs 0.8.1 on the CPU fails this: with `max_seqs` > 1 the answers come
back with words of the other requests (found in fusion data, where answers
about a restaurant bill counted seashells). So the embedded
config/serve.toml runs one sequence at a time; the batched case is kept as
an expected failure that turns into a test failure (strict xfail) the day
the engine gets it right, so the default can then go back to batching.
"""

import threading
import time

import pytest
from openai import OpenAI

from conftest import SMOL, Server

QUESTIONS = [
    "Joan found 70 seashells on the beach. She gave Sam some of her seashells. She has 27 seashells left. How many seashells did she give to Sam?",
    "After eating at the restaurant, Sally, Sam, and Alyssa decided to divide the bill evenly. If each person paid 45 dollars, what was the total of the bill?",
    "Mary is baking a cake. The recipe wants 8 cups of flour. She already put in 2 cups. How many more cups does she need to add?",
    "Tom has 9 yellow balloons. Sara has 8 yellow balloons. How many yellow balloons do they have in total?",
    "Tim's cat had kittens. He gave 3 to Jessica and 6 to Sara. He now has 9 kittens left. How many kittens did he have to start with?",
]


def config(max_seqs: int) -> str:
    return f"""
[[models]]
id = "smollm2-135m-instruct"
path = "{SMOL}"
max_seqs = {max_seqs}
max_waiting = 16
isq = "q8_0"
float_layers = ["q_proj", "down_proj"]
"""


def answers_alone_and_staggered(server: Server):
    c = OpenAI(base_url=f"{server.base}/v1", api_key="none", timeout=600)

    def ask(q):
        r = c.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": q}],
            max_tokens=48,
            temperature=0,
        )
        return r.choices[0].message.content

    alone = [ask(q) for q in QUESTIONS]
    together = [None] * len(QUESTIONS)

    def later(i):
        time.sleep(0.8 * i)  # each joins while the earlier ones decode
        together[i] = ask(QUESTIONS[i])

    threads = [threading.Thread(target=later, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return alone, together


def check(alone, together):
    differ = [(i, a, t) for i, (a, t) in enumerate(zip(alone, together)) if a != t]
    assert not differ, "answers changed when requests overlapped:\n" + "\n".join(
        f"[{i}] alone: {a!r}\n    together: {t!r}" for i, a, t in differ
    )


def test_one_sequence_at_a_time_answers_as_alone():
    s = Server(config(1), "batch1")
    try:
        check(*answers_alone_and_staggered(s))
    finally:
        s.stop()


@pytest.mark.xfail(strict=True, reason="mistralrs 0.8.1 continuous batching on the CPU mixes sequences")
def test_batched_decoding_answers_as_alone():
    s = Server(config(4), "batch4")
    try:
        check(*answers_alone_and_staggered(s))
    finally:
        s.stop()
