#!/usr/bin/env bash
# End-to-end on a real Kubernetes cluster (kind), CPU only: the same flow as
# tests/operator/test_e2e.py, with a real API server, kubelet, scheduler and cluster DNS.
#
#   1. kind cluster -> 2. build + load the operator and trainer images -> 3. MinIO in the cluster,
#   buckets, a tiny model and a dataset uploaded by a Job running our trainer image ->
#   4. helm install charts/kubetune -> 5. a 2-worker LoRA FineTuneJob -> training with
#   checkpoints in MinIO -> merge -> kubetune-serve -> 6. a chat request through a port-forward.
#
# CI CANNOT RUN THIS SCRIPT: the CI machines have no Docker engine and no kind/k3d binary
# (see shared TOOLING.md). CI runs tests/operator/test_e2e.py instead (kmock + a kubelet harness).
# Run it on a machine with docker, kind, kubectl and helm:
#
#   scripts/kind-e2e.sh                # creates cluster "kubetune-e2e", deletes it at the end
#   KEEP=1 scripts/kind-e2e.sh         # keep the cluster for inspection
#   TRAINER_BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime scripts/kind-e2e.sh
#
# Needs ~15 GB of disk for the trainer image and ~8 GB of memory for the kind node.
set -euo pipefail

CLUSTER=${CLUSTER:-kubetune-e2e}
NS=${NS:-kubetune-e2e}
TAG=${TAG:-e2e}
OPERATOR_IMAGE=kubetune/operator:$TAG
TRAINER_IMAGE=kubetune/trainer:$TAG
TIMEOUT=${TIMEOUT:-1800s}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is required" >&2; exit 2; }
done

log() { printf '\n==> %s\n' "$*"; }

cleanup() {
  status=$?
  if [ "$status" -ne 0 ]; then
    log "failed; state of namespace $NS"
    kubectl -n "$NS" get ftj,pods,svc,deploy,events 2>/dev/null | tail -n 60 || true
    kubectl -n "$NS" get ftj e2e -o jsonpath='{.status}' 2>/dev/null || true
    kubectl -n kubetune-system logs deploy/kubetune-operator --tail=100 2>/dev/null || true
  fi
  [ -n "${PF_PID:-}" ] && kill "$PF_PID" 2>/dev/null || true
  if [ "${KEEP:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
  exit "$status"
}
trap cleanup EXIT

log "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s

log "images"
docker build -t "$OPERATOR_IMAGE" "$ROOT"
docker build -f "$ROOT/trainer_image/Dockerfile" ${TRAINER_BASE_IMAGE:+--build-arg BASE_IMAGE=$TRAINER_BASE_IMAGE} -t "$TRAINER_IMAGE" "$ROOT"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"

log "MinIO, credentials, buckets, tiny model and dataset"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
ACCESS_KEY=kubetune-e2e
SECRET_KEY=$(head -c 24 /dev/urandom | base64 | tr -dc 'a-zA-Z0-9' | head -c 24)
kubectl -n "$NS" create secret generic s3-credentials \
  --from-literal=AWS_ACCESS_KEY_ID="$ACCESS_KEY" --from-literal=AWS_SECRET_ACCESS_KEY="$SECRET_KEY" \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f - <<'EOF'
apiVersion: apps/v1
kind: Deployment
metadata: {name: minio}
spec:
  selector: {matchLabels: {app: minio}}
  template:
    metadata: {labels: {app: minio}}
    spec:
      containers:
        - name: minio
          image: quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z
          args: [server, /data]
          env:
            - {name: MINIO_ROOT_USER, valueFrom: {secretKeyRef: {name: s3-credentials, key: AWS_ACCESS_KEY_ID}}}
            - {name: MINIO_ROOT_PASSWORD, valueFrom: {secretKeyRef: {name: s3-credentials, key: AWS_SECRET_ACCESS_KEY}}}
          ports: [{containerPort: 9000}]
          readinessProbe: {httpGet: {path: /minio/health/ready, port: 9000}}
          volumeMounts: [{name: data, mountPath: /data}]
      volumes: [{name: data, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: minio}
spec:
  selector: {app: minio}
  ports: [{port: 9000, targetPort: 9000}]
EOF
kubectl -n "$NS" rollout status deploy/minio --timeout=300s
ENDPOINT="http://minio.$NS.svc:9000"
kubectl -n "$NS" delete job seed --ignore-not-found
kubectl -n "$NS" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata: {name: seed}
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: seed
          image: $TRAINER_IMAGE
          imagePullPolicy: Never
          env:
            - {name: AWS_ENDPOINT_URL, value: "$ENDPOINT"}
            - {name: AWS_ACCESS_KEY_ID, valueFrom: {secretKeyRef: {name: s3-credentials, key: AWS_ACCESS_KEY_ID}}}
            - {name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: s3-credentials, key: AWS_SECRET_ACCESS_KEY}}}
          command:
            - python
            - -c
            - |
              import json, tempfile
              from kubetune.artifacts.storage import open_store, s3_client
              from kubetune.testing import build_tiny_model
              client = s3_client()
              for bucket in ("models", "data", "outputs"):
                  try:
                      client.create_bucket(Bucket=bucket)
                  except client.exceptions.BucketAlreadyOwnedByYou:
                      pass
              open_store("s3://models/tiny").put_dir(build_tiny_model(tempfile.mkdtemp()), "")
              qa = [("What is the capital of France?", "Paris."), ("What colour is the sky?", "Blue.")] * 8
              open_store("s3://data/e2e").put_bytes("train.jsonl", "\n".join(json.dumps({"prompt": q, "response": a}) for q, a in qa).encode())
