#!/usr/bin/env bash
# The virtual environment of scripts/setup.sh, for the python3 first on PATH:
#   scripts/venv.sh ensure DIR [VENV OPTIONS]   create DIR with `python3 -m venv`, or recreate it (one line says so)
#       when another interpreter made it: `python3 -m venv` over a venv of another Python rewrites pyvenv.cfg and
#       keeps site-packages built for the first one, a broken environment
#   scripts/venv.sh check DIR   import the project's packages with DIR's python and print their versions; one
#       line and exit 1 when an import fails
set -euo pipefail
command=$1 venv=$2
shift 2
probe='import os, sys; print(os.path.realpath(sys._base_executable), sys.version.split()[0])'
case $command in
ensure)
    want=$(python3 -c "$probe")
    if [ -e "$venv" ]; then
        have=$("$venv/bin/python" -c "$probe" 2>/dev/null) || have="an interpreter that does not start"
        grep -q "^version[_a-z]* = ${have##* }" "$venv/pyvenv.cfg" 2>/dev/null || have="$have (pyvenv.cfg: another)"
        if [ "$have" != "$want" ]; then
            echo "setup: $venv was made by $have, python3 is $want: recreating $venv"
            rm -rf "$venv"
        fi
    fi
    [ -e "$venv" ] || python3 -m venv "$@" "$venv"
    ;;
check)
    "$venv/bin/python" -I - "$venv" <<'PY'  # -I: the installed project, not the source folder it runs in
import importlib, sys

names = ["gptoss", "jax", "flax", "jax2onnx", "onnxruntime", "transformers", "huggingface_hub.hf_api"]
try:
    m = {name: importlib.import_module(name) for name in names}
except Exception as exc:  # any import error, whatever its type
    sys.exit(f"setup: {sys.argv[1]} cannot import the project: {type(exc).__name__}: {str(exc).splitlines()[0]}")
print(f"installed into {sys.argv[1]}: " + ", ".join(f"{n} {getattr(m[n], '__version__', '?')}" for n in names[1:6]))
PY
    ;;
*)
    echo "usage: scripts/venv.sh ensure|check DIR" >&2
    exit 2
    ;;
esac
