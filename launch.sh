#!/usr/bin/env bash
# affectjax launcher: bootstraps an environment, then runs one job.
#
#   ./launch.sh demo  [--config.x=y ...]   synthetic AffectNet -> ArrayRecords -> train -> eval (CPU, <10 min)
#   ./launch.sh test  [pytest args ...]    the whole test suite (what CI runs)
#   ./launch.sh train --config=configs/<name>.py [--config.x=y ...] --workdir=DIR
#   ./launch.sh prep  --input_dir=DIR --output_dir=OUT [...]   AffectNet -> ArrayRecords
#
# Environment: an active virtualenv ($VIRTUAL_ENV) or PYTHON=/path/to/python
# wins; otherwise ./.venv is created with python3 (3.11 or newer). On a host
# with NVIDIA GPUs the CUDA 12 build of jax is installed, on a TPU VM the TPU
# one; AFFECTJAX_ACCELERATOR=cpu|cuda|cuda13|tpu overrides the detection.
set -euo pipefail
# User paths (--workdir, --input_dir, ...) stay relative to the caller's
# directory; only demo and test run from the repository root.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# configs/*.py import `affectjax.config_base`, so the repository root must be importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() { sed -n '2,12p' "$ROOT/launch.sh" | sed 's/^# \{0,1\}//'; }

accelerator_extra() {
  if [[ -n "${AFFECTJAX_ACCELERATOR:-}" ]]; then
    case "$AFFECTJAX_ACCELERATOR" in cpu|cuda|cuda13|tpu) echo "$AFFECTJAX_ACCELERATOR"; return ;;
      *) die "AFFECTJAX_ACCELERATOR=$AFFECTJAX_ACCELERATOR: use cpu, cuda, cuda13 or tpu." ;; esac
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 ]]; then echo tpu
  else echo cpu; fi
}

# bootstrap EXTRAS: sets $PY to a python with affectjax[EXTRAS] installed.
bootstrap() {
  local extras="$1" own_venv=0
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PY="$VIRTUAL_ENV/bin/python"
  else
    own_venv=1
    if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
      command -v python3 >/dev/null || die "python3 (3.11 or newer) is needed; install it first."
      python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1); affectjax needs 3.11 or newer (or set PYTHON=...)."
      echo "launch.sh: creating $ROOT/.venv"
      python3 -m venv "$ROOT/.venv"
    fi
    PY="$ROOT/.venv/bin/python"
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1); affectjax needs Python 3.11 or newer."
  local accel; accel="$(accelerator_extra)"
  [[ "$accel" != cpu ]] && extras="${extras:+$extras,}$accel"
  local want; want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)-[${extras}]"
  local stamp="$ROOT/.venv/.installed-${extras:-core}"
  if [[ $own_venv == 0 ]]; then
    # A user's environment: install only what is missing.
    local mods="affectjax jax flax optax orbax.checkpoint grain array_record"
    [[ ",$extras," == *",test,"* ]] && mods="$mods pytest keras sklearn"
    if "$PY" -c "import importlib,sys; [importlib.import_module(m) for m in sys.argv[1:]]" $mods 2>/dev/null; then
      return
    fi
  elif [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "launch.sh: installing affectjax[${extras}] into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --quiet --upgrade pip
  local target="$ROOT"; [[ -n "$extras" ]] && target="$ROOT[${extras}]"
  "$PY" -m pip install --quiet -e "$target"
  [[ $own_venv == 1 ]] && echo "$want" > "$stamp"
  return 0
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  demo)
    bootstrap ""
    cd "$ROOT"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    raw=runs/demo/data/raw; prepared=runs/demo/data/arrayrecord
    if [[ ! -f "$raw/validation.csv" ]]; then
      "$PY" -m data_prep.synthetic --output_dir="$raw" --num_train="${DEMO_NUM_TRAIN:-6000}" \
        --num_val="${DEMO_NUM_VAL:-800}" --seed=0
    fi
    if [[ ! -f "$prepared/manifest.json" ]]; then
      "$PY" -m data_prep.affectnet --input_dir="$raw" --output_dir="$prepared" --image_size=56
    fi
    "$PY" -m affectjax.main --config=configs/custom_cnn.py:demo \
      --config.data.dir="$prepared" --workdir=runs/demo "$@"
    ;;
  test)
    bootstrap test
    cd "$ROOT"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    exec "$PY" -m pytest "$@"
    ;;
  train)
    bootstrap ""
    exec "$PY" -m affectjax.main "$@"
    ;;
  prep)
    bootstrap ""
    exec "$PY" -m data_prep.affectnet "$@"
    ;;
  help|-h|--help) usage ;;
  *) usage >&2; die "unknown command '$cmd'" ;;
esac
