#!/usr/bin/env bash
# Regenerate the Python stubs in csi/ from csi/csi.proto (tests/test_proto.py checks they match).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MBS_CSI_VENV:-$PWD/.venv}
"$venv/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. csi/csi.proto
