"""The batching engine: batched greedy output equals `model.generate` on each prompt alone,
requests join a running batch, each row keeps its own settings, the queue is bounded."""

from __future__ import annotations

import queue

import pytest
from serve_helpers import reference_ids

from kubetune.serve.engine import Delta, Engine, Failed, Finished, QueueFull
from kubetune.serve.sampling import SamplingParams

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog and then",
    "Kubernetes runs containers in pods",
    "你好，世界。今天天气很好",
    "Question: What is the capital of France? Answer:",
    "LoRA",
]


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=True)


def _drain(engine, handles):
    """Drive the engine by hand until every handle finished; returns {handle: [token ids per index]}."""
    done: dict[int, dict[int, list[int]]] = {id(h): {} for h in handles}
    while any(len(done[id(h)]) < h.n for h in handles):
        engine.step()
        for h in handles:
            while True:
                try:
                    event = h.next_event_blocking(timeout=0)
                except queue.Empty:
                    break
                if isinstance(event, Failed):
                    raise AssertionError(event.message)
                if isinstance(event, Finished):
                    done[id(h)][event.index] = event.token_ids
    return [[done[id(h)][i] for i in range(h.n)] for h in handles]


def test_one_batch_of_different_lengths_equals_generate(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    tok = tiny.tokenizer
    special = SamplingParams(max_tokens=30, repetition_penalty=1.3, no_repeat_ngram_size=2)
    requests = [(_ids(tok, p), SamplingParams(max_tokens=30)) for p in PROMPTS] + [(_ids(tok, PROMPTS[1]), special)]
    handles = [engine.submit(ids, params) for ids, params in requests]
    engine.step()
    # All seven rows were prefilled together, then decoded together.
    assert _forward_sizes(engine) == (2, 2 * len(requests))
    outputs = _drain(engine, handles)
    for (ids, params), (got,) in zip(requests, outputs):
        expected = reference_ids(
            tiny.model, ids, 30, engine.eos_ids,
            repetition_penalty=params.repetition_penalty, no_repeat_ngram_size=params.no_repeat_ngram_size,
        )  # fmt: skip
        assert got == expected
    assert outputs[1] != outputs[-1]  # the penalised row really ran with its own settings


def _forward_sizes(engine) -> tuple[float, float]:
    """(forward passes, rows summed over them) from the batch-size histogram."""
    samples = {s.name: s.value for s in engine.metrics.batch_size.collect()[0].samples}
    return samples["kubetune_serve_batch_size_count"], samples["kubetune_serve_batch_size_sum"]


def test_requests_join_a_running_batch_and_leave_it_independently(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    tok = tiny.tokenizer
    long_ids, short_ids, mid_ids = _ids(tok, PROMPTS[1]), _ids(tok, PROMPTS[0]), _ids(tok, PROMPTS[4])
    first = engine.submit(long_ids, SamplingParams(max_tokens=40))
    for _ in range(5):  # prefill + four decode steps of the first request alone
        engine.step()
    assert engine.running == 1
    joined = [engine.submit(short_ids, SamplingParams(max_tokens=8)), engine.submit(mid_ids, SamplingParams(max_tokens=25))]
    engine.step()
    assert engine.running == 3
    outputs = _drain(engine, [first] + joined)
    assert engine.running == 0
    for ids, n, (got,) in zip([long_ids, short_ids, mid_ids], [40, 8, 25], outputs):
        assert got == reference_ids(tiny.model, ids, n, engine.eos_ids)


def test_n_choices_and_seeds(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    ids = _ids(tiny.tokenizer, PROMPTS[2])
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    (first,) = _drain(engine, [engine.submit(ids, params, n=3)])
    (again,) = _drain(engine, [engine.submit(ids, params, n=3)])
    assert first == again  # same seed, same answers
    assert len({tuple(c) for c in first}) == 3  # the three choices are different samples


def test_beam_search_runs_alone_and_equals_generate(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    ids = _ids(tiny.tokenizer, PROMPTS[4])
    (got,) = _drain(engine, [engine.submit(ids, SamplingParams(max_tokens=15, num_beams=3), n=2)])
    expected = reference_ids(tiny.model, ids, 15, engine.eos_ids, num_beams=3)
    assert got[0] == expected
    assert len(got) == 2 and got[1] != got[0]


def test_cancelled_rows_leave_the_batch(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    ids = _ids(tiny.tokenizer, PROMPTS[1])
    gone, stays = engine.submit(ids, SamplingParams(max_tokens=40)), engine.submit(ids[:4], SamplingParams(max_tokens=20))
    engine.step()
    engine.step()
    assert engine.running == 2
    gone.cancel()
    engine.step()
    assert engine.running == 1
    (got,) = _drain(engine, [stays])
    assert got[0] == reference_ids(tiny.model, ids[:4], 20, engine.eos_ids)


def test_bounded_queue_and_threaded_worker(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4, max_queue=2)
    ids = _ids(tiny.tokenizer, PROMPTS[0])
    waiting = [engine.submit(ids, SamplingParams(max_tokens=5)) for _ in range(2)]
    with pytest.raises(QueueFull):
        engine.submit(ids, SamplingParams(max_tokens=5))
    assert engine.queue_depth == 2 and not engine.ready.is_set()
    engine.start()  # answers the waiting requests, then the warm-up
    try:
        assert engine.ready.is_set()
        texts = []
        for handle in waiting:
            text, event = "", None
            while not isinstance(event, Finished):
                event = handle.next_event_blocking(timeout=60)
                text += event.text if isinstance(event, Delta) else ""
            texts.append(text)
        assert texts[0] == texts[1] == tiny.tokenizer.decode(reference_ids(tiny.model, ids, 5, engine.eos_ids))
        out = engine.generate(ids, SamplingParams(max_tokens=5))
        assert out[0].text == texts[0] and out[0].finish_reason == "length"
    finally:
        engine.stop()


def test_prompt_longer_than_the_context_is_refused(tiny):
    engine = Engine(tiny.model, tiny.tokenizer)
    with pytest.raises(ValueError, match="context"):
        engine.submit([5] * engine.context_length, SamplingParams(max_tokens=1))


def _events(handle) -> list:
    out = []
    while True:
        try:
            out.append(handle.next_event_blocking(timeout=0))
        except queue.Empty:
            return out


# Settings that break the arithmetic of one row (the HTTP layer refuses them with a 400; the
# engine must still survive them if they ever get through): a seed beyond 64 bits, and
# penalties/temperatures whose scaled logits overflow to inf/nan.
POISON = [
    SamplingParams(max_tokens=6, temperature=1.0, seed=2**64),
    SamplingParams(max_tokens=6, temperature=1.0, repetition_penalty=5e-324),
    SamplingParams(max_tokens=6, temperature=1e-40),
]


def test_a_poisoned_row_ends_only_its_own_request(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    ids = _ids(tiny.tokenizer, PROMPTS[1])
    innocent_params = SamplingParams(max_tokens=40, ignore_eos=True)
    solo = engine.submit(ids, innocent_params)
    solo_pieces = []  # what the request receives alone, piece by piece
    while not any(isinstance(e, Finished) for e in solo_pieces):
        engine.step()
        solo_pieces += _events(solo)

    innocent = engine.submit(ids, innocent_params)
    # Poison arrives with the innocent request (same prefill), joins it mid-way (its own
    # prefill, then the shared decode steps), and with several rows (n=3) of one request.
    poisoned = [engine.submit(_ids(tiny.tokenizer, PROMPTS[0]), p) for p in POISON]
    received = {id(h): [] for h in [innocent, *poisoned]}
    step = 0
    while not any(isinstance(e, Finished) for e in received[id(innocent)]):
        engine.step()
        step += 1
        if step in (5, 12):
            for params in POISON:
                handle = engine.submit(_ids(tiny.tokenizer, PROMPTS[2]), params, n=3 if step == 12 else 1)
                poisoned.append(handle)
                received[id(handle)] = []
        for handle in [innocent, *poisoned]:
            received[id(handle)] += _events(handle)
        # A failed request leaves the batch at once: only the innocent row keeps running.
        finished = any(isinstance(e, Finished) for e in received[id(innocent)])
        assert engine.running == (0 if finished else 1)
    assert received[id(innocent)] == solo_pieces  # the same pieces, byte for byte, as alone
    for handle in poisoned:
        events = received[id(handle)]
        assert len(events) == 1 and isinstance(events[0], Failed), events
    assert engine.running == 0


def test_the_transformers_cache_api_the_engine_relies_on(tiny):
    """Rows move between batches through transformers' public cache API only (transformers >= 5.24):
    `cache=` in and `.cache` out of the forward, without a deprecation warning; a DynamicCache
    iterates per layer as (keys, values, ...) shaped [rows, heads, tokens, head_dim]; one built
    from such pairs continues generation exactly as the cache it was cut from."""
    import warnings

    import torch
    from transformers import DynamicCache

    model, tok = tiny.model, tiny.tokenizer
    first, second = _ids(tok, PROMPTS[2])[:6], _ids(tok, PROMPTS[4])[:6]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")
        cache = model(input_ids=torch.tensor([first, second]), cache=None, use_cache=True).cache
        assert type(cache) is DynamicCache
        layers = list(cache)
        assert len(layers) == model.config.num_hidden_layers
        kv_heads = model.config.num_key_value_heads
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert all(keys.shape == values.shape == (2, kv_heads, 6, head_dim) for keys, values, *_ in layers)
        second_alone = DynamicCache([(keys[1:], values[1:]) for keys, values, *_ in cache])
        following = torch.tensor([[first[-1]], [second[-1]]])
        both = model(input_ids=following, cache=cache, use_cache=True).logits
        alone = model(input_ids=following[1:], cache=second_alone, use_cache=True).logits
    torch.testing.assert_close(alone[0], both[1])
    assert [keys.shape[2] for keys, *_ in second_alone] == [7] * len(layers)  # the forward appended to the cache it was given


def test_joining_and_leaving_use_no_deprecated_transformers_api(tiny):
    import warnings

    engine = Engine(tiny.model, tiny.tokenizer, max_batch=8)
    tok = tiny.tokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        first = engine.submit(_ids(tok, PROMPTS[1]), SamplingParams(max_tokens=12))
        engine.step()
        joined = engine.submit(_ids(tok, PROMPTS[0]), SamplingParams(max_tokens=3))  # joins, then leaves first
        outputs = _drain(engine, [first, joined])
    assert outputs[0][0] == reference_ids(tiny.model, _ids(tok, PROMPTS[1]), 12, engine.eos_ids)