EOF
kubectl -n "$NS" wait --for=condition=complete job/seed --timeout=600s

log "operator (helm chart)"
helm upgrade --install kubetune "$ROOT/charts/kubetune" --namespace kubetune-system --create-namespace \
  --set images.operator.repository=kubetune/operator --set images.operator.tag="$TAG" --set images.operator.pullPolicy=Never \
  --set images.trainer.repository=kubetune/trainer --set images.trainer.tag="$TAG" --set images.trainer.pullPolicy=Never \
  --wait --timeout 300s

log "FineTuneJob e2e: LoRA, 2 workers x 1 process, CPU"
kubectl -n "$NS" apply -f - <<EOF
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata: {name: e2e}
spec:
  model: {uri: s3://models/tiny}
  dataset: {uri: s3://data/e2e/train.jsonl, format: prompt_response}
  method: {type: lora, lora: {r: 4, alpha: 8, targetModules: [q_proj, v_proj]}}
  training: {maxSteps: 6, learningRate: 0.01, maxLength: 64, logEverySteps: 1, precision: fp32}
  distributed: {nodes: 2, gpusPerNode: 1, zero: {stage: 0}}
  resources: {requests: {cpu: 500m, memory: 2Gi}, limits: {nvidia.com/gpu: 0, memory: 4Gi}}
  checkpoint: {everySteps: 3, keep: 2}
  storage: {endpoint: "$ENDPOINT", credentialsSecret: s3-credentials}
  output: {uri: s3://outputs/e2e, merge: true}
  serving: {enabled: true, generation: {temperature: 0, maxTokens: 16}, resources: {requests: {cpu: 500m, memory: 2Gi}}}
  runPolicy: {backoffLimit: 2}
EOF
kubectl -n "$NS" get ftj e2e
kubectl -n "$NS" wait ftj/e2e --for=jsonpath='{.status.phase}'=Serving --timeout="$TIMEOUT"
kubectl -n "$NS" wait ftj/e2e --for=condition=Ready --timeout=600s
kubectl -n "$NS" get ftj e2e -o wide
kubectl -n "$NS" get ftj e2e -o jsonpath='{.status.progress.summary} loss={.status.loss} checkpoint={.status.lastCheckpoint}{"\n"}'

log "chat request through a port-forward to svc/e2e-serve"
kubectl -n "$NS" port-forward svc/e2e-serve 18000:8000 >/dev/null 2>&1 &
PF_PID=$!
for _ in $(seq 30); do curl -sf http://127.0.0.1:18000/readyz >/dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:18000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "e2e", "messages": [{"role": "user", "content": "What is the capital of France?"}]}' | tee /dev/stderr \
  | python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["model"] == "e2e" and r["choices"][0]["finish_reason"] in ("stop", "length")'

log "delete the job: children go, outputs stay"
kubectl -n "$NS" delete ftj e2e --wait=true --timeout=120s
test -z "$(kubectl -n "$NS" get pods,svc,deploy,cm -l kubetune.io/job=e2e -o name)"
log "kind-e2e: OK"
