#!/usr/bin/env bash
# Validates the Kubernetes manifests under deploy/k8s offline, against the
# Kubernetes API's own schemas (kubernetes-validate bundles them; no
# cluster is needed), strictly: unknown fields are errors.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
kubernetes-validate --strict deploy/k8s/*.yaml
