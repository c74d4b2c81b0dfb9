"""The training program: `kubetune-train --job JOB.yaml` (main.py)."""
