#!/usr/bin/env bash
# Build both images and install KubeTune on a local kind cluster. Needs docker, kind, kubectl
# and helm (not available in CI, which renders the chart with the Helm engine instead).
#   charts/kubetune/scripts/kind-install.sh            # cluster "kubetune", images tagged "dev"
#   CLUSTER=demo TAG=v1 WATCH=team-a charts/kubetune/scripts/kind-install.sh
set -euo pipefail

cluster=${CLUSTER:-kubetune}
tag=${TAG:-dev}
watch=${WATCH:-}
root=$(cd "$(dirname "$0")/../../.." && pwd)

kind get clusters | grep -qx "$cluster" || kind create cluster --name "$cluster"
docker build -t "kubetune/operator:$tag" "$root"
docker build -f "$root/trainer_image/Dockerfile" -t "kubetune/trainer:$tag" "$root"
kind load docker-image --name "$cluster" "kubetune/operator:$tag" "kubetune/trainer:$tag"

helm upgrade --install kubetune "$root/charts/kubetune" \
  --kube-context "kind-$cluster" --namespace kubetune-system --create-namespace \
  --set images.operator.repository=kubetune/operator --set "images.operator.tag=$tag" \
  --set images.operator.pullPolicy=Never \
  --set images.trainer.repository=kubetune/trainer --set "images.trainer.tag=$tag" \
  --set images.trainer.pullPolicy=Never \
  ${watch:+--set "watchNamespaces={$watch}"} \
  --wait
kubectl --context "kind-$cluster" -n kubetune-system rollout status deployment/kubetune
echo "KubeTune is running. Try: kubectl apply -f $root/examples/<job>.yaml"
