"""The FineTuneJob resource as one typed model.

This module is the single source of the resource's shape: the trainer and `kubetune run`
read job files with it, the operator validates custom resources with it, and the CRD's
OpenAPI schema in `crds/` is generated from it. It imports nothing heavier than pydantic
and PyYAML so the operator image stays free of torch.

Field names are the user-facing contract (shared/API.md): add fields, never rename.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAME = "ftj"


class SpecModel(BaseModel):
    """Base for every part of the spec: camelCase names, unknown fields rejected, numbers finite."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        allow_inf_nan=False,
    )


class DatasetFormat(str, enum.Enum):
    prompt_response = "prompt_response"
    alpaca = "alpaca"
    conversation = "conversation"
    sharegpt = "sharegpt"
    openai = "openai"
    text = "text"


class MethodType(str, enum.Enum):
    freeze = "freeze"
    lora = "lora"
    qlora = "qlora"
    ptuning = "ptuning"
    prompt = "prompt"
    full = "full"


class Precision(str, enum.Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class Offload(str, enum.Enum):
    none = "none"
    optimizer = "optimizer"
    all = "all"


class ServingEngine(str, enum.Enum):
    builtin = "builtin"
    vllm = "vllm"


class Tracker(str, enum.Enum):
    tensorboard = "tensorboard"
    swanlab = "swanlab"
    wandb = "wandb"
    mlflow = "mlflow"


# The environment variables each tracker reads: the only keys of spec.training.reportSecret
# that reach the workers (so a Secret cannot set PYTHONPATH, LD_PRELOAD or the S3 keys).
TRACKER_ENV: dict[str, tuple[str, ...]] = {
    "tensorboard": (),
    "swanlab": ("SWANLAB_API_KEY", "SWANLAB_API_HOST", "SWANLAB_WEB_HOST", "SWANLAB_WORKSPACE", "SWANLAB_PROJ_NAME", "SWANLAB_MODE"),
    "wandb": ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE"),
    "mlflow": ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_NAME"),
}


class Phase(str, enum.Enum):
    Pending = "Pending"
    Running = "Running"
    Restarting = "Restarting"
    Merging = "Merging"
    Serving = "Serving"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"


# ---------------------------------------------------------------------------------------
# spec.model / spec.dataset


class ModelSpec(SpecModel):
    uri: str = Field(
        description="Base model location: s3://BUCKET/PREFIX, file://PATH or a plain path, "
        "pvc://CLAIM/PATH, or hf://ORG/NAME (only where a hub is reachable).",
        min_length=1,
    )
    gguf_file: Optional[str] = Field(
        None,
        description="Name of a GGUF file inside the model location to load (dequantized) "
        "instead of safetensors weights.",
    )
    chat_template: Optional[str] = Field(
        None,
        description="Jinja chat template overriding the tokenizer's own. Needed only when the "
        "tokenizer has none; a wrong template makes the tuned model never stop generating.",
    )
    trust_remote_code: StrictBool = Field(
        False, description="Allow custom model code shipped with the model (ChatGLM-style)."
    )


class ColumnMapping(SpecModel):
    prompt: Optional[str] = Field(None, description="Column holding the user prompt/instruction.")
    query: Optional[str] = Field(None, description="Column holding extra input appended to the prompt (Alpaca `input`).")
    response: Optional[str] = Field(None, description="Column holding the answer.")
    history: Optional[str] = Field(None, description="Column holding earlier turns as [[question, answer], ...].")
    system: Optional[str] = Field(None, description="Column holding the system prompt.")
    messages: Optional[str] = Field(None, description="Column holding the message list (conversation formats).")
    text: Optional[str] = Field(None, description="Column holding plain text (format text).")


class ValidationSplit(SpecModel):
    ratio: Optional[StrictFloat] = Field(None, ge=0.0, lt=1.0, description="Fraction of the training data held out for validation.")
    uri: Optional[str] = Field(None, description="Separate validation file, same format as the training data.")
    max_samples: Optional[StrictInt] = Field(None, ge=1, description="Cap on validation samples.")

    @model_validator(mode="after")
    def _one_source(self) -> "ValidationSplit":
        if self.ratio is not None and self.uri is not None:
            raise ValueError("set either ratio or uri, not both")
        return self


class DatasetSpec(SpecModel):
    uri: str = Field(description="Training data: JSON array or JSON Lines file (s3://, file:// or a path).", min_length=1)
    format: DatasetFormat = Field(
        DatasetFormat.prompt_response,
        description="Record layout: prompt_response | alpaca | conversation | sharegpt | openai | text.",
    )
    columns: ColumnMapping = Field(default_factory=ColumnMapping, description="Column names when they differ from the format's defaults.")
    validation: Optional[ValidationSplit] = Field(None, description="Validation split: {ratio: 0.1} or {uri: ...}.")
    max_samples: Optional[StrictInt] = Field(None, ge=1, description="Use only the first N training records.")
    shuffle: StrictBool = Field(True, description="Shuffle training samples every epoch (seeded).")


# ---------------------------------------------------------------------------------------
# spec.method


class LoraSpec(SpecModel):
    r: StrictInt = Field(8, ge=1, le=1024, description="Adapter rank (lora_dim).")
    alpha: StrictFloat = Field(16, gt=0, description="Scaling numerator; the update is scaled by alpha/r.")
    dropout: StrictFloat = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names to adapt (e.g. q_proj, v_proj, query_key_value) or [all-linear].",
    )


