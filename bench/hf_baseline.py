"""The peers KubeTune's trainer is measured against, each in its own process (same thread
count as the KubeTune run), on the same chat records tokenized with the model's template,
loss on the answer only:

  padded      `transformers.Trainer` as in the fine-tuning tutorials: every sample padded to
              maxLength (the seeds' baseline; nobody would pick it today).
  flattening  `transformers.Trainer` with `DataCollatorWithFlattening`: each batch of samples
              concatenated into one padding-free row, position ids restarting per sample
              (what the Hugging Face docs recommend for padding-free SFT).
  trl_bfd     TRL `SFTTrainer`: best-fit-decreasing packing into rows of maxLength, padding-free
              batches (`packing=True, packing_strategy="bfd"`).

    python -m bench.hf_baseline --peer flattening --model DIR --data FILE.jsonl --training '{"epochs": 1, ...}' --out result.json

`--training` takes the job's `spec.training` block, so every side reads the same
hyperparameters (microBatchSize is samples per step for padded/flattening, packed rows per
step for trl_bfd, as for KubeTune with packing). The result holds the seconds inside
`trainer.train()`, non-padding tokens counted by the Trainer itself, answer tokens the loss
counts, optimizer steps and losses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import tokenize_chat

PEERS = ("padded", "flattening", "trl_bfd")


def tokenized(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """{input_ids, labels} of every record (labels -100 on the prompt), cut at max_length."""
    out = []
    for record in records:
        ids, labels = tokenize_chat(tokenizer, record)
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
    return out


def padded(items: list[dict], pad_id: int, max_length: int) -> list[dict]:
    rows = []
    for item in items:
        pad = max_length - len(item["input_ids"])
        rows.append({"input_ids": item["input_ids"] + [pad_id] * pad, "attention_mask": [1] * len(item["input_ids"]) + [0] * pad,
                     "labels": item["labels"] + [-100] * pad})  # fmt: skip
    return rows


def training_arguments(training: dict, out_dir: Path, config_class=None, **extra):
    from transformers import TrainingArguments

    return (config_class or TrainingArguments)(
        output_dir=str(out_dir),
        use_cpu=True,
        per_device_train_batch_size=training.get("microBatchSize", 1),
        gradient_accumulation_steps=training.get("gradientAccumulationSteps", 1),
        num_train_epochs=training.get("epochs", 1),
        max_steps=training.get("maxSteps", -1),
        learning_rate=training.get("learningRate", 1e-4),
        weight_decay=training.get("weightDecay", 0.0),
        warmup_steps=training.get("warmupRatio", 0.0),  # a float < 1 is a ratio
        lr_scheduler_type=training.get("lrScheduler", "cosine"),
        max_grad_norm=training.get("maxGradNorm", 1.0),
        seed=training.get("seed", 1234),
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **extra,
    )


def build_trainer(peer: str, model, tokenizer, items: list[dict], training: dict, out_dir: Path):
    if peer == "padded":
        from transformers import Trainer, default_data_collator

        args = training_arguments(training, out_dir)
        return Trainer(model=model, args=args, train_dataset=padded(items, tokenizer.pad_token_id, training["maxLength"]),
                       data_collator=default_data_collator, processing_class=tokenizer)  # fmt: skip
    if peer == "flattening":
        from transformers import DataCollatorWithFlattening, Trainer

        args = training_arguments(training, out_dir)
        return Trainer(model=model, args=args, train_dataset=items, data_collator=DataCollatorWithFlattening(), processing_class=tokenizer)
    if peer == "trl_bfd":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = training_arguments(training, out_dir, SFTConfig, max_length=training["maxLength"], packing=True, packing_strategy="bfd",
                                  padding_free=True, dataset_num_proc=None)  # fmt: skip
        dataset = Dataset.from_dict({"input_ids": [i["input_ids"] for i in items], "labels": [i["labels"] for i in items]})
        return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


def run(peer: str, model_dir: Path, data: Path, training: dict, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    torch.manual_seed(training.get("seed", 1234))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    items = tokenized(records, tokenizer, training["maxLength"])
    trainer = build_trainer(peer, model, tokenizer, items, training, out_dir)
    train_start = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - train_start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "peer": peer,
        "samples": len(items),
        "rows": len(trainer.train_dataset),  # packed rows for trl_bfd, else samples
        "steps": trainer.state.global_step,
        "non_padding_tokens": int(trainer.state.num_input_tokens_seen),
        "answer_tokens": sum(sum(1 for label in i["labels"][1:] if label != -100) for i in items),
        "padded_tokens_per_epoch": len(items) * training["maxLength"] if peer == "padded" else None,
        "train_seconds": train_seconds,
        "process_seconds": time.monotonic() - started,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": output.training_loss,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=PEERS, default="padded")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--training", required=True, help="the job's spec.training block as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args.peer, args.model, args.data, json.loads(args.training), args.out.parent / f"hf-{args.peer}")
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
