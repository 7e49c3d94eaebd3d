#!/usr/bin/env bash
# Regenerates the committed Python code for protos/disagg/v1/*.proto into disagg/v1/.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -Iprotos \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/disagg/v1/*.proto
touch disagg/v1/__init__.py
