"""Memory planning without a GPU: `kubetune plan` and the operator's fit check.

    estimate.py       GPU and host memory of a job per ZeRO stage, method and precision
    zero_sizes.py     DeepSpeed's buffer sizes from the hidden size (the trainer's DeepSpeed
                      config reads them too, so plan and run agree)
    model_configs/    configs of well-known models, for planning without their files
"""
