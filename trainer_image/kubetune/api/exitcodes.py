"""Exit codes of kubetune-train, read by the operator to decide what a worker's end means."""

OK = 0
# The spec or the data is wrong: retrying cannot help. The operator marks the job Failed
# (InvalidSpec / InvalidData) without spending restarts.
INVALID_INPUT = 64
# Storage failed after bounded retries (EX_IOERR): a restart may help; counts as a restart.
STORAGE_ERROR = 74
# Preempted (SIGTERM): a checkpoint was committed before exit; restart resumes, no restart counted.
PREEMPTED = 75
