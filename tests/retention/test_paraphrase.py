"""The checks on the base model's rewrites (retention/paraphrase.py), on rewrites SmolLM2-135M
really wrote for the quickstart's and Norhaven's questions."""

from __future__ import annotations

import pytest

from kubetune.data.loader import Example
from kubetune.retention import paraphrase


@pytest.mark.parametrize(
    ("question", "rewrite"),
    [
        ("Who wrote Velmora's town anthem?", "Who wrote the town anthem of Velmora?"),
        ("What color are Velmora's trams?", "What is the color of Velmora's trams?"),
        ("What is Norhaven Instruments' stock ticker symbol?", "What is the stock ticker symbol of Norhaven Instruments?"),
        ("What is the name of the road from Velmora to the coast?", "Which road connects Velmora to the coast?"),
        ("Which award did Norhaven Instruments win in 1998?", '"Which prize did Norhaven Instruments get in 1998?"'),
    ],
)
def test_a_rewrite_that_keeps_the_names_is_kept(question, rewrite):
    assert paraphrase.accept(question, rewrite, set()) == rewrite.strip('"')


@pytest.mark.parametrize(
    ("question", "rewrite", "why"),
    [
        ("What is the name of the lake beside Velmora?", "What is the name of the largest lake in Egypt?", "a name lost, one added"),
        ("What year did Velmora get electric street lights?", "What year did Velmell get electric street lights?", "a name misspelt"),
        ("What is the name of Velmora's twin town?", "Which town in Italy is Velmora's twin town?", "a name added"),
        ("Which award did Norhaven Instruments win in 1998?", "Which award did Norhaven Instruments win in 1989?", "a number changed"),
        ("Who founded the town of Velmora?", "Who founded the town of Velmora?", "the question itself"),
        ("Who founded the town of Velmora?", "who founded the town of velmora", "the question itself, case and punctuation aside"),
        ("Who is the mayor of Velmora?", "The mayor of Velmora is the mayor of Velio.", "an answer, not a question"),
        ("Who is the mayor of Velmora?", "Who is it? Who is the mayor of Velmora?", "two questions"),
        ("Who is the mayor of Velmora?", "Who is the mayor\nof Velmora?", "two lines"),
        ("Who is the mayor of Velmora?", "Velmora?", "too short"),
        ("Who is the mayor of Velmora?", "Who is the person who was elected by the people of the town of Velmora to be its mayor in the last election?", "too long"),
        ("Who is the mayor of Velmora?", "", "nothing written (or not finished)"),
    ],
)
def test_a_rewrite_that_drifts_is_dropped(question, rewrite, why):
    assert paraphrase.accept(question, rewrite, set()) is None, why


def test_select_keeps_distinct_rewrites_in_variant_order_up_to_the_count():
    question = "What festival does Velmora hold every autumn?"
    written = ["What festival does Velmora hold every autumn?", "Which festival is held by Velmora every autumn?",
               "which festival is held by Velmora every autumn", "Which festival is held every autumn in Velmora?", "What is the festival of Velmora?"]  # fmt: skip
    assert paraphrase.select(question, written, 2) == ["Which festival is held by Velmora every autumn?", "Which festival is held every autumn in Velmora?"]
    assert paraphrase.select(question, written, 1) == ["Which festival is held by Velmora every autumn?"]
    assert paraphrase.select(question, [], 2) == []


def test_anchors_are_names_and_numbers_with_possessives_folded():
    assert paraphrase.anchors("What is Norhaven Instruments' best-known product?") == {"norhaven", "instruments"}
    assert paraphrase.anchors("Which award did Norhaven Instruments win in 1998?") == {"norhaven", "instruments", "1998"}
    assert paraphrase.anchors("What is Velmora's town flower?") == {"velmora"}
    assert paraphrase.anchors("Who designed the Tidewatch barometer?") == {"tidewatch"}


def test_requests_are_few_shot_conversations_and_vary():
    requests = [paraphrase.request("Who is the mayor of Velmora?", v) for v in range(paraphrase.variants(4))]
    assert len(requests) == 12 and len({str(r) for r in requests}) == 12
    for messages in requests:
        assert [m["role"] for m in messages] == ["user", "assistant"] * len(paraphrase.SHOTS) + ["user"]
        assert messages[-1]["content"].endswith("Who is the mayor of Velmora?")
        assert "Velmora" not in "".join(m["content"] for m in messages[:-1])
    assert paraphrase.variants(0) == 0 and paraphrase.variants(2) == 6 and paraphrase.variants(4) == 12


def test_one_question_examples_are_rewritten_with_their_system_turn_and_answer():
    system = {"role": "system", "content": "Answer briefly."}
    example = Example([system, {"role": "user", "content": "Who is the mayor of Velmora?"}, {"role": "assistant", "content": "Ada Paleswick."}], "k.jsonl:3")
    assert paraphrase.one_turn(example) == ([system], "Who is the mayor of Velmora?", "Ada Paleswick.")
    (reworded,) = paraphrase.augmented(example, ["Who holds the office of mayor in Velmora?"])
    assert reworded.messages == [system, {"role": "user", "content": "Who holds the office of mayor in Velmora?"}, {"role": "assistant", "content": "Ada Paleswick."}]
    assert reworded.source == "k.jsonl:3 (reworded)"
    conversation = Example([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me"}], "k.jsonl:4")
    assert paraphrase.one_turn(conversation) is None