class QLoraSpec(LoraSpec):
    bits: Literal[4, 8] = Field(4, description="Quantization bits of the frozen base (bitsandbytes, CUDA only).")


class FreezeSpec(SpecModel):
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Parameter-name substrings to train, e.g. ['layers.27.', 'layers.26.']; all else is frozen.",
    )
    last_layers: Optional[StrictInt] = Field(None, ge=1, description="Shorthand: train the last N transformer blocks.")

    @model_validator(mode="after")
    def _something_trainable(self) -> "FreezeSpec":
        if not self.trainable_modules and self.last_layers is None:
            raise ValueError("set trainableModules or lastLayers")
        return self


class PTuningSpec(SpecModel):
    pre_seq_len: StrictInt = Field(16, ge=1, le=4096, description="Number of trainable prefix positions at every layer.")
    prefix_projection: StrictBool = Field(False, description="Reparameterize the prefix through a 2-layer MLP.")
    projection_hidden_size: Optional[StrictInt] = Field(None, ge=1, description="Hidden size of that MLP (default: model hidden size).")


class PromptSpec(SpecModel):
    virtual_tokens: StrictInt = Field(20, ge=1, le=4096, description="Number of trainable virtual tokens at the input.")
    init_text: Optional[str] = Field(None, description="Initialise the virtual tokens from this text's embeddings.")


class MethodSpec(SpecModel):
    type: MethodType = Field(MethodType.lora, description="freeze | lora | qlora | ptuning | prompt | full.")
    lora: Optional[LoraSpec] = Field(None, description="LoRA settings (type lora).")
    qlora: Optional[QLoraSpec] = Field(None, description="QLoRA settings (type qlora).")
    freeze: Optional[FreezeSpec] = Field(None, description="Which modules train (type freeze).")
    ptuning: Optional[PTuningSpec] = Field(None, description="P-tuning v2 settings (type ptuning).")
    prompt: Optional[PromptSpec] = Field(None, description="Prompt tuning settings (type prompt).")
    adapter_uri: Optional[str] = Field(
        None,
        description="Continue from an existing LoRA adapter: it is merged into the base first, then a new LoRA is trained.",
    )

    @model_validator(mode="after")
    def _settings_match_type(self) -> "MethodSpec":
        blocks = ("lora", "qlora", "freeze", "ptuning", "prompt")
        for block in blocks:
            if getattr(self, block) is not None and block != self.type:
                raise ValueError(
                    f"method.{block} is set but method.type is {self.type!r}; "
                    f"remove method.{block} or set method.type: {block}"
                )
        if self.type == "freeze" and self.freeze is None:
            raise ValueError("method.type freeze needs method.freeze.trainableModules or method.freeze.lastLayers")
        if self.adapter_uri is not None and self.type not in ("lora", "qlora"):
            raise ValueError(f"method.adapterUri continues a LoRA adapter; it needs method.type lora or qlora, not {self.type!r}")
        return self

    def settings(self) -> Optional[SpecModel]:
        """The settings block of the chosen method, with defaults when the user gave none."""
        defaults = {"lora": LoraSpec, "qlora": QLoraSpec, "ptuning": PTuningSpec, "prompt": PromptSpec}
        block = getattr(self, self.type, None) if self.type != "full" else None
        if block is None and self.type in defaults:
            block = defaults[self.type]()
        return block


# ---------------------------------------------------------------------------------------
# spec.training / spec.distributed


class EvalSpec(SpecModel):
    every_steps: Optional[StrictInt] = Field(None, ge=1, description="Compute validation loss every N steps (default: at the end of each epoch).")
    generate: StrictBool = Field(False, description="Also generate answers for validation samples and score them.")
    max_samples: StrictInt = Field(32, ge=1, description="Validation samples used for generation metrics.")
    max_new_tokens: StrictInt = Field(64, ge=1, description="Generation length for generation metrics.")


