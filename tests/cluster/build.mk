# Builds .cache/bin/kubetune-cluster (included by the Makefile; `make cluster`). Go's module
# and build caches stay under .cache/. The binary is rebuilt only when a file of this folder
# that the build reads changes: go.mod, go.sum, *.go and this file (its flags).
# README "Build times" has the measured cost.
K8S_VERSION := v1.37.2
CLUSTER_BIN := .cache/bin/kubetune-cluster
# Static (no cgo: no C compiler in the build), no DWARF (8% less compile CPU, a quarter less
# cache; the binary keeps no symbols either: -s -w).
GO_ENV := GOCACHE=$(CURDIR)/.cache/go-build GOMODCACHE=$(CURDIR)/.cache/gomod GOPATH=$(CURDIR)/.cache/gopath \
  CGO_ENABLED=0 GOFLAGS='-mod=readonly -buildvcs=false -trimpath'
GO_GCFLAGS := all=-dwarf=false
GO_LDFLAGS := -s -w \
  -X k8s.io/component-base/version.gitVersion=$(K8S_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 \
  -X k8s.io/component-base/version.gitMinor=37 \
  -X k8s.io/component-base/version.gitTreeState=clean

$(CLUSTER_BIN): tests/cluster/go.mod tests/cluster/go.sum tests/cluster/build.mk $(wildcard tests/cluster/*.go)
	cd tests/cluster && $(GO_ENV) go build -gcflags='$(GO_GCFLAGS)' -ldflags='$(GO_LDFLAGS)' -o $(CURDIR)/$@.tmp .
	mv $@.tmp $@
