"""KubeTune: fine-tune language models from one FineTuneJob resource, on a laptop or a cluster."""

__version__ = "0.1.0"