class TrainingSpec(SpecModel):
    epochs: Optional[StrictFloat] = Field(None, gt=0, description="Passes over the training data (default 1 when maxSteps is unset).")
    max_steps: Optional[StrictInt] = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    learning_rate: StrictFloat = Field(1.0e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: StrictFloat = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: StrictFloat = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps with linear warmup.")
    max_grad_norm: StrictFloat = Field(1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    micro_batch_size: StrictInt = Field(1, ge=1, description="Samples per device per forward pass (per_device_train_batch_size).")
    gradient_accumulation_steps: StrictInt = Field(1, ge=1, description="Micro batches per optimizer step.")
    max_length: StrictInt = Field(1024, ge=8, description="Longest tokenized sample (prompt + answer); longer ones are truncated.")
    max_source_length: Optional[StrictInt] = Field(None, ge=1, description="Longest prompt (max_src_len); the prompt is cut from the left.")
    max_target_length: Optional[StrictInt] = Field(None, ge=1, description="Longest answer; the answer is cut from the right.")
    packing: StrictBool = Field(False, description="Pack several samples into one sequence; attention never crosses samples.")
    seed: StrictInt = Field(1234, description="Seed for data order, initialisation and dropout.")
    precision: Precision = Field(Precision.auto, description="fp32 | fp16 | bf16 | auto (bf16 on GPUs that support it, else fp32).")
    gradient_checkpointing: StrictBool = Field(False, description="Recompute activations in the backward pass to save memory.")
    log_every_steps: StrictInt = Field(10, ge=1, description="Log and export metrics every N optimizer steps.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Validation settings.")
    report_to: list[Tracker] = Field(
        default_factory=list,
        description="Experiment trackers that get the training curves (loss, learning rate, grad norm, tokens/s, GPU memory) "
        "and evaluation metrics at every logged step, from rank 0: tensorboard (event files in OUTPUT/tensorboard), "
        "swanlab, wandb, mlflow. Default: none.",
    )
    report_secret: Optional[str] = Field(
        None,
        description="Secret holding the trackers' settings and credentials as environment variables: "
        + "; ".join(f"{t}: {', '.join(keys)}" for t, keys in TRACKER_ENV.items() if keys)
        + ". Only these keys of the trackers in reportTo are passed to the workers. Never put credentials in the spec.",
    )

    @field_validator("report_to")
    @classmethod
    def _trackers_once(cls, value: list) -> list:
        twice = sorted({t for t in value if value.count(t) > 1})
        if twice:
            raise ValueError(f"training.reportTo lists {', '.join(twice)} more than once")
        return value

    @model_validator(mode="after")
    def _lengths(self) -> "TrainingSpec":
        for name in ("max_source_length", "max_target_length"):
            value = getattr(self, name)
            if value is not None and value >= self.max_length:
                raise ValueError(f"training.{to_camel(name)} ({value}) must be smaller than training.maxLength ({self.max_length})")
        return self


class ZeroSpec(SpecModel):
    stage: StrictInt = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3 (0 is plain data parallel).")
    offload: Offload = Field(Offload.none, description="none | optimizer (stage >= 1) | all (optimizer and parameters, stage 3).")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "ZeroSpec":
        if self.offload == "optimizer" and self.stage < 1:
            raise ValueError("zero.offload optimizer needs zero.stage 1, 2 or 3")
        if self.offload == "all" and self.stage != 3:
            raise ValueError("zero.offload all (parameters too) needs zero.stage 3")
        return self


class DistributedSpec(SpecModel):
    nodes: StrictInt = Field(1, ge=1, le=1024, description="Machines (worker pods).")
    gpus_per_node: StrictInt = Field(1, ge=1, le=64, description="GPUs per node; processes per node on CPU-only runs.")
    zero: ZeroSpec = Field(default_factory=ZeroSpec, description="DeepSpeed ZeRO settings.")
    deepspeed_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged over the generated one (experts only).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


# ---------------------------------------------------------------------------------------
# spec.retention


REPLAY_TOP_K = 32  # replay.loss kl: the base model's most likely tokens kept per replayed answer token (train/loss.py)


class ReplaySpec(SpecModel):
    ratio: StrictFloat = Field(
        0.5,
        ge=0.0,
        le=10.0,
        description="Replayed answers mixed into training per training sample: 0.5 adds one base-model "
        "answer for every two of your samples (the same ones every epoch); 0 replays nothing (probes only). "
        "Capped by the number of prompts available.",
    )
    uri: Optional[str] = Field(
        None,
        description="Your own replay prompts: JSON Lines, one {\"prompt\": \"...\"} per line (s3://, file:// or a path). "
        "Default: KubeTune's set of general questions and instructions in English and Chinese. Prompts that are "
        "also probe questions are never replayed.",
    )
    max_new_tokens: StrictInt = Field(
        96, ge=1, le=4096, description="Longest replayed answer in tokens; an answer cut there is trained without an end of turn."
    )
    loss: Optional[Literal["kl", "tokens"]] = Field(
        None,
        description="How replayed answers are trained. kl (the default): at every token of a replayed answer the "
        "tuned model's next-token distribution is pulled toward the base model's (KL divergence over the base's "
        f"{REPLAY_TOP_K} most likely tokens and one bucket for the rest, recorded while the base model wrote the answer and cached "
        "with it, so training runs no second model): the model keeps what it would have said, without being "
        "sharpened onto one greedy answer, which itself moves other answers. tokens: cross-entropy on the base "
        "model's greedy answer, like your data.",
    )


class ProbeSpec(SpecModel):
    uri: Optional[str] = Field(
        None,
        description="Your own probe questions: JSON Lines, one {\"question\": \"...\", \"expect\": [\"...\"]} per line; "
        "an answer is right when it contains one of the expected phrases (case-insensitive). Default: KubeTune's "
        "held-out set of general questions in English and Chinese.",
    )
    max_new_tokens: StrictInt = Field(32, ge=1, le=4096, description="Longest probe answer in tokens (a right answer names its fact early; longer answers cost time twice).")
    warn_below: StrictFloat = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Warn (a Warning Event on the cluster) when fewer than this fraction of the probes the base "
        "model answered right are still answered right after training.",
    )


class ParaphraseSpec(SpecModel):
    count: StrictInt = Field(
        0,
        ge=0,
        le=4,
        description="Rewrites of each of your one-question samples, trained with your own answer so the tuned model "
        "answers a fact however it is asked. The base model writes them before training (shown a few general rewrites "
        "first, greedy, cached beside the checkpoints); a rewrite is kept only when it is one question that keeps every "
        "name and number of yours and adds none, so a question may get fewer. 0 rewrites nothing. Multi-turn "
        "conversations are not rewritten.",
    )
    max_new_tokens: StrictInt = Field(48, ge=8, le=512, description="Longest rewrite in tokens (a longer one is dropped).")


class RetentionSpec(SpecModel):
    replay: ReplaySpec = Field(default_factory=ReplaySpec, description="Self-distillation replay: the base model's own answers to general prompts, generated once before training (cached beside the checkpoints) and mixed into training.")
    probes: ProbeSpec = Field(default_factory=ProbeSpec, description="Held-out questions answered before and after training, never replayed: how much general knowledge the tuned model kept.")
    paraphrases: ParaphraseSpec = Field(default_factory=ParaphraseSpec, description="Your questions asked in other words by the base model, trained with your answers (off by default).")
    batch_size: StrictInt = Field(16, ge=1, le=1024, description="Prompts each process answers at once (greedy) for replay, probes and paraphrases.")


# ---------------------------------------------------------------------------------------
# Kubernetes placement, storage, outputs, serving, run policy


Quantity = int | str


class ResourceSpec(SpecModel):
    requests: dict[str, Quantity] = Field(default_factory=dict, description="Resource requests, e.g. {cpu: '8', memory: 64Gi}.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Resource limits, e.g. {nvidia.com/gpu: 4}.")

    # Resource names contain dots and slashes: keep keys as written.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ImageSpec(SpecModel):
    trainer: Optional[str] = Field(None, description="Trainer image (training and merge); default from the operator's settings.")
    serving: Optional[str] = Field(None, description="Serving image for engine builtin; default: the trainer image.")
    vllm: Optional[str] = Field(None, description="vLLM image for engine vllm.")
    pull_policy: Optional[Literal["Always", "IfNotPresent", "Never"]] = Field(None, description="imagePullPolicy for every container.")


class CheckpointSpec(SpecModel):
    uri: Optional[str] = Field(None, description="Where checkpoints go (default: OUTPUT/checkpoints, or ./runs/NAME/checkpoints locally).")
    every_steps: StrictInt = Field(100, ge=1, description="Save a checkpoint every N optimizer steps (and at the end, and on SIGTERM).")
    keep: StrictInt = Field(3, ge=1, description="Complete checkpoints to keep; older ones are deleted after a newer one is committed.")


class StorageSpec(SpecModel):
    endpoint: Optional[str] = Field(None, description="S3-compatible endpoint URL (MinIO, Ceph, SeaweedFS); default: AWS.")
    region: Optional[str] = Field(None, description="S3 region.")
    credentials_secret: Optional[str] = Field(
        None, description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (never put keys in the spec)."
    )
    delete_on_job_deletion: StrictBool = Field(False, description="Delete checkpoints when the job is deleted (outputs are always kept).")


class OutputSpec(SpecModel):
    uri: Optional[str] = Field(None, description="Where the adapter and merged model go (default: ./runs/NAME/output locally).")
    merge: StrictBool = Field(True, description="Merge a LoRA adapter into the base model for serving.")


# Sampling settings keep every scaled logit (logit x penalty / temperature: at most 10^4 x the
# logit) far inside float range; beyond them one request's distribution becomes inf/nan.
MIN_SAMPLING_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


def check_temperature(value: float) -> float:
    """0 (greedy) or a temperature from MIN_SAMPLING_TEMPERATURE up."""
    if 0 < value < MIN_SAMPLING_TEMPERATURE:
        raise ValueError(f"use 0 for greedy decoding or a temperature from {MIN_SAMPLING_TEMPERATURE} to 2")
    return value


class GenerationSpec(SpecModel):
    temperature: Annotated[StrictFloat, AfterValidator(check_temperature)] = Field(
        0.7, ge=0.0, le=2.0, description="Sampling temperature: 0 = greedy, else 0.01 to 2."
    )
    top_p: StrictFloat = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: StrictInt = Field(50, ge=0, description="Sample among the K likeliest tokens (0 = all).")
    max_tokens: StrictInt = Field(256, ge=1, description="Longest answer in tokens.")
    repetition_penalty: StrictFloat = Field(
        1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY, description="Penalty for repeated tokens (1 = off)."
    )
    no_repeat_ngram_size: StrictInt = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    num_beams: StrictInt = Field(1, ge=1, description="Beam search width (1 = off).")
    do_sample: Optional[StrictBool] = Field(None, description="Sample instead of greedy decoding (default: temperature > 0).")


class ServingSpec(SpecModel):
    enabled: StrictBool = Field(False, description="Deploy an inference server on the merged model after training.")
    engine: ServingEngine = Field(ServingEngine.builtin, description="builtin (kubetune-serve, also on CPU) | vllm (GPU clusters).")
    replicas: StrictInt = Field(1, ge=0, description="Serving pods.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Resources of each serving pod.")
    generation: GenerationSpec = Field(default_factory=GenerationSpec, description="Default generation settings.")
    history: StrictBool = Field(True, description="Use earlier turns the client sends; false answers each question alone (Q&A).")
    auth_secret: Optional[str] = Field(None, description="Secret with key `token`: clients must send `Authorization: Bearer TOKEN`.")
    port: StrictInt = Field(8000, ge=1, le=65535, description="Container port of the server.")


class RunPolicy(SpecModel):
    backoff_limit: StrictInt = Field(3, ge=0, description="Gang restarts allowed before the job fails.")
    active_deadline_seconds: Optional[StrictInt] = Field(None, ge=1, description="Fail the job after this many seconds of running.")
    ttl_seconds_after_finished: Optional[StrictInt] = Field(None, ge=0, description="Delete the finished job's workers after this many seconds.")
    suspend: StrictBool = Field(False, description="Stop workers and keep checkpoints; set back to false to continue.")


class FineTuneJobSpec(SpecModel):
    model: ModelSpec = Field(description="Base model.")
    dataset: DatasetSpec = Field(description="Training data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Fine-tuning method and its settings.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyperparameters.")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="Processes, nodes and DeepSpeed settings.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Resources of each worker pod (one per node).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the workers must run on.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Pod tolerations (Kubernetes syntax).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity (Kubernetes syntax).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: Optional[str] = Field(None, description="PriorityClass of the workers.")
    scheduler_name: Optional[str] = Field(None, description="Scheduler (e.g. volcano).")
    queue_name: Optional[str] = Field(None, description="Queue for Kueue (label kueue.x-k8s.io/queue-name) or Volcano.")
    image: ImageSpec = Field(default_factory=ImageSpec, description="Image overrides.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint location and cadence.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3-compatible storage settings.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where the trained model goes.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Inference server after training.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Restarts, deadlines, suspension.")
    retention: Optional[RetentionSpec] = Field(
        None,
        description="Keep what the base model knew (set it, even empty `retention: {}`, to turn it on): replay the "
        "base model's own answers to general prompts during training, and report how many held-out probe "
        "questions the base answered right are still answered right afterwards. Needs chat data (not format text).",
    )

    def replay_loss(self) -> Optional[str]:
        """How spec.retention.replay trains the base model's answers ("kl" or "tokens"; None without retention)."""
        if self.retention is None:
            return None
        return self.retention.replay.loss or "kl"

    def locations(self) -> list[tuple[str, str]]:
        """(field, URI) of every location the job reads or writes, unset ones left out."""
        retention = self.retention
        pairs = [
            ("spec.model.uri", self.model.uri),
            ("spec.dataset.uri", self.dataset.uri),
            ("spec.dataset.validation.uri", self.dataset.validation.uri if self.dataset.validation else None),
            ("spec.method.adapterUri", self.method.adapter_uri),
            ("spec.checkpoint.uri", self.checkpoint.uri),
            ("spec.output.uri", self.output.uri),
            ("spec.retention.replay.uri", retention.replay.uri if retention else None),
            ("spec.retention.probes.uri", retention.probes.uri if retention else None),
        ]
        return [(f, v) for f, v in pairs if v]

    @field_validator("retention")
    @classmethod
    def _retention_needs_chat(cls, retention: Optional[RetentionSpec], info) -> Optional[RetentionSpec]:
        dataset = info.data.get("dataset")
        if retention is not None and dataset is not None and dataset.format == "text":
            raise ValueError(
                "replays and probes chat answers, but dataset.format text trains plain text without a chat template; "
                "use a chat format (prompt_response, alpaca, conversation, sharegpt, openai) or remove spec.retention"
            )
        return retention

    @model_validator(mode="after")
    def _cross_field(self) -> "FineTuneJobSpec":
        if self.method.type == "qlora" and self.distributed.zero.stage == 3:
            raise ValueError("method.type qlora cannot be combined with distributed.zero.stage 3 (quantized weights cannot be partitioned); use stage 0-2")
        if self.serving.enabled and self.method.type in ("ptuning", "prompt") and self.serving.engine == "vllm":
            raise ValueError("serving.engine vllm cannot serve ptuning/prompt adapters; use engine builtin")
        return self


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    namespace: Optional[str] = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    api_version: Literal["kubetune.io/v1alpha1"] = Field("kubetune.io/v1alpha1", alias="apiVersion")
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: ObjectMeta
    spec: FineTuneJobSpec


# ---------------------------------------------------------------------------------------
# Loading job files with errors that point at the line


class SpecError(ValueError):
    """A job document is invalid. `problems` holds (field path, line or None, message); each
    problem is one line of the message."""

    def __init__(self, source: str, problems: list[tuple[str, Optional[int], str]]):
        self.source = source
        self.problems = problems
        lines = []
        for path, line, message in problems:
            where = f"{source}:{line}" if line else source
            message = " ".join(message.split("\n"))
            lines.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        self.lines = lines
        super().__init__("\n".join(lines))


# Limits of the API server, applied to job files so that `kubetune validate` refuses what
# `kubectl apply` would (and never runs out of time, memory or stack on a hostile file):
# etcd stores objects of at most 1.5 MiB, JSON numbers are int64 or finite float64, and
# strict field validation refuses duplicate fields. Nesting and the number of values (also
# once YAML aliases are expanded) are ours: a FineTuneJob has a handful of levels and a few
# hundred values, and composing 10,000 takes PyYAML about a second.
MAX_JOB_BYTES = 1536 * 1024
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT_TAG, _FLOAT_TAG, _MERGE_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"


class _OverLimit(yaml.YAMLError):
    """The document is nested too deep or has too many values (found while composing it)."""

    def __init__(self, message: str, path: tuple, mark):
        super().__init__(message)
        self.path, self.problem_mark = path, mark


class _JobLoader(yaml.SafeLoader):
    """PyYAML's safe loader that stops composing past MAX_YAML_DEPTH levels (its composer
    recurses once per level and would exhaust the stack first) or MAX_YAML_NODES values."""

    def __init__(self, text: str):
        super().__init__(text)
        self._path: list = []
        self._nodes = 0

    def compose_node(self, parent, index):
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _OverLimit(f"the document has more than {MAX_YAML_NODES} values", tuple(self._path), self.peek_event().start_mark)
        if parent is None:
            return super().compose_node(parent, index)
        if len(self._path) >= MAX_YAML_DEPTH:
            raise _OverLimit(f"nested deeper than {MAX_YAML_DEPTH} levels", tuple(self._path), self.peek_event().start_mark)
        self._path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            return super().compose_node(parent, index)
        finally:
            self._path.pop()


def _compose_yaml(text: str) -> tuple[Optional[yaml.Node], yaml.SafeLoader]:
    loader = _JobLoader(text)
    try:
        return loader.get_single_node(), loader
    finally:
        loader.dispose()


def _shown(path: tuple) -> str:
    """A field path as the messages spell it; a very deep one cut short."""
    return ".".join(str(p) for p in path[:6]) + (".…" if len(path) > 6 else "")


def _inspect(root: Optional[yaml.Node], loader: yaml.SafeLoader) -> tuple[dict[tuple, int], list[tuple[str, Optional[int], str]]]:
    """The line of every key path of a composed document, and what the API server would refuse
    in it: recursive aliases, more than MAX_YAML_NODES values or MAX_YAML_DEPTH levels once
    aliases are expanded, duplicate fields, integers beyond int64 and non-finite numbers.

    Walks the document as its aliases expand it, and stops at MAX_YAML_NODES values, so an
    alias bomb costs no more than a document of that size.
    """
    index: dict[tuple, int] = {}
    problems: list[tuple[str, Optional[int], str]] = []
    on_path: set[int] = set()
    checked: set[int] = set()  # nodes whose own problems are reported (once, however often aliased)
    visits = 0

    def refuse(path: tuple, line: int, message: str) -> None:
        problems.append((_shown(path), line, message))

    def walk(node: yaml.Node, path: tuple, line: int) -> None:
        nonlocal visits
        visits += 1
        if visits > MAX_YAML_NODES:
            refuse(path, line, f"the document has more than {MAX_YAML_NODES} values once its YAML aliases are expanded")
            raise _Stop
        index.setdefault(path, line)
        if id(node) in on_path:
            return refuse(path, line, "the value contains itself (a recursive YAML alias)")
        if len(path) > MAX_YAML_DEPTH:
            return refuse(path, line, f"nested deeper than {MAX_YAML_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            if id(node) not in checked:
                checked.add(id(node))
                message = _number_problem(node, loader)
                if message:
                    refuse(path, line, message)
            return
        own = id(node) not in checked
        checked.add(id(node))
        on_path.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[object, int] = {}
            for key, value in node.value:
                key_line = key.start_mark.line + 1
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                if own and name is not None and key.tag != _MERGE_TAG:
                    if name in first:
                        refuse(path + (name,), key_line, f"duplicate field (first on line {first[name]}); the API server refuses duplicate fields")
                    first.setdefault(name, key_line)
                child = path + (name,)
                index[child] = key_line
                walk(value, child, key_line)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,), item.start_mark.line + 1)
        on_path.discard(id(node))

    if root is not None:
        try:
            walk(root, (), root.start_mark.line + 1)
        except _Stop:
            pass
    return index, problems


