"""spec.retention in a training run: before training, the base model answers the replay
prompts and the probes and, with paraphrases.count, rewrites the user's questions (or all of
this comes from the cache); its replay answers and the accepted rewrites (paraphrase.py)
become training samples; after training, the tuned model answers the probes again and the
two sets of answers are compared (measure.py).

The cache is one JSON object beside the checkpoints, `CHECKPOINTS/retention/base-answers-KEY.json`,
written by rank 0 in one atomic put, after `base-targets-KEY.safetensors`: the base model's
next-token distributions at every replayed answer token (its top-k, train/loss.py), which
replay.loss kl trains toward. The JSON is the commit: without its targets it is answered
again. KEY hashes everything that changes the answers: the model's files, the adapter
continued from, quantization and precision, the chat template, the prompts, probe questions
and questions to rewrite in order, and the generation settings. A restart (or a resumed
run) with the same spec reads it instead of generating again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..api.spec import REPLAY_TOP_K, FineTuneJob, RetentionSpec
from ..data.loader import Example
from ..data.tokenize import IGNORE, BaseTargets, LengthLimits, Sample, tokenize_examples, truncate_turns
from . import paraphrase
from .generate import Answer, answer_all, generation_model
from .measure import retention_report
from .sets import RetentionSets, plan_sets

log = logging.getLogger("kubetune.retention")

# Bump when the way answers are generated changes: old cache entries then stop matching.
GENERATION_VERSION = 3
CACHE_PREFIX = "retention"
SMALL_FILE = 16 * 1024 * 1024  # model files up to this size are hashed whole, larger ones by name and size


def folder_fingerprint(folder: Optional[Path]) -> Optional[str]:
    """Identity of a model folder: the content of its small files (config, tokenizer,
    templates) and the name and size of the large ones (weights), which stay the same when
    the folder is downloaded again into a fresh cache."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        if size <= SMALL_FILE:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


def prompt_ids(tokenizer, question) -> list[int]:
    """A conversation (or one question) as training and serving tokenize it, up to the answer."""
    from ..data.encoding import encode_chat

    messages = [{"role": "user", "content": question}] if isinstance(question, str) else question
    return encode_chat(tokenizer, messages, add_generation_prompt=True).ids


def replay_sample(prompt: list[int], answer: list[int], limits: LengthLimits, targets: Optional[BaseTargets] = None) -> Optional[Sample]:
    """The base model's own answer as a training sample (answer tokens trained, within the job's
    length limits); with its `targets` it is trained toward them (replay.loss kl). None when
    nothing of the answer fits, or when the prompt had to be cut and the targets, computed
    after the whole prompt, would describe another question."""
    (kept, answer), *_ = truncate_turns([(prompt, answer)], limits)
    if not answer or (targets is not None and len(kept) < len(prompt)):
        return None
    return Sample(kept + answer, [IGNORE] * len(kept) + answer, distill=None if targets is None else targets.head(len(answer)))


def top_k_mass(answers: list[Answer]) -> Optional[float]:
    """The mean share of the base model's probability its kept top-k tokens hold, over all replayed answer tokens."""
    import torch

    rest = torch.cat([a.targets.logp[:, -1] for a in answers if a.targets is not None] or [torch.empty(0)])
    return round(1.0 - float(rest.exp().mean()), 4) if len(rest) else None


@contextlib.contextmanager
def base_behaviour(model):
    """Prompt-learning adapters (ptuning, prompt) start from random virtual tokens, so the
    base model answers with them switched off; LoRA starts as an exact no-op (and a
    continued quantized adapter is part of the starting model), so nothing changes there."""
    config = getattr(model, "peft_config", None)
    if config and getattr(next(iter(config.values())), "is_prompt_learning", False):
        with model.disable_adapter():
            yield
    else:
        yield


@dataclass
class BaseAnswers:
    replay: list[Answer]
    probes: list[str]
    cached: bool
    seconds: float = 0.0
    rewrites: list[list[str]] = field(default_factory=list)  # per question to rewrite: every variant the base model wrote


