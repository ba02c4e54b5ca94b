#!/usr/bin/env bash
# The compose `milvus` profile, checked on a machine with Docker: starts Milvus Standalone
# (etcd + MinIO + Milvus 2.5, deploy/docker-compose.yml), waits until a search succeeds, runs the
# backend contract suite's Milvus-server cases against it (CSMF_TEST_MILVUS_URI), and
# stops the profile again (its volumes are kept; KEEP=1 leaves it running).
#
#   bash deploy/milvus-compose-check.sh          # from the repository root, after `make venv`
#
# CI and machines without Docker run the same suite against the embedded Milvus 2.3 server
# instead (tests/fixtures/milvus.py). Against 2.5 the collections use nullable fields, not the
# null flags 2.3 needs (csmf/index/milvus.py), so this also covers that path.
set -euo pipefail
cd "$(dirname "$0")/.."
COMPOSE=(docker compose -f deploy/docker-compose.yml --profile milvus)
URI=${CSMF_TEST_MILVUS_URI:-http://127.0.0.1:19530}

"${COMPOSE[@]}" up -d milvus
cleanup() { [ "${KEEP:-0}" = 1 ] || "${COMPOSE[@]}" stop milvus milvus-etcd milvus-minio; }
trap cleanup EXIT

.venv/bin/python -m csmf.index.milvus_server --wait "$URI"
CSMF_TEST_MILVUS_URI=$URI .venv/bin/python -m pytest -q tests/index/test_contract.py -k milvus-server