class _Stop(Exception):
    """Ends the walk of a document over MAX_YAML_NODES values."""


def _number_problem(node: yaml.ScalarNode, loader: yaml.SafeLoader) -> Optional[str]:
    """Why a YAML number cannot be a JSON number of the API (int64, finite float64), or None."""
    if node.tag == _INT_TAG:
        # Checked by length first: int() of thousands of digits is slow or refused by Python.
        if len(node.value.replace("_", "")) > 70 or not INT64_MIN <= loader.construct_yaml_int(node) <= INT64_MAX:
            return f"integer out of range: must fit in 64 bits ({INT64_MIN} to {INT64_MAX})"
    elif node.tag == _FLOAT_TAG and not math.isfinite(loader.construct_yaml_float(node)):
        return f"not a finite number (got {node.value})"
    return None


def _yaml_problem(err: yaml.YAMLError, text: str) -> tuple[str, Optional[int], str]:
    """A YAML error as one problem with its line."""
    if isinstance(err, _OverLimit):
        return _shown(err.path), err.problem_mark.line + 1, str(err)
    if isinstance(err, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, ...): no mark, a position
        return "", text.count("\n", 0, err.position) + 1, f"invalid YAML: unacceptable character #x{err.character:04x}: {err.reason}"
    mark = getattr(err, "problem_mark", None)
    return "", mark.line + 1 if mark else None, f"invalid YAML: {getattr(err, 'problem', None) or err}"


