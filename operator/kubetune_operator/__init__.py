"""KubeTune operator: reconciles FineTuneJob resources (kopf)."""
