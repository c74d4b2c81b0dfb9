"""Memory planner: how much GPU and host memory a FineTuneJob needs, before it runs.

Pure arithmetic over the job spec and the model's config.json (no weights, no torch), so
`kubetune plan` and the operator can answer "will this fit?" instead of users finding out
by out-of-memory errors. The estimate is built from what actually occupies memory:

- model states: weights in the training precision (QLoRA: quantized), and for the
  trainable parameters only, gradients (same precision) and Adam states (fp32 master copy
  + two moments = 12 bytes in mixed precision, 8 in fp32), partitioned across the world
  size by ZeRO stage (1: optimizer, 2: + gradients, 3: + weights) or moved to host memory
  by offload;
- activations kept for the backward pass per transformer layer (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", counted per tensor for
  gated MLPs and grouped-query attention), with gradient checkpointing keeping only each
  layer's input plus one recomputed layer; attention scores (s^2 per head) only for models
  whose custom code uses eager attention (ChatGLM, softmax in fp32), since transformers'
  SDPA kernels do not keep them;
- logits and the fp32 cross-entropy over the vocabulary;
- DeepSpeed buffers (gradient reduce bucket; ZeRO-3 gathered parameters and prefetch);
- a constant runtime context (CUDA context, cuBLAS workspaces, NCCL buffers) and the
  caching allocator's fragmentation.

Checked against the reference figures users measured (MISSION.md, tests/cli/test_planner.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Optional

from .zero_sizes import HIDDEN_SIZE_KEYS, REDUCE_BUCKET_ELEMENTS, STAGE3_PREFETCH_ELEMENTS, zero_buffer_sizes

GiB = 1024**3

# CUDA context + cuBLAS/cuDNN workspaces + NCCL buffers, per GPU process.
RUNTIME_CONTEXT_BYTES = 1 * GiB
# The caching allocator reserves more than the live tensors (fragmentation).
FRAGMENTATION = 0.10
# Resident host memory of one training process before its model exists: Python, torch,
# transformers, DeepSpeed and the data. Measured: 373 MiB per rank on CPU (bench/zero_memory.py,
# `baseline_rss_bytes`), rounded up.
HOST_PROCESS_BYTES = 400 * 1024**2
# What a GPU process adds on the host: CUDA runtime, cuBLAS/cuDNN and NCCL host buffers. An
# allowance, not measured here (no GPU was at hand); nodes without GPUs do not pay it.
CUDA_HOST_BYTES = 600 * 1024**2
ADAM_BYTES_MIXED = 12  # fp32 master weights + exp_avg + exp_avg_sq
ADAM_BYTES_FP32 = 8  # exp_avg + exp_avg_sq; the fp32 weights are the master copy
OUTPUT_LAYERS = ("lm_head", "output_layer")


class PlanError(ValueError):
    """The model config lacks what the planner needs; the message names the key."""


# ---------------------------------------------------------------------------------------
# Model shape from config.json


@dataclass(frozen=True)
class ModelShape:
    family: str  # llama (Llama/Qwen/Mistral/SmolLM naming) | chatglm2 (ChatGLM2/3) | chatglm (ChatGLM-6B)
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool
    linear_bias: bool
    gated_mlp: bool
    eager_attention: bool  # attention scores are materialised (s^2 per head)
    softmax_fp32: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _first(config: dict[str, Any], *keys: str, default: Any = None, required: bool = True) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is not None or not required:
        return default
    also = f" (also looked for {', '.join(keys[1:])})" if len(keys) > 1 else ""
    raise PlanError(f"model config has no {keys[0]}{also}")


# The largest dimension a config.json may give (the planner loops over layers and multiplies
# sizes, so a hostile config must not make it run for ever or overflow).
MAX_DIMENSION = 2**31
MAX_LAYERS = 10_000


def _size(config: dict[str, Any], *keys: str, default: Optional[int] = None, most: int = MAX_DIMENSION) -> int:
    """A whole positive number from the config (`_first` of `keys`); PlanError naming the key otherwise."""
    value = _first(config, *keys, default=default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        key = next((k for k in keys if config.get(k) is not None), keys[0])
        raise PlanError(f"model config {key}: expected a whole number from 1 to {most}, got {value!r}")
    return value


def model_shape(config: dict[str, Any]) -> ModelShape:
    """Read the shapes the planner needs from a Hugging Face config.json (ChatGLM names too)."""
    if not isinstance(config, dict):
        raise PlanError("model config must be a JSON object (config.json)")
    hidden = _size(config, *HIDDEN_SIZE_KEYS)
    heads = _size(config, "num_attention_heads", "n_head")
    layers = _size(config, "num_hidden_layers", "num_layers", "n_layer", most=MAX_LAYERS)
    vocab = _size(config, "padded_vocab_size", "vocab_size")
    if "multi_query_group_num" in config or "ffn_hidden_size" in config:
        head_dim = _size(config, "kv_channels", default=max(hidden // heads, 1))
        kv_heads = _size(config, "multi_query_group_num", default=heads) if config.get("multi_query_attention", True) else heads
        return ModelShape(
            family="chatglm2", vocab=vocab, hidden=hidden, layers=layers,
            intermediate=_size(config, "ffn_hidden_size"), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("add_qkv_bias", False)), linear_bias=bool(config.get("add_bias_linear", False)),
            gated_mlp=True, eager_attention=True, softmax_fp32=bool(config.get("attention_softmax_in_fp32", True)),
        )  # fmt: skip
    if "inner_hidden_size" in config or config.get("model_type") == "chatglm":
        return ModelShape(
            family="chatglm", vocab=vocab, hidden=hidden, layers=layers,
            intermediate=_size(config, "inner_hidden_size", default=4 * hidden), heads=heads, kv_heads=heads,
            head_dim=max(hidden // heads, 1), tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=True, linear_bias=True, gated_mlp=False, eager_attention=True, softmax_fp32=True,
        )  # fmt: skip
    attn = config.get("_attn_implementation") or config.get("attn_implementation")
    return ModelShape(
        family="llama", vocab=vocab, hidden=hidden, layers=layers,
        intermediate=_size(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        heads=heads, kv_heads=_size(config, "num_key_value_heads", default=heads),
        head_dim=_size(config, "head_dim", default=max(hidden // heads, 1)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2",
        linear_bias=False, gated_mlp=config.get("hidden_act", "silu") in ("silu", "swish", "swiglu"),
        eager_attention=attn == "eager", softmax_fp32=False,
    )  # fmt: skip


@dataclass(frozen=True)
class Linear:
    module: str  # full module path, e.g. model.layers.3.self_attn.q_proj
    inputs: int
    outputs: int

    @property
    def short(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def inventory(shape: ModelShape) -> tuple[list[tuple[str, int]], list[Linear]]:
    """Every parameter (name as in the model's own code, element count) and every linear layer."""
    params: list[tuple[str, int]] = []
    linears: list[Linear] = []

    def linear(module: str, inputs: int, outputs: int, bias: bool) -> None:
        linears.append(Linear(module, inputs, outputs))
        params.append((f"{module}.weight", inputs * outputs))
        if bias:
            params.append((f"{module}.bias", outputs))

    h, s = shape.hidden, shape
    qkv_out = s.q_dim + 2 * s.kv_dim
    if s.family == "llama":
        embed, block, final, head = "model.embed_tokens", "model.layers", "model.norm", "lm_head"
        norms = ("input_layernorm", "post_attention_layernorm")
        layer_linears = [
            ("self_attn.q_proj", h, s.q_dim, s.qkv_bias), ("self_attn.k_proj", h, s.kv_dim, s.qkv_bias),
            ("self_attn.v_proj", h, s.kv_dim, s.qkv_bias), ("self_attn.o_proj", s.q_dim, h, False),
        ]  # fmt: skip
        if s.gated_mlp:
            layer_linears += [("mlp.gate_proj", h, s.intermediate, False), ("mlp.up_proj", h, s.intermediate, False)]
        else:
            layer_linears += [("mlp.up_proj", h, s.intermediate, False)]
        layer_linears += [("mlp.down_proj", s.intermediate, h, False)]
        norm_size = h
    elif s.family == "chatglm2":
        embed, block = "transformer.embedding.word_embeddings", "transformer.encoder.layers"
        final, head = "transformer.encoder.final_layernorm", "transformer.output_layer"
        norms = ("input_layernorm", "post_attention_layernorm")
        layer_linears = [
            ("self_attention.query_key_value", h, qkv_out, s.qkv_bias or s.linear_bias),
            ("self_attention.dense", s.q_dim, h, s.linear_bias),
            ("mlp.dense_h_to_4h", h, 2 * s.intermediate, s.linear_bias),
            ("mlp.dense_4h_to_h", s.intermediate, h, s.linear_bias),
        ]
        norm_size = h
    else:  # chatglm (v1): LayerNorm with bias, GELU MLP, biases everywhere
        embed, block, final, head = "transformer.word_embeddings", "transformer.layers", "transformer.final_layernorm", "lm_head"
        norms = ("input_layernorm", "post_attention_layernorm")
        layer_linears = [
            ("attention.query_key_value", h, qkv_out, True), ("attention.dense", h, h, True),
            ("mlp.dense_h_to_4h", h, s.intermediate, True), ("mlp.dense_4h_to_h", s.intermediate, h, True),
        ]  # fmt: skip
        norm_size = 2 * h
    params.append((f"{embed}.weight", s.vocab * h))
    for i in range(s.layers):
        for norm in norms:
            params.append((f"{block}.{i}.{norm}.weight", norm_size))
        for name, inputs, outputs, bias in layer_linears:
            linear(f"{block}.{i}.{name}", inputs, outputs, bias)
    params.append((f"{final}.weight", norm_size))
    if not s.tie_embeddings:
        linear(head, h, s.vocab, False)
    return params, linears


# ---------------------------------------------------------------------------------------
# Trainable parameters per method


@dataclass(frozen=True)
class Trainable:
    base_trainable: int  # parameters of the base model that train (full, freeze)
    added: int  # new parameters the method adds (LoRA, prefix, virtual tokens)
    lora_inputs: int  # summed input width of adapted linears (for LoRA dropout activations)
    notes: tuple[str, ...] = ()


def trainable_parameters(method, shape: ModelShape, params: list[tuple[str, int]], linears: list[Linear]) -> Trainable:
    kind = method.type
    settings = method.settings()
    if kind == "full":
        return Trainable(sum(n for _, n in params), 0, 0)
    if kind == "freeze":
        patterns = list(settings.trainable_modules)
        if settings.last_layers:
            patterns += [f"layers.{i}." for i in range(max(0, shape.layers - settings.last_layers), shape.layers)]
        count = sum(n for name, n in params if any(p in name for p in patterns))
        notes = () if count else (f"method.freeze patterns {patterns} match no parameter of this model",)
        return Trainable(count, 0, 0, notes)
    if kind in ("lora", "qlora"):
        targets = set(settings.target_modules)
        if "all-linear" in targets:
            chosen = [lin for lin in linears if lin.short not in OUTPUT_LAYERS]
        else:
            chosen = [lin for lin in linears if lin.short in targets or lin.module in targets]
        known = {lin.short for lin in linears}
        unknown = sorted(t for t in targets - known - {"all-linear"} if not any(lin.module == t for lin in linears))
        notes = (f"LoRA targets {unknown} are not linear layers of this model (it has {sorted(known)})",) if unknown else ()
        added = sum(settings.r * (lin.inputs + lin.outputs) for lin in chosen)
        return Trainable(0, added, sum(lin.inputs for lin in chosen), notes)
    if kind == "ptuning":
        kv = 2 * shape.layers * shape.kv_dim
        if settings.prefix_projection:
            hidden = settings.projection_hidden_size or shape.hidden
            added = settings.pre_seq_len * shape.hidden + shape.hidden * hidden + hidden + hidden * kv + kv
        else:
            added = settings.pre_seq_len * kv
        return Trainable(0, added, 0)
    if kind == "prompt":
        return Trainable(0, settings.virtual_tokens * shape.hidden, 0)
    raise PlanError(f"unknown method {kind!r}")


# ---------------------------------------------------------------------------------------
# The estimate


@dataclass
class Estimate:
    per_gpu_bytes: int
    host_bytes: int  # per node
    breakdown: dict[str, int]  # per GPU
    host_breakdown: dict[str, int]
    fits: Optional[bool]  # None when no GPU memory was given
    gpu_memory_bytes: Optional[int]
    world_size: int
    total_params: int
    trainable_params: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bytes_per_value(precision: str) -> int:
    return 4 if precision == "fp32" else 2  # auto: bf16 on GPUs


def activation_bytes(shape: ModelShape, micro_batch: int, seq: int, key_len: int, act: int, checkpointing: bool, lora_inputs_per_layer: float, lora_dropout: bool) -> int:
    """Activations kept for backward, plus the working set of backward through one layer."""
    h, i = shape.hidden, shape.intermediate
    # Per token, elements saved by one layer: norm input, QKV input, Q/K/V, output-projection input...
    attention = h + h + shape.q_dim + 2 * shape.kv_dim + shape.q_dim
    # ...norm input, MLP input, and the MLP's inner tensors (gate, act(gate), up, product | fc1 out, act out).
    mlp = h + h + (4 * i if shape.gated_mlp else 2 * i)
    # LoRA with dropout keeps the dropped-out input of every adapted layer (+ a 1-byte mask).
    lora = lora_inputs_per_layer * (act + 1) if lora_dropout else 0
    per_token = act * (attention + mlp) + lora
    if shape.eager_attention:  # softmax output (fp32 in ChatGLM) and its cast back for scores @ V
        per_token += shape.heads * key_len * ((4 + act) if shape.softmax_fp32 else act)
    layer = micro_batch * seq * per_token
    if checkpointing:
        kept = shape.layers * micro_batch * seq * h * act + layer
    else:
        kept = shape.layers * layer
    return int(kept + layer)  # + gradients w.r.t. one layer's activations during its backward


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of the model states after ZeRO partitioning and offload, and what offload
    moved to host memory (per process)."""

    weights: float
    grads: float
    optimizer: float
    offloaded_weights: float
    offloaded_optimizer: float
    base_bytes_per_param: float  # the frozen base's weights (QLoRA: quantized)
    trained: int  # parameters that train


def model_states(method, dist, total: int, trainable: Trainable, act: int) -> ModelStates:
    """Weights in the training precision (QLoRA: quantized); for the trainable parameters only,
    gradients and Adam states; partitioned by ZeRO stage or moved to host memory by offload."""
    world, stage, offload = dist.world_size, dist.zero.stage, dist.zero.offload
    base_bytes_per_param = method.settings().bits / 8 if method.type == "qlora" else act
    weights = total * base_bytes_per_param + trainable.added * act
    trained = trainable.base_trainable + trainable.added
    grads = trained * act
    optimizer = trained * (ADAM_BYTES_MIXED if act == 2 else ADAM_BYTES_FP32)
    offloaded_weights, offloaded_optimizer = 0.0, 0.0
    if stage >= 1:
        optimizer /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    if offload in ("optimizer", "all"):
        # DeepSpeed's CPU Adam keeps the states and fp32 gradient partitions in host memory.
        offloaded_optimizer = optimizer + trained * 4 / (world if stage >= 2 else 1)
        optimizer, grads = 0, 0
    if offload == "all":
        offloaded_weights, weights = weights, 0
    return ModelStates(weights, grads, optimizer, offloaded_weights, offloaded_optimizer, base_bytes_per_param, trained)


def buffer_bytes(dist, shape: ModelShape, total: int, trained: int, act: int) -> int:
    """DeepSpeed's working buffers, sized as the trainer configures them (zero_sizes.py; the
    job's raw deepspeedConfig wins): the gradient reduce bucket; ZeRO-3 gathers the module it
    computes (a whole layer, or the embedding) plus the prefetch bucket."""
    stage = dist.zero.stage
    zero_config = {**zero_buffer_sizes(stage, shape.hidden), **dist.deepspeed_config.get("zero_optimization", {})}
    buffers = min(int(zero_config.get("reduce_bucket_size", REDUCE_BUCKET_ELEMENTS)), trained) * act
    if stage >= 3:
        block = (shape.q_dim + 2 * shape.kv_dim) * shape.hidden + shape.q_dim * shape.hidden + (3 if shape.gated_mlp else 2) * shape.hidden * shape.intermediate
        prefetch = int(zero_config.get("stage3_prefetch_bucket_size", STAGE3_PREFETCH_ELEMENTS))
        buffers += (max(block, shape.vocab * shape.hidden) + min(prefetch, total)) * act
    return buffers


def activation_and_logit_bytes(method, training, shape: ModelShape, trainable: Trainable, act: int) -> tuple[int, int]:
    """Activations (prompt tuning lengthens the sequence, P-tuning the keys) and the logits in
    the compute dtype, their fp32 copy, log-softmax output and its gradient."""
    seq = training.max_length
    key_len = seq
    if method.type == "prompt":
        seq += method.settings().virtual_tokens
        key_len = seq
    if method.type == "ptuning":
        key_len += method.settings().pre_seq_len
    lora_dropout = method.type in ("lora", "qlora") and method.settings().dropout > 0
    activations = activation_bytes(
        shape, training.micro_batch_size, seq, key_len, act, training.gradient_checkpointing,
        trainable.lora_inputs / shape.layers, lora_dropout,
    )  # fmt: skip
    logits = training.micro_batch_size * seq * shape.vocab * (act + 12)
    return activations, logits


def host_breakdown(dist, total: int, states: ModelStates) -> dict[str, int]:
    """Host memory per node: every process loads the base weights before DeepSpeed takes them
    (ZeRO-3 loads partitioned, about one copy per node), freed before offload buffers fill;
    offloaded states; and the processes themselves."""
    procs = dist.gpus_per_node
    loading = (1 if dist.zero.stage >= 3 else procs) * total * states.base_bytes_per_param
    offloaded = procs * (states.offloaded_weights + states.offloaded_optimizer)
    return {
        "loading_or_offload": int(max(loading, offloaded)),
        "offloaded_weights": int(procs * states.offloaded_weights),
        "offloaded_optimizer": int(procs * states.offloaded_optimizer),
        "processes": procs * (HOST_PROCESS_BYTES + CUDA_HOST_BYTES),
    }


def estimate(spec, model_config: dict[str, Any], gpu_memory_bytes: Optional[int] = None) -> Estimate:
    """Per-GPU and per-node host memory for training `spec` (a FineTuneJob or its spec)."""
    spec = getattr(spec, "spec", spec)
    shape = model_shape(model_config)
    params, linears = inventory(shape)
    total = sum(n for _, n in params)
    method, training, dist = spec.method, spec.training, spec.distributed
    trainable = trainable_parameters(method, shape, params, linears)
    act = _bytes_per_value(training.precision)
    notes = list(trainable.notes)

    states = model_states(method, dist, total, trainable, act)
    buffers = buffer_bytes(dist, shape, total, states.trained, act)
    activations, logits = activation_and_logit_bytes(method, training, shape, trainable, act)
    tensors = states.weights + states.grads + states.optimizer + buffers + activations + logits
    breakdown = {
        "weights": int(states.weights),
        "gradients": int(states.grads),
        "optimizer": int(states.optimizer),
        "activations": int(activations),
        "logits": int(logits),
        "buffers": int(buffers),
        "overhead": int(tensors * FRAGMENTATION + RUNTIME_CONTEXT_BYTES),
    }
    per_gpu = sum(breakdown.values())
    host = host_breakdown(dist, total, states)
    fits = None if gpu_memory_bytes is None else per_gpu <= gpu_memory_bytes
    if fits is False:
        notes.append(_advice(spec, breakdown))
    return Estimate(
        per_gpu_bytes=int(per_gpu), host_bytes=int(host["loading_or_offload"] + host["processes"]), breakdown=breakdown,
        host_breakdown=host, fits=fits, gpu_memory_bytes=gpu_memory_bytes, world_size=dist.world_size, total_params=total,
        trainable_params=int(states.trained), notes=notes,
    )  # fmt: skip


def _advice(spec, breakdown: dict[str, int]) -> str:
    """One line naming the biggest consumer and the knob that shrinks it."""
    biggest = max(("weights", "gradients", "optimizer", "activations", "logits"), key=lambda k: breakdown[k])
    hints = {
        "weights": "use a higher ZeRO stage (3 partitions weights), offload: all, or qlora",
        "gradients": "use ZeRO stage 2 or 3, or train fewer parameters (lora, freeze)",
        "optimizer": "use ZeRO stage 1-3 over more GPUs, or offload: optimizer",
        "activations": "enable training.gradientCheckpointing, or lower microBatchSize / maxLength",
        "logits": "lower training.microBatchSize or maxLength",
    }
    if biggest == "activations" and spec.training.gradient_checkpointing:
        hints["activations"] = "lower training.microBatchSize or maxLength (raise gradientAccumulationSteps to keep the batch)"
    return f"does not fit: {biggest} is the largest part; {hints[biggest]}"


# ---------------------------------------------------------------------------------------
# Shipped model configs and memory quantities


def shipped_configs() -> list[str]:
    """Names of the configs shipped with kubetune (model_configs/*.json)."""
    folder = resources.files("kubetune.planner") / "model_configs"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def shipped_config(name: str) -> Optional[dict[str, Any]]:
    """The shipped config for a model name (`THUDM/chatglm2-6b`, `Qwen2-7B-Instruct`...), or None.

    Matches the name after any organisation prefix, exactly or by the longest shipped name
    it starts with (so `-Instruct`/`-chat` variants share their base's shapes). A config may
    list other names of the same model under `_kubetune_names` (`meta-llama-3-8b`).
    """
    wanted = name.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    folder = resources.files("kubetune.planner") / "model_configs"
    configs = {c: json.loads((folder / f"{c}.json").read_text()) for c in shipped_configs()}
    names = [(alias, c) for c, config in configs.items() for alias in [c, *config.get("_kubetune_names", [])]]
    candidates = [(alias, c) for alias, c in names if wanted == alias or wanted.startswith(alias + "-")]
    if not candidates:
        return None
    return configs[max(candidates, key=lambda pair: len(pair[0]))[1]]


_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4, "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_memory(value: str | int) -> int:
    """'80Gi', '48GB', '48G', '81920Mi' or a byte count -> bytes (Kubernetes quantities, plus GB)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a memory size; write e.g. 80Gi, 48GB or 24G")
    number, unit = match.groups()
    size = float(number) * _UNITS[(unit or "").lower()]
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large a memory size")
    return int(size)