def line_of(text: str, field: str | tuple) -> Optional[int]:
    """The line of `field` (dotted camelCase path or key tuple) in a YAML job text, or of its
    nearest parent the text has; None if the text has none of it or is not YAML.

    A dotted path whose keys contain dots themselves (`nvidia.com/gpu`) points at the parent.
    """
    lines = _text_line_index(text)
    if lines is None:
        return None
    path = tuple(field.split(".")) if isinstance(field, str) else tuple(field)
    return _nearest_line(path, lines)


@functools.lru_cache(maxsize=4)
def _text_line_index(text: str) -> Optional[dict[tuple, int]]:
    """The line index of a YAML text, composed once for every field asked about (read only)."""
    try:
        root, loader = _compose_yaml(text)
    except yaml.YAMLError:
        return None
    return _inspect(root, loader)[0]


def _field_path(loc: tuple, document: Any) -> tuple:
    """The keys of an error location that exist in the document.

    pydantic adds union-branch tags ('int', 'str') and validator names to `loc`; walking
    the document tells real keys from those tags.
    """
    path: list = []
    node = document
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, (dict, list)) and isinstance(part, str) and not _looks_like_tag(part):
            node = None  # a missing key: keep it (required/unknown field errors)
        else:
            continue
        path.append(part)
    return tuple(path)


