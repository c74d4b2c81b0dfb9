"""The users' baseline: `transformers.Trainer` as in the fine-tuning tutorials, every sample
padded to the maximum length, no packing, loss on the answer only.

Runs in its own process (same thread count as the KubeTune run):

    python -m bench.hf_baseline --model DIR --data FILE.jsonl --training '{"epochs": 1, ...}' --out result.json

`--training` takes the job's `spec.training` block, so both sides read the same hyperparameters.
The result holds the seconds inside `trainer.train()`, non-padding tokens counted by the
Trainer itself, optimizer steps and losses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import tokenize_chat


class PaddedChatDataset:
    """Chat records tokenized with the model's template and padded to max_length."""

    def __init__(self, records: list[dict], tokenizer, max_length: int):
        self.items = []
        for record in records:
            ids, labels = tokenize_chat(tokenizer, record)
            ids, labels = ids[:max_length], labels[:max_length]
            pad = max_length - len(ids)
            self.items.append(
                {
                    "input_ids": ids + [tokenizer.pad_token_id] * pad,
                    "attention_mask": [1] * len(ids) + [0] * pad,
                    "labels": labels + [-100] * pad,
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def training_arguments(training: dict, out_dir: Path):
    from transformers import TrainingArguments

    return TrainingArguments(
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
    )


def run(model_dir: Path, data: Path, training: dict, out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator

    started = time.monotonic()
    torch.manual_seed(training.get("seed", 1234))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    dataset = PaddedChatDataset(records, tokenizer, training["maxLength"])
    trainer = Trainer(model=model, args=training_arguments(training, out_dir), train_dataset=dataset, data_collator=default_data_collator)
    train_start = time.monotonic()
    output = trainer.train()
    train_seconds = time.monotonic() - train_start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "samples": len(dataset),
        "steps": trainer.state.global_step,
        "non_padding_tokens": int(trainer.state.num_input_tokens_seen),
        "padded_tokens_per_epoch": len(dataset) * training["maxLength"],
        "train_seconds": train_seconds,
        "process_seconds": time.monotonic() - started,
        "final_loss": losses[-1] if losses else None,
        "mean_loss": output.training_loss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--training", required=True, help="the job's spec.training block as JSON")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args.model, args.data, json.loads(args.training), args.out.parent / "hf-trainer")
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
