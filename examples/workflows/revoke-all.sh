#!/usr/bin/env bash
# Revoke every token of a project issued before now. Permanent: the API server refuses
# to move tokensNotBefore back or remove it. Same as `kubectl llmproxy revoke-all demo`.
set -euo pipefail
project=${1:-demo}
kubectl patch project "$project" --type merge \
  -p "{\"spec\":{\"tokensNotBefore\":\"$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ)\"}}"