def _looks_like_tag(part: str) -> bool:
    return part in ("int", "str", "float", "bool", "list", "dict", "none") or "[" in part or part.startswith("function-")


def problems_from_validation_error(
    err: ValidationError, lines: Optional[dict[tuple, int]] = None, document: Any = None
) -> list[tuple[str, Optional[int], str]]:
    lines = lines or {}
    # One problem per field: a union (e.g. int-or-string quantity) fails once per branch.
    merged: dict[str, dict[str, Any]] = {}
    for e in err.errors():
        path = _field_path(e["loc"], document) if document is not None else tuple(e["loc"])
        key = ".".join(str(p) for p in path)
        entry = merged.setdefault(key, {"line": _nearest_line(path, lines), "messages": [], "got": None})
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown field (check the spelling; see `kubectl explain ftj.spec`)"
        elif e["type"] == "missing":
            message = "required field is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            entry["got"] = e["input"]
        if message not in entry["messages"]:
            entry["messages"].append(message)
    problems = []
    for key, entry in merged.items():
        message = "; or ".join(entry["messages"])
        if entry["got"] is not None:
            message += f" (got {entry['got']!r})"
        problems.append((key, entry["line"], message))
    return problems


def _nearest_line(path: tuple, lines: dict[tuple, int]) -> Optional[int]:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return lines[path[:cut]]
    return None


