"""Per-rank random number generator state, so dropout and sampling continue as if the run
had never stopped."""

from __future__ import annotations

import random
from pathlib import Path


def save_rng_state(path: str | Path) -> None:
    import numpy as np
    import torch

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng_state(path: str | Path) -> None:
    import numpy as np
    import torch

    # Our own file, checksum-verified against the manifest: it holds Python/numpy tuples.
    state = torch.load(path, weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