@dataclass
class Retention:
    spec: RetentionSpec
    sets: RetentionSets
    examples: list[Example] = field(default_factory=list)  # the user's training examples (paraphrases rewrite their questions)
    base: Optional[BaseAnswers] = None
    info: dict = field(default_factory=dict)

    @classmethod
    def plan(cls, job: FineTuneJob, examples: list[Example], cache_dir: Path, base_dir=None) -> Optional["Retention"]:
        """The job's prompt sets, read and checked before any model file is fetched; None without spec.retention."""
        spec = job.spec.retention
        if spec is None:
            return None
        sets = plan_sets(spec, len(examples), job.spec.training.seed, cache_dir, base_dir, job.spec.storage.endpoint)
        if len(sets.replay) < sets.wanted:
            log.warning(
                "retention.replay.ratio %s asks for %d replay samples but only %d prompts are available: replaying %d "
                "(more prompts with retention.replay.uri)", spec.replay.ratio, sets.wanted, len(sets.replay), len(sets.replay),
            )  # fmt: skip
        return cls(spec, sets, list(examples))

    @property
    def questions(self) -> list[str]:
        """The user's one-turn questions to rewrite, each once, in data order (none when paraphrases.count is 0)."""
        if not self.spec.paraphrases.count:
            return []
        turns = (paraphrase.one_turn(e) for e in self.examples)
        return list(dict.fromkeys(t[1] for t in turns if t is not None))

    def key(self, job: FineTuneJob, tokenizer, model_dir: Path, adapter_dir: Optional[Path], precision: str) -> str:
        spec = job.spec
        method = spec.method.settings()
        return cache_key({
            "version": GENERATION_VERSION,
            "model": folder_fingerprint(model_dir),
            "adapter": folder_fingerprint(adapter_dir),
            "quantization": getattr(method, "bits", None) if spec.method.type == "qlora" else None,
            "precision": precision,
            "chat_template": tokenizer.chat_template,
            "replay": self.sets.replay,
            "probes": [p.question for p in self.sets.probes],
            "replay_max_new_tokens": self.spec.replay.max_new_tokens,
            "replay_top_k": REPLAY_TOP_K,
            "probe_max_new_tokens": self.spec.probes.max_new_tokens,
            "batch_size": self.spec.batch_size,
            "rewrite": self.questions,
            "rewrite_variants": paraphrase.variants(self.spec.paraphrases.count),
            "rewrite_max_new_tokens": self.spec.paraphrases.max_new_tokens,
        })  # fmt: skip

    def prepare(self, store, key: str, tokenizer, build: Callable[[], object], ds_config: dict, rank: int, world: int, device) -> BaseAnswers:
        """The base model's answers: from the cache, else generated on every rank (rank 0 writes the cache)."""
        name, targets = f"{CACHE_PREFIX}/base-answers-{key}.json", f"{CACHE_PREFIX}/base-targets-{key}.safetensors"
        self.base = self._read(store, name, targets)
        if self.base is None:
            started = time.monotonic()
            with generation_model(build, ds_config, world) as (model, synced), base_behaviour(model):
                replay = self._answer(model, tokenizer, self.sets.replay, self.spec.replay.max_new_tokens, rank, world, synced, device, REPLAY_TOP_K)
                probes = self._answer(model, tokenizer, [p.question for p in self.sets.probes], self.spec.probes.max_new_tokens, rank, world, synced, device)
                rewrites = self._rewrite(model, tokenizer, rank, world, synced, device)
            self.base = BaseAnswers(replay, [a.text for a in probes], cached=False, seconds=round(time.monotonic() - started, 3), rewrites=rewrites)
            if rank == 0:
                store.put_bytes(targets, self._targets())
                store.put_bytes(name, self._document(key))
        self.info = {
            "replay_prompts": len(self.sets.replay),
            "replay_finished": sum(a.finished for a in self.base.replay),
            "replay_top_k_mass": top_k_mass(self.base.replay),
            "probes": len(self.sets.probes),
            "rewrite_questions": len(self.questions),
            "cached": self.base.cached,
            "seconds": self.base.seconds,
            "cache": f"{store.root}/{name}",
        }
        return self.base

    def _answer(self, model, tokenizer, questions: list, max_new_tokens: int, rank: int, world: int, synced: bool, device, top_k: int = 0) -> list[Answer]:
        prompts = [prompt_ids(tokenizer, q) for q in questions]
        return answer_all(model, tokenizer, prompts, max_new_tokens, self.spec.batch_size, rank, world, synced, device, top_k)

    def _rewrite(self, model, tokenizer, rank: int, world: int, synced: bool, device) -> list[list[str]]:
        """Every variant of every question to rewrite, as the base model wrote it (unfinished ones empty)."""
        questions, variants = self.questions, paraphrase.variants(self.spec.paraphrases.count)
        requests = [paraphrase.request(q, v) for q in questions for v in range(variants)]
        answers = self._answer(model, tokenizer, requests, self.spec.paraphrases.max_new_tokens, rank, world, synced, device)
        texts = [a.text if a.finished else "" for a in answers]
        return [texts[i * variants : (i + 1) * variants] for i in range(len(questions))]

    def _document(self, key: str) -> bytes:
        base = self.base
        return json.dumps(
            {
                "key": key,
                "replay": [{"prompt": p, "answer": a.text, "ids": a.ids, "finished": a.finished} for p, a in zip(self.sets.replay, base.replay)],
                "probes": [{"question": p.question, "answer": a} for p, a in zip(self.sets.probes, base.probes)],
                "paraphrases": [
                    {"question": q, "written": w, "kept": paraphrase.select(q, w, self.spec.paraphrases.count)} for q, w in zip(self.questions, base.rewrites)
                ],
            },
            ensure_ascii=False,
            indent=1,
        ).encode()

    def _targets(self) -> bytes:
        """The replay answers' targets, laid end to end, as safetensors bytes."""
        import torch
        from safetensors.torch import save

        replay = self.base.replay
        lengths = torch.tensor([len(a.ids) for a in replay], dtype=torch.int64)
        if not replay:
            return save({"lengths": lengths})
        ids = torch.cat([a.targets.ids for a in replay]).to(torch.int32)
        logp = torch.cat([a.targets.logp for a in replay]).to(torch.float32)
        return save({"lengths": lengths, "ids": ids.contiguous(), "logp": logp.contiguous()})

    @staticmethod
    def _read_targets(data: bytes, answers: list[list[int]]) -> list[BaseTargets]:
        import torch
        from safetensors.torch import load

        tensors = load(data)
        lengths = tensors["lengths"].tolist()
        if lengths != [len(a) for a in answers]:
            raise ValueError("the targets do not match the answers' lengths")
        if not answers:
            return []
        ids, logp = tensors["ids"].to(torch.long), tensors["logp"]
        if ids.shape[0] != sum(lengths) or logp.shape != (ids.shape[0], ids.shape[1] + 1):
            raise ValueError(f"targets of shapes {tuple(ids.shape)} and {tuple(logp.shape)} for {sum(lengths)} answer tokens")
        return [BaseTargets(i, p) for i, p in zip(ids.split(lengths), logp.split(lengths))]

    def _read(self, store, name: str, targets_name: str) -> Optional[BaseAnswers]:
        from safetensors import SafetensorError

        try:
            document = json.loads(store.get_bytes(name))
            ids = [list(r["ids"]) for r in document["replay"]]
            targets = self._read_targets(store.get_bytes(targets_name), ids)
            replay = [Answer(a, r["answer"], bool(r["finished"]), t) for a, r, t in zip(ids, document["replay"], targets)]
            probes = [r["answer"] for r in document["probes"]]
            rewrites = [[str(w) for w in r["written"]] for r in document.get("paraphrases", [])]
            same = (
                [r["prompt"] for r in document["replay"]] == self.sets.replay
                and [r["question"] for r in document["probes"]] == [p.question for p in self.sets.probes]
                and [r["question"] for r in document.get("paraphrases", [])] == self.questions
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, SafetensorError) as err:
            log.warning("ignoring the unreadable retention cache %s/%s (answering again): %s", store.root, name, err)
            return None
        if not same:
            log.warning("ignoring the retention cache %s/%s: its prompts differ (answering again)", store.root, name)
            return None
        log.info("base-model answers for retention read from %s/%s", store.root, name)
        return BaseAnswers(replay, probes, cached=True, rewrites=rewrites)

    def replay_samples(self, tokenizer, limits: LengthLimits, loss: str = "tokens") -> list[Sample]:
        """The replayed answers as training samples; `loss` the job's replay.loss (kl or tokens)."""
        samples = [replay_sample(prompt_ids(tokenizer, p), a.ids, limits, a.targets if loss == "kl" else None) for p, a in zip(self.sets.replay, self.base.replay)]
        samples = [s for s in samples if s is not None]
        self.info["samples"] = len(samples)
        self.info["loss"] = loss
        return samples

    def reworded_samples(self, tokenizer, limits: LengthLimits) -> list[Sample]:
        """The user's one-turn examples asked in the base model's accepted rewrites, with the user's answers."""
        kept = {q: paraphrase.select(q, w, self.spec.paraphrases.count) for q, w in zip(self.questions, self.base.rewrites)}
        examples = []
        for example in self.examples:
            turn = paraphrase.one_turn(example)
            if turn is not None and kept.get(turn[1]):
                examples += paraphrase.augmented(example, kept[turn[1]])
        samples, _ = tokenize_examples(tokenizer, examples, limits, plain_text=False)
        self.info["reworded_questions"] = sum(bool(k) for k in kept.values())
        self.info["reworded_samples"] = len(samples)
        return samples

    def measure(self, model, tokenizer, rank: int, world: int, synced: bool, device) -> dict:
        """The tuned model answers the probes; the report compares them with the base's answers."""
        started = time.monotonic()
        tuned = self._answer(model, tokenizer, [p.question for p in self.sets.probes], self.spec.probes.max_new_tokens, rank, world, synced, device)
        report = retention_report(self.sets.probes, self.base.probes, [a.text for a in tuned], self.spec.probes.warn_below)
        report["replay"] = {**self.info, "ratio": self.spec.replay.ratio, "excluded_prompts": self.sets.excluded}
        report["probe_seconds"] = round(time.monotonic() - started, 3)
        return report