def parse_job(document: dict[str, Any], source: str = "<job>", lines: Optional[dict[tuple, int]] = None) -> FineTuneJob:
    """Validate a job document (a dict from YAML or from the API server)."""
    if not isinstance(document, dict):
        raise SpecError(source, [("", 1, f"expected a FineTuneJob mapping, got {type(document).__name__}")])
    try:
        return FineTuneJob.model_validate(document)
    except ValidationError as err:
        raise SpecError(source, problems_from_validation_error(err, lines, document)) from None


def read_job_text(path: str | Path) -> str:
    """A job file's text, refused (SpecError) by its size before it is read, and when it is no
    readable UTF-8 file."""
    path = Path(path)
    too_big = f"a FineTuneJob is at most {MAX_JOB_BYTES / 1024**2:.1f} MiB (the most the API server stores for one object)"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JOB_BYTES:
                raise SpecError(str(path), [("", None, f"the file is {size / 1024**2:.1f} MiB; {too_big}")])
            data = f.read(MAX_JOB_BYTES + 1)  # a pipe or device has no size to check first
    except FileNotFoundError:
        raise SpecError(str(path), [("", None, "file not found")]) from None
    except IsADirectoryError:
        raise SpecError(str(path), [("", None, "is a directory, not a job file")]) from None
    except OSError as err:
        raise SpecError(str(path), [("", None, f"cannot be read: {err.strerror or err}")]) from None
    if len(data) > MAX_JOB_BYTES:
        raise SpecError(str(path), [("", None, f"more than {MAX_JOB_BYTES / 1024**2:.1f} MiB; {too_big}")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(str(path), [("", None, f"not UTF-8 text ({err.reason} at byte {err.start})")]) from None


def load_job(path: str | Path) -> FineTuneJob:
    """Read a job file (YAML or JSON). Errors name the file, the line and the field."""
    return load_job_text(read_job_text(path), str(path))


def load_job_text(text: str, source: str = "<job>") -> FineTuneJob:
    """A job from the YAML or JSON text of a file named `source`."""
    try:
        root, loader = _compose_yaml(text)
    except yaml.YAMLError as err:
        raise SpecError(source, [_yaml_problem(err, text)]) from None
    lines, problems = _inspect(root, loader)
    if problems:
        raise SpecError(source, problems)
    try:
        document = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as err:
        raise SpecError(source, [_yaml_problem(err, text)]) from None
    return parse_job(document, source, lines)


def dump_job(job: FineTuneJob) -> dict[str, Any]:
    """The job as a plain document with the user-facing (camelCase) names."""
    return job.model_dump(mode="json", by_alias=True, exclude_none=True)
