"""Loading what `kubetune-serve --model` points at: a merged model, or an adapter on a base.

The location may be s3://, file://, a plain path or pvc://; a GGUF file or folder works as
for training (dequantized once, cached). A folder holding `adapter_config.json` is a PEFT
adapter: its base comes from `--base-model`, else from the adapter's
`base_model_name_or_path` (which must be a location this server can reach). LoRA adapters
are merged into the base in memory so generation runs at full speed; prompt-learning
adapters (p-tuning, prompt tuning) stay wrapped.

The served location is checked against its export manifest once (`_local`); an adapter's base
is a model source, checked by the model cache (model_source.py) as for training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..api.spec import ModelSpec
from ..api.uri import parse_uri
from ..artifacts.export_format import check_export
from ..artifacts.model_source import cache_key, materialize_model, model_folder
from ..artifacts.storage import fetch

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    path: Path  # the local folder of the served location
    base_path: Optional[Path]  # the base model's folder when the location is an adapter


def _local(location: str, cache_dir: Path, base_dir: Optional[Path], endpoint: Optional[str]) -> Path:
    uri = parse_uri(location, base_dir)
    path = fetch(uri, cache_dir / "serve" / cache_key(str(uri)), endpoint=endpoint)
    check_export(path, str(uri))  # an unfinished or altered export is refused, never served
    return path


def _dtype(name: str, device: str):
    import torch

    if name == "auto":
        return "auto" if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_model(
    location: str,
    *,
    base_model: Optional[str] = None,
    cache_dir: Path,
    base_dir: Optional[Path] = None,
    endpoint: Optional[str] = None,
    dtype: str = "auto",
    chat_template: Optional[str] = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = _local(location, cache_dir, base_dir, endpoint)
    adapter = path.is_dir() and (path / ADAPTER_CONFIG).is_file()
    base_path = None
    if adapter:
        declared = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        base_location = base_model or declared
        if not base_location:
            raise ValueError(f"{location} is an adapter without base_model_name_or_path; pass --base-model URI")
        try:
            base_path = materialize_model(ModelSpec(uri=base_location), cache_dir, base_dir=base_dir, endpoint=endpoint)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"the base model of adapter {location} is not reachable ({err}); pass --base-model URI") from None
        weights_path = base_path
    else:
        weights_path = model_folder(path, None, cache_dir, str(path))  # checked above: not hashed again

    log.info("loading %s on %s", weights_path, device)
    model = AutoModelForCausalLM.from_pretrained(weights_path, dtype=_dtype(dtype, device), trust_remote_code=trust_remote_code)
    if adapter:
        from peft import PeftModel

        log.info("applying adapter %s", path)
        model = PeftModel.from_pretrained(model, path)
        if not model.peft_config[model.active_adapter].is_prompt_learning:
            model = model.merge_and_unload()
    model = model.to(device).eval()

    tokenizer_path = path if adapter and (path / "tokenizer_config.json").is_file() else weights_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    return LoadedModel(model, tokenizer, path, base_path)
