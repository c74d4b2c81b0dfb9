"""Writing exports: the trained model at the end of a run, and a LoRA adapter merged into its
base for serving. The format they are written in (manifest, `publish_dir`, `check_export`) is
export_format.py's.

`save_trained` (collective, end of training) writes OUTPUT/adapter for lora/qlora/ptuning/
prompt and OUTPUT/model for full/freeze. Under ZeRO-3 each rank holds only a slice of every
parameter, and a plain `state_dict()` returns empty tensors; so the parameters are gathered
first (adapter weights with `deepspeed.zero.GatheredParameters`, full models layer by layer
with the engine's consolidated state dict) and rank 0 writes them.

Every export carries the base model's non-weight files (tokenizer, chat template, config,
generation config, license...), and the tokenizer the run trained with on top of them, so
the folder loads with plain `from_pretrained`.

`merge_adapter` folds a LoRA adapter into its base (safetensors); `run_merge` is the
`kubetune-train --merge` step: base + OUTPUT/adapter (checked against its manifest) ->
OUTPUT/model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..api.layout import ADAPTER_METHODS, JobLayout, job_layout
from ..api.spec import FineTuneJob
from ..artifacts.export_format import check_export, publish_dir
from ..artifacts.model_source import COMPLETE_MARKER, default_cache_dir, materialize_model
from ..artifacts.storage import fetch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")
ADAPTER_FILES = ("adapter_config.json", "README.md")


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES) or name == COMPLETE_MARKER


def copy_non_weight_files(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy src's files that are not weights into dst, never overwriting. Returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or is_weight_file(path.name) or path.name in skip or rel.parts[0].startswith("."):
            continue
        target = dst / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(rel.as_posix())
    return copied


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def full_state_dict(engine, model) -> Optional[dict]:
    """Collective: the model's complete state dict on rank 0 (None elsewhere), ZeRO-3 or not."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    if _rank() != 0:
        return None
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _write_adapter(model, out: Optional[Path]) -> None:
    """Collective: rank 0 saves the adapter while its trainable parameters are gathered."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if _rank() == 0:
            model.save_pretrained(out, safe_serialization=True)


def _write_full(engine, model, out: Optional[Path]) -> None:
    """Collective: rank 0 saves every weight (gathered under ZeRO-3) as safetensors."""
    state = full_state_dict(engine, model)
    if _rank() == 0:
        model.save_pretrained(out, state_dict=state, safe_serialization=True)


def save_trained(engine, model, tokenizer, job: FineTuneJob, layout: JobLayout, base_model_dir: str | Path) -> dict[str, Optional[str]]:
    """Collective: export the trained weights (see module doc). Returns {"adapter": uri|None,
    "model": uri|None}; for LoRA "model" stays None until `run_merge` wrote it."""
    method = job.spec.method.type
    adapter = method in ADAPTER_METHODS
    target = layout.adapter if adapter else layout.model
    assert target is not None, "job_layout gives an adapter location for adapter methods and a model location otherwise"
    # Only rank 0 writes files; the other ranks take part in gathering the parameters.
    staging = Path(tempfile.mkdtemp(prefix="export-", dir=_staging_root())) if _rank() == 0 else None
    out = staging / "out" if staging is not None else None
    try:
        if adapter:
            _write_adapter(model, out)
        else:
            _write_full(engine, model, out)
        if out is not None:
            copy_non_weight_files(base_model_dir, out, skip=ADAPTER_FILES if adapter else ())
            tokenizer.save_pretrained(out)
            _check_not_empty(out)
            publish_dir(out, target, job.spec.storage.endpoint)
        _barrier()
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return {"adapter": str(target) if adapter else None, "model": None if adapter else str(target)}


def _staging_root() -> Path:
    root = default_cache_dir() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _check_not_empty(out: Path) -> None:
    """Refuse to publish weights with empty tensors (what an ungathered ZeRO-3 save writes)."""
    from safetensors import safe_open

    for path in out.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                shape = fh.get_slice(key).get_shape()
                if 0 in shape:
                    raise RuntimeError(f"export wrote an empty tensor {key} {shape} to {path.name}; parameters were not gathered")


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base and save a plain model folder (safetensors).

    The merge runs in fp32; the result is saved in the base's dtype. Tokenizer and chat
    template come from the adapter folder (what training used), other files from the base.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json; is it a LoRA adapter folder?")
    dtype = getattr(AutoConfig.from_pretrained(base_dir), "dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if isinstance(dtype, torch.dtype) and dtype in (torch.float16, torch.bfloat16):
        merged = merged.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    copy_non_weight_files(adapter_dir, out_dir, skip=ADAPTER_FILES)
    copy_non_weight_files(base_dir, out_dir)
    return out_dir


def run_merge(job: FineTuneJob, base_dir: Optional[str | Path] = None, cache_dir: Optional[str | Path] = None) -> dict[str, Optional[str]]:
    """The `--merge` step: base + OUTPUT/adapter -> OUTPUT/model. Returns the outputs."""
    layout = job_layout(job, base_dir)
    if not layout.needs_merge:
        raise ValueError(
            f"nothing to merge: method.type {job.spec.method.type!r} with output.merge {job.spec.output.merge} "
            "(merging needs method.type lora or qlora and output.merge: true)"
        )
    endpoint = job.spec.storage.endpoint
    cache_dir = Path(cache_dir or default_cache_dir())
    base = materialize_model(job.spec.model, cache_dir, base_dir, endpoint)
    (cache_dir / "staging").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="merge-", dir=cache_dir / "staging") as tmp:
        adapter = fetch(layout.adapter, Path(tmp) / "adapter-download", endpoint=endpoint)
        check_export(adapter, str(layout.adapter))
        merged = merge_adapter(base, adapter, Path(tmp) / "model")
        publish_dir(merged, layout.model, endpoint)
    return {"adapter": str(layout.adapter), "model": str(layout.model)}
