"""The model worker: one thread owns the model and generates for many requests at once.

Continuous dynamic batching. Requests wait in a bounded FIFO queue. When the model is
idle the worker waits `batch_window` seconds for more arrivals, then prefills what fits
(up to `max_batch` sequences) as one left-padded batch; while a batch runs, new requests
join it between decode steps (prefilled on their own, then their KV cache is left-padded
and concatenated onto the running one). Every step feeds each row its own last token with
its own position, chooses each row's next token under that row's settings, and streams the
new text to that row's request only; rows leave the batch as soon as they finish.

With left padding, attention masks and per-row position ids, a greedy row produces the
same tokens as `model.generate` on its prompt alone. Beam search and prompt-learning
adapters (p-tuning, prompt tuning) run one request at a time through `model.generate`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Union

import torch
from transformers import DynamicCache, StoppingCriteria

from .metrics import ServeMetrics
from .sampling import SamplingParams, choose_next_tokens
from .text import IncrementalText

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the caller should retry later."""


class EngineStopped(Exception):
    pass


# Events a request receives, in order, for each of its n sequences.
@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    reason: str  # stop | length
    token_ids: list[int]


@dataclass
class Failed:
    message: str


Event = Union[Delta, Finished, Failed]


@dataclass
class Output:
    text: str
    finish_reason: str
    token_ids: list[int]


