#!/usr/bin/env bash
# BFCL as a library, without its pins that would break the base stack (bfcl-eval pins numpy==1.26.4): the wheel
# with --no-deps, then only what importing its checkers needs, with numpy/pydantic held at the installed versions.
set -euo pipefail
PY=${PYTHON:-python}
held=$(mktemp); trap 'rm -f "$held"' EXIT
"$PY" - >"$held" <<'PY'
# hold what the base stack pins: numpy/pydantic, and botocore inside aiobotocore's range (s3fs needs it)
from importlib.metadata import version
for name in ("numpy", "pydantic", "botocore", "aiobotocore"):
    print(f"{name}=={version(name)}")
PY
"$PY" -m pip install --no-deps "bfcl-eval==2026.3.23"
"$PY" -m pip install -c "$held" "tree_sitter==0.21.3" "tree-sitter-java==0.21.0" "tree-sitter-javascript==0.21.4" \
  "mistralai==1.7.0" "datamodel-code-generator==0.25.7" qwen-agent websocket-client writer-sdk boto3 overrides \
  soundfile python-dotenv tabulate typer anthropic openai cohere google-genai
