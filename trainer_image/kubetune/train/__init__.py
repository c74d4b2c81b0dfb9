"""The training program: `kubetune-train --job JOB.yaml` (main.py).

    main.py             command line, exit codes (64 bad input, 74 storage, 75 preempted)
    launch.py           torchrun for the worker pods, keeping the trainer's exit code
    loop.py             one run as a process: data checked, process group, trackers, then the recipe
    recipe.py           FineTuneRecipe: setup (data, model, engine, resume) -> train -> finish, save, evaluate
    engine.py           the DeepSpeed engine (optimizer, LR schedule) from the model and config
    deepspeed_config.py the DeepSpeed config from the spec (pure)
    loss.py             the loss of a step: the mean over all its answer tokens, on every rank
    reporter.py         one Reporter for everything a run reports: events.py (JSON lines),
                        metrics.py (Prometheus), progress.json / metrics.jsonl / summary.json,
                        tracking.py (TensorBoard, SwanLab, W&B, MLflow)
    evaluate.py         validation loss and generation metrics (ROUGE, BLEU-4, exact match, F1)
    export.py           the trained model or adapter written as an export; --merge folds a LoRA into its base
"""