class RequestHandle:
    """The caller's side of a submitted request: its events, and a way to cancel it.

    The worker collects a request's events during a step and hands them over once per step,
    so a busy batch wakes each caller's event loop at most once per token.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, n: int, loop: Optional[asyncio.AbstractEventLoop], stream: bool = True):
        self.prompt_ids = prompt_ids
        self.params = params
        self.n = n
        self.stream = stream  # False: the text is decoded once at the end, no per-token pieces
        self.submitted = time.monotonic()
        self.cancelled = False
        self._first_token_seen = False
        self._loop = loop
        self._outbox: list[Event] = []
        self._inbox: deque[Event] = deque()
        self._events: Union[asyncio.Queue, queue.Queue] = asyncio.Queue() if loop is not None else queue.Queue()

    def emit(self, event: Event) -> None:
        self._outbox.append(event)

    def flush(self) -> None:
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        if self._loop is None:
            self._events.put(events)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, events)
        except RuntimeError:  # the caller's event loop is gone
            self.cancelled = True

    async def next_event(self) -> Event:
        if not self._inbox:
            self._inbox.extend(await self._events.get())
        return self._inbox.popleft()

    def next_event_blocking(self, timeout: Optional[float] = None) -> Event:
        """The next event; raises queue.Empty when none arrives within `timeout` seconds."""
        if not self._inbox:
            self._inbox.extend(self._events.get(timeout=timeout))
        return self._inbox.popleft()

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, message: str) -> None:
        """End this request with an error (handed over at the next flush); its rows leave."""
        if not self.cancelled:
            self.emit(Failed(message))
            self.cancelled = True


class _Row:
    """One sequence being generated (a request with n > 1 has n rows)."""

    def __init__(self, handle: RequestHandle, index: int, tokenizer, generator: torch.Generator):
        self.handle = handle
        self.index = index
        self.params = handle.params
        self.prompt_len = len(handle.prompt_ids)
        self.history = list(handle.prompt_ids)  # prompt + generated: what penalties look at
        self.generated: list[int] = []
        # Pieces are needed to stream and to spot stop strings; otherwise one decode at the end.
        self.text = IncrementalText(tokenizer, handle.params.stop) if handle.stream or handle.params.stop else None
        self.tokenizer = tokenizer
        self.generator = generator
        self.done = False

    def accept(self, token: int, eos_ids: frozenset[int], context_length: int) -> None:
        if token in eos_ids and not self.params.ignore_eos:
            self._finish("stop")
            return
        self.generated.append(token)
        self.history.append(token)
        if self.text is not None:
            piece = self.text.add(token)
            if piece:
                self.handle.emit(Delta(self.index, piece))
        if self.text is not None and self.text.stopped:
            self._finish("stop")
        elif len(self.generated) >= self.params.max_tokens or self.prompt_len + len(self.generated) >= context_length:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        tail = self.text.finish() if self.text is not None else self.tokenizer.decode(self.generated, skip_special_tokens=True)
        if tail:
            self.handle.emit(Delta(self.index, tail))
        self.handle.emit(Finished(self.index, reason, list(self.generated)))
        self.done = True


class _Batch:
    """Rows generating together; `cache` holds prompt + generated[:-1] of every row.

    Rows leave and join through transformers' public cache API only: a DynamicCache yields
    each layer's keys and values ([rows, heads, columns, head_dim]) when iterated, and is
    built from such pairs; the forward pass appends to the cache it is given.
    """

    def __init__(self, rows: list[_Row], mask: torch.Tensor, cache: DynamicCache):
        self.rows = rows
        self.mask = mask  # [B, L], 1 = real token, left padding = 0
        self.cache = cache

    def keep(self, indices: list[int]) -> None:
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if not self.rows:
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        # Columns that are padding in every remaining row are dropped.
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        self.cache = DynamicCache([(keys[index, :, start:], values[index, :, start:]) for keys, values, *_ in self.cache])

    def extend(self, other: "_Batch") -> None:
        length = max(self.mask.shape[1], other.mask.shape[1])

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        self.mask = torch.cat([pad(self.mask, 1), pad(other.mask, 1)])
        self.cache = DynamicCache(
            [
                (torch.cat([pad(my_keys, 2), pad(their_keys, 2)]), torch.cat([pad(my_values, 2), pad(their_values, 2)]))
                for (my_keys, my_values, *_), (their_keys, their_values, *_) in zip(self.cache, other.cache)
            ]
        )
        self.rows += other.rows


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        batch_window: float = 0.005,
        metrics: Optional[ServeMetrics] = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_window = batch_window
        self.metrics = metrics or ServeMetrics()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.context_length = context_length(model.config)
        self.pad_id = next(
            (v for v in (tokenizer.pad_token_id, tokenizer.eos_token_id, min(self.eos_ids, default=None)) if v is not None), 0
        )
        self.batched = self._supports_batching()
        self.ready = threading.Event()
        self._pending: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._batch: Optional[_Batch] = None
        self._alone: Optional[RequestHandle] = None  # a request generating through model.generate
        self._stepped: list[_Row] = []  # rows that got a token (or failed) in this step: their events are flushed after it
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # -- public -----------------------------------------------------------------------

    def start(self, warmup_prompt: Optional[list[int]] = None) -> None:
        """Start the worker and answer one warm-up generation; `ready` is set after it.

        Requests submitted before start() wait in the queue and are answered first.
        """
        self._thread = threading.Thread(target=self._work, name="kubetune-serve-model", daemon=True)
        self._thread.start()
        prompt = warmup_prompt or self.tokenizer.encode("Hello", add_special_tokens=True) or [self.pad_id]
        warmup = RequestHandle(list(prompt), SamplingParams(max_tokens=1), 1, None, stream=False)
        self._enqueue(warmup, bounded=False)
        while not isinstance(event := warmup.next_event_blocking(timeout=600), (Finished, Failed)):
            pass
        if isinstance(event, Failed):
            raise RuntimeError(f"the warm-up generation failed: {event.message}")
        self.ready.set()
        self.metrics.ready.set(1)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, n: int = 1, loop: Optional[asyncio.AbstractEventLoop] = None, stream: bool = True
    ) -> RequestHandle:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.context_length}")
        if n < 1 or n > self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the server's --max-batch)")
        handle = RequestHandle(list(prompt_ids), params, n, loop, stream)
        self._enqueue(handle, bounded=True)
        return handle

    def _enqueue(self, handle: RequestHandle, bounded: bool) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if bounded and len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting (--max-queue {self.max_queue}); retry later")
            self._pending.append(handle)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()

    def generate(self, prompt_ids: list[int], params: SamplingParams, n: int = 1, timeout: Optional[float] = 300) -> list[Output]:
        """Blocking convenience: submit and collect all n outputs."""
        handle = self.submit(prompt_ids, params, n, stream=False)
        texts = [""] * n
        outputs: list[Optional[Output]] = [None] * n
        while any(o is None for o in outputs):
            event = handle.next_event_blocking(timeout)
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            if isinstance(event, Delta):
                texts[event.index] += event.text
            else:
                outputs[event.index] = Output(texts[event.index], event.reason, event.token_ids)
        return outputs  # type: ignore[return-value]

    # -- worker -----------------------------------------------------------------------

    def _supports_batching(self) -> bool:
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
            return False
        with torch.inference_mode():
            cache = self.model(input_ids=torch.tensor([[self.pad_id]], device=self.device), use_cache=True).cache
        # Rows can be moved between caches only when every layer keeps one key/value column per
        # token (no sliding window, recurrent state or shared layer).
        return (
            type(cache) is DynamicCache
            and len(cache) > 0
            and not any(cache.is_sliding + cache.is_linear + cache.is_dummy)
            and all(keys is not None and keys.dim() == 4 and keys.shape[2] == 1 for keys, *_ in cache)
        )

    def _work(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._pending and self._batch is None and not self._stopping:
                        self._cond.wait()
                    if self._stopping:
                        break
                    if self._batch is None:
                        self._gather()
                self.step()
        self._fail(list(self._pending), "the server is shutting down")

    def step(self) -> None:
        """One worker iteration: admit the waiting requests that fit, then one decode step.

        The worker thread calls this in a loop; tests drive it directly to place requests
        exactly (e.g. join a running batch).

        What goes wrong in one row (its seed, its sampling arithmetic, its text) ends that
        row's request only; a prefill that fails is retried request by request, so only the
        request that breaks it fails. Only a failing forward pass of the running batch, which
        no single row can be blamed for, fails the requests in it.
        """
        with self._cond:
            admitted = self._take()
            self.metrics.queue_depth.set(len(self._pending))
        try:
            with torch.inference_mode():
                self._run(admitted)
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
            log.exception("generation failed")
            self._fail(admitted, _failure(err))
        # Events are handed over once the batch reflects this step, so a caller that sees a
        # request's token (or its end) also sees its rows in (or out of) `running`.
        for handle in {id(h): h for h in admitted + [row.handle for row in self._stepped]}.values():
            handle.flush()
        self._stepped = []
        self.metrics.running_sequences.set(self.running)

    @property
    def running(self) -> int:
        """Sequences being generated: the running batch, or the request generating alone."""
        alone = self._alone
        return alone.n if alone is not None else len(self._batch.rows) if self._batch else 0

    def _gather(self) -> None:
        """Idle model: wait a few milliseconds so requests arriving together start together."""
        deadline = time.monotonic() + self.batch_window
        while sum(h.n for h in self._pending) < self.max_batch and not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cond.wait(left)

    def _take(self) -> list[RequestHandle]:
        """Admit waiting requests in FIFO order while they fit in the batch."""
        taken: list[RequestHandle] = []
        running = len(self._batch.rows) if self._batch else 0
        while self._pending:
            head = self._pending[0]
            if head.cancelled:
                self._pending.popleft()
                continue
            alone = not self.batched or head.params.num_beams > 1
            if alone:
                if running == 0 and not taken:
                    taken.append(self._pending.popleft())
                break
            if running + head.n > self.max_batch:
                break
            taken.append(self._pending.popleft())
            running += head.n
        return taken

    def _run(self, admitted: list[RequestHandle]) -> None:
        if len(admitted) == 1 and (not self.batched or admitted[0].params.num_beams > 1):
            self._generate_alone(admitted[0])
            return
        if admitted:
            self._admit(admitted)
        if self._batch is not None:
            self._decode_step()

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill the admitted requests together and join them to the running batch; if that
        prefill fails, prefill them one by one, so a request that cannot be prefilled fails alone."""
        try:
            batches = [self._prefill(handles)]
        except Exception as err:  # noqa: BLE001 - isolated below
            if len(handles) == 1:
                log.exception("prefill failed")
                handles[0].fail(_failure(err))
                return
            batches = []
            for handle in handles:
                try:
                    batches.append(self._prefill([handle]))
                except Exception as err:  # noqa: BLE001 - this request alone fails
                    log.exception("prefill failed")
                    handle.fail(_failure(err))
        for new in batches:
            if new is None or not new.rows:
                continue
            if self._batch is None:
                self._batch = new
            else:
                self._batch.extend(new)

    def _forward(self, input_ids, mask, positions, cache: Optional[DynamicCache] = None):
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.cache

    def _prefill(self, handles: list[RequestHandle]) -> Optional[_Batch]:
        rows = []
        for handle in handles:
            if handle.cancelled:  # failed in an earlier try, or its client left
                continue
            try:
                generator = _generator(handle.params.seed)
            except (ValueError, OverflowError, RuntimeError) as err:  # a seed torch cannot take
                handle.fail(_failure(err))
                continue
            rows += [_Row(handle, i, self.tokenizer, generator) for i in range(handle.n)]
        if not rows:
            return None
        width = max(row.prompt_len for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - row.prompt_len :] = torch.tensor(row.handle.prompt_ids)
            mask[i, width - row.prompt_len :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions)
        self.metrics.batch_size.observe(len(rows))
        batch = _Batch(rows, mask, cache)
        self._advance(batch, logits)
        return batch

    def _decode_step(self) -> None:
        batch = self._batch
        batch.keep([i for i, row in enumerate(batch.rows) if not row.handle.cancelled])
        if not batch.rows:
            self._batch = None
            return
        rows = batch.rows
        ids = torch.tensor([[row.generated[-1]] for row in rows], device=self.device)
        positions = torch.tensor([[row.prompt_len + len(row.generated) - 1] for row in rows], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        logits, _ = self._forward(ids, batch.mask, positions, batch.cache)
        self.metrics.batch_size.observe(len(rows))
        self._advance(batch, logits)
        if not batch.rows:
            self._batch = None

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> None:
        rows = batch.rows
        tokens = choose_next_tokens(logits, [r.history for r in rows], [r.params for r in rows], [r.generator for r in rows])
        now = time.monotonic()
        for row, token in zip(rows, tokens):
            if row.handle.cancelled:  # an earlier row of the same request failed in this step
                continue
            try:
                if isinstance(token, Exception):
                    raise token
                self._note_first_token(row.handle, now)
                row.accept(token, self.eos_ids, self.context_length)
            except Exception as err:  # noqa: BLE001 - one row's failure ends its own request only
                log.warning("request failed in the batch: %s", _failure(err))
                row.handle.fail(_failure(err))
        self._stepped += rows
        self.metrics.record_tokens(sum(1 for row in rows if not row.handle.cancelled))
        batch.keep([i for i, row in enumerate(rows) if not row.done and not row.handle.cancelled])

    def _note_first_token(self, handle: RequestHandle, now: float) -> None:
        if not handle._first_token_seen:
            handle._first_token_seen = True
            self.metrics.time_to_first_token.observe(now - handle.submitted)

    def _generate_alone(self, handle: RequestHandle) -> None:
        """Beam search and prompt-learning adapters: one request through `model.generate`."""
        p = handle.params
        kwargs = dict(
            max_new_tokens=min(p.max_tokens, self.context_length - len(handle.prompt_ids)),
            num_beams=p.num_beams,
            # Greedy search returns one sequence; its n copies are identical anyway.
            num_return_sequences=1 if p.greedy and p.num_beams == 1 else handle.n,
            repetition_penalty=p.repetition_penalty,
            no_repeat_ngram_size=p.no_repeat_ngram_size,
            eos_token_id=sorted(self.eos_ids) or None,
            min_new_tokens=p.max_tokens if p.ignore_eos else None,
            pad_token_id=self.pad_id,
        )
        if p.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
            torch.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        ids = torch.tensor([handle.prompt_ids], device=self.device)
        self._alone = handle
        try:
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), stopping_criteria=[_UntilCancelled(handle)], **kwargs)
        finally:
            self._alone = None
        if handle.cancelled:
            return
        self._note_first_token(handle, time.monotonic())
        sequences = out[:, ids.shape[1] :].tolist()
        for index in range(handle.n):
            sequence = sequences[index % len(sequences)]
            row = _Row(handle, index, self.tokenizer, torch.Generator())
            for token in sequence:
                row.accept(token, self.eos_ids, self.context_length)
                if row.done:
                    break
            if not row.done:
                row._finish("length")
            self.metrics.record_tokens(len(row.generated))
        handle.flush()

    def _fail(self, admitted: list[RequestHandle], message: str) -> None:
        handles = {id(h): h for h in admitted}
        if self._batch is not None:
            handles.update((id(r.handle), r.handle) for r in self._batch.rows)
            self._batch = None
        for handle in handles.values():
            handle.fail(message)
            handle.flush()


def _generator(seed: Optional[int]) -> torch.Generator:
    """A request's own random generator (raises for a seed torch cannot take)."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


def _failure(err: Exception) -> str:
    return f"generation failed: {type(err).__name__}: {err}"


class _UntilCancelled(StoppingCriteria):
    """Stops `model.generate` for a request whose client has gone."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.handle.cancelled, dtype=torch.bool, device=input_ids.device)
