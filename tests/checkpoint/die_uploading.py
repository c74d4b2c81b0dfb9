"""kubetune-train, except that rank 1 SIGKILLs itself right after it uploaded its first file
of checkpoint step-N: a real crash in the middle of a checkpoint upload, at a fixed point.

    torchrun --nproc_per_node 2 die_uploading.py N --job JOB.yaml
"""

from __future__ import annotations

import os
import signal
import sys

from kubetune.artifacts import storage
from kubetune.train.main import main

prefix = f"step-{int(sys.argv.pop(1)):09d}/"

if os.environ.get("RANK") == "1":
    for store_class in (storage.S3Store, storage.LocalStore):

        def put_then_die(self, local, key, _put=store_class.put_file):
            _put(self, local, key)
            if key.startswith(prefix):
                os.kill(os.getpid(), signal.SIGKILL)

        store_class.put_file = put_then_die

sys.exit(main())
