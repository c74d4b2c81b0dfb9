"""Pure pieces of the server: per-row logits processing (checked against transformers' own
processors), n-gram bans, incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kubetune.serve.sampling import SamplingParams, banned_ngram_tokens, choose_next_tokens, process_row
from kubetune.serve.text import IncrementalText


def test_processing_matches_transformers_processors():
    torch.manual_seed(0)
    scores = torch.randn(1, 50)
    history = [3, 7, 3, 9, 7, 3, 12]
    params = SamplingParams(max_tokens=4, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, no_repeat_ngram_size=2)
    expected = scores
    ids = torch.tensor([history])
    for processor in (
        RepetitionPenaltyLogitsProcessor(1.3),
        NoRepeatNGramLogitsProcessor(2),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(10),
        TopPLogitsWarper(0.8),
    ):
        expected = processor(ids, expected)
    got = process_row(scores[0], history, params)
    assert torch.equal(torch.isinf(got), torch.isinf(expected[0]))
    finite = ~torch.isinf(got)
    assert torch.allclose(got[finite], expected[0][finite])


@pytest.mark.parametrize("size", [1, 2, 3])
def test_banned_ngrams_match_transformers(size):
    history = [5, 6, 7, 5, 6, 8, 5, 6]
    scores = NoRepeatNGramLogitsProcessor(size)(torch.tensor([history]), torch.zeros(1, 10))
    expected = sorted(torch.nonzero(torch.isinf(scores[0])).flatten().tolist())
    assert sorted(set(banned_ngram_tokens(history, size))) == expected
    assert expected  # the history repeats, so something is banned


def test_rows_follow_their_own_settings():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    greedy = SamplingParams(max_tokens=1)
    penalised = SamplingParams(max_tokens=1, repetition_penalty=100.0)
    sampled = SamplingParams(max_tokens=1, temperature=1.0, top_k=1)  # top-1 sampling is deterministic
    tokens = choose_next_tokens(logits, [[1], [1], []], [greedy, penalised, sampled], [torch.Generator()] * 3)
    assert tokens == [1, 2, 1]


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 100)
    params = [SamplingParams(max_tokens=1, temperature=1.0)] * 4

    def draw():
        gen = torch.Generator().manual_seed(42)
        return [choose_next_tokens(logits, [[]] * 4, params, [gen] * 4) for _ in range(5)]

    assert draw() == draw()


def _stream(tokenizer, text: str, stop=()):
    pieces = IncrementalText(tokenizer, stop)
    out = [pieces.add(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    out.append(pieces.finish())
    return out, pieces


def test_incremental_text_equals_full_decode(tiny):
    tok = tiny.tokenizer
    text = "Fine-tuning 你好，世界 adapts models. 今天天气很好"
    out, pieces = _stream(tok, text)
    assert "".join(out) == tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert all("\ufffd" not in piece for piece in out)  # multi-byte characters are never split
    assert not pieces.stopped


def test_stop_string_is_never_sent(tiny):
    out, pieces = _stream(tiny.tokenizer, "The quick brown fox jumps over the lazy dog.", stop=("lazy", "zzz"))
    assert "".join(out) == "The quick brown fox jumps over the "
    assert pieces.stopped
    # Text that only looks like the start of a stop string is released once it is clear.
    out, pieces = _stream(tiny.tokenizer, "The lady jumps", stop=("lazy",))
    assert "".join(out) == "The lady jumps" and not pieces.stopped
