#!/usr/bin/env bash
# affectjax launcher: bootstraps an environment, then runs one job.
#
#   ./launch.sh demo  [--config.x=y ...]   synthetic AffectNet -> ArrayRecords -> train -> eval (CPU, <10 min)
#   ./launch.sh test  [pytest args ...]    the whole test suite (what CI runs)
#   ./launch.sh train --config=configs/<name>.py [--config.x=y ...] --workdir=DIR
#   ./launch.sh prep  --input_dir=DIR --output_dir=OUT [...]   AffectNet -> ArrayRecords
#   ./launch.sh evaluate|predict|export [flags ...]   python -m affectjax.<command>
#
# Environment: an active virtualenv ($VIRTUAL_ENV) or PYTHON=/path/to/python
# wins; otherwise ./.venv is created with python3 (3.11 or newer). On a host
# with NVIDIA GPUs the CUDA 12 build of jax is installed, on a TPU VM the TPU
# one; AFFECTJAX_ACCELERATOR=cpu|cuda|cuda13|tpu overrides the detection.
# train/evaluate/predict/export refuse to start when jax's backend does not
# match that hardware (a CPU-only jax on a GPU host).
#
# Several hosts may bootstrap one shared checkout at once: installs take a
# lock (an atomic mkdir of .launch.lock; a lock whose owner died is taken
# over). Runs on Linux and macOS (bash 3.2, no GNU-only tools).
set -euo pipefail
# User paths (--workdir, --input_dir, ...) stay relative to the caller's
# directory; only demo and test run from the repository root.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# configs/*.py import `affectjax.config_base`, so the repository root must be importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "launch.sh: $*" >&2; exit 2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$ROOT/launch.sh"; }

accelerator_extra() {
  if [[ -n "${AFFECTJAX_ACCELERATOR:-}" ]]; then
    case "$AFFECTJAX_ACCELERATOR" in cpu|cuda|cuda13|tpu) echo "$AFFECTJAX_ACCELERATOR"; return ;;
      *) die "AFFECTJAX_ACCELERATOR=$AFFECTJAX_ACCELERATOR: use cpu, cuda, cuda13 or tpu." ;; esac
  fi
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda
  elif [[ -e /dev/accel0 || -e /dev/vfio/0 ]]; then echo tpu
  else echo cpu; fi
}

# The install lock: mkdir is atomic on local and network filesystems alike
# (flock does not exist on macOS). The owner writes "host pid start-time"; a
# lock is stale when its owner is a dead process on this host, or, from
# another host, older than AFFECTJAX_LOCK_STALE_S (default 1800 s, longer
# than any install).
LOCK="$ROOT/.launch.lock"
LOCK_HELD=0

lock_owner_dead() {
  local host pid started now
  read -r host pid started < "$LOCK/owner" 2>/dev/null || return 1
  if [[ "$host" == "$(hostname)" ]]; then
    ! kill -0 "$pid" 2>/dev/null
  else
    now="$(date +%s)"
    (( now - started > ${AFFECTJAX_LOCK_STALE_S:-1800} ))
  fi
}

acquire_lock() {
  local waited=0
  until mkdir "$LOCK" 2>/dev/null; do
    if [[ -f "$LOCK/owner" ]] && lock_owner_dead; then
      echo "launch.sh: taking over a stale lock ($(cat "$LOCK/owner"))" >&2
      # Rename first, so that of two hosts taking it over only one succeeds.
      mv "$LOCK" "$LOCK.stale.$$" 2>/dev/null && rm -rf "$LOCK.stale.$$"
      continue
    fi
    if (( waited % 30 == 0 )); then
      echo "launch.sh: waiting for another install to finish (lock $LOCK:" \
        "$(cat "$LOCK/owner" 2>/dev/null || echo starting))" >&2
    fi
    sleep 1; waited=$((waited + 1))
  done
  echo "$(hostname) $$ $(date +%s)" > "$LOCK/owner"
  LOCK_HELD=1
  trap release_lock EXIT
}

release_lock() {
  if [[ $LOCK_HELD == 1 ]]; then rm -rf "$LOCK"; LOCK_HELD=0; fi
}

# checksum FILE...: a short sha256 of the files (python: sha256sum is
# GNU-only and macOS has shasum instead).
checksum() {
  "$PY" -c 'import hashlib,sys
h = hashlib.sha256()
for f in sys.argv[1:]: h.update(open(f, "rb").read())
print(h.hexdigest()[:16])' "$@"
}

# check_backend: jax must run on the hardware that was detected, or a
# CPU-only jax on a GPU host would silently train on the CPU. An explicit
# JAX_PLATFORMS is the user's choice and is not second-guessed.
check_backend() {
  [[ -n "${JAX_PLATFORMS:-}" ]] && return 0
  local want got
  case "$(accelerator_extra)" in cpu) want=cpu ;; tpu) want=tpu ;; *) want=gpu ;; esac
  got="$(XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -n 1)" || got="(jax failed to start)"
  if [[ "$got" != "$want" ]]; then
    die "this host has $want hardware ($(accelerator_extra)) but jax's backend is '$got'. Reinstall with" \
      "'rm -rf $ROOT/.venv && ./launch.sh $cmd ...' (or pip install 'jax[cuda12]' / 'jax[tpu]' into $PY)," \
      "or set AFFECTJAX_ACCELERATOR=cpu (or JAX_PLATFORMS=cpu) to run on the CPU on purpose."
  fi
}

# bootstrap EXTRAS: sets $PY to a python with affectjax[EXTRAS] installed.
bootstrap() {
  local extras="$1" own_venv=0
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then PY="$VIRTUAL_ENV/bin/python"
  else own_venv=1; PY="$ROOT/.venv/bin/python"
  fi
  local accel; accel="$(accelerator_extra)"
  [[ "$accel" != cpu ]] && extras="${extras:+$extras,}$accel"
  if install_needed "$extras" "$own_venv"; then
    acquire_lock
    # Another host may have installed while this one waited.
    if install_needed "$extras" "$own_venv"; then install "$extras" "$own_venv"; fi
    release_lock
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1); affectjax needs Python 3.11 or newer."
}

stamp_file() { echo "$ROOT/.venv/.installed-${1:-core}"; }

stamp_value() {  # What the stamp holds once affectjax[EXTRAS] is installed.
  echo "$(checksum "$ROOT/setup.cfg" "$ROOT/pyproject.toml")-[$1]"
}

# install_needed EXTRAS OWN_VENV: whether anything must be (re)installed.
install_needed() {
  local extras="$1" own_venv="$2"
  [[ -x "$PY" ]] || return 0
  if [[ $own_venv == 0 ]]; then
    # A user's environment: install only what is missing.
    local mods="affectjax jax flax optax orbax.checkpoint grain array_record"
    [[ ",$extras," == *",test,"* ]] && mods="$mods pytest keras sklearn"
    ! "$PY" -c "import importlib,sys; [importlib.import_module(m) for m in sys.argv[1:]]" $mods 2>/dev/null
  else
    local stamp; stamp="$(stamp_file "$extras")"
    ! [[ -f "$stamp" && "$(cat "$stamp")" == "$(stamp_value "$extras")" ]]
  fi
}

install() {
  local extras="$1" own_venv="$2"
  if [[ $own_venv == 1 && ! -x "$PY" ]]; then
    command -v python3 >/dev/null || die "python3 (3.11 or newer) is needed; install it first."
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "python3 is $(python3 -V 2>&1); affectjax needs 3.11 or newer (or set PYTHON=...)."
    echo "launch.sh: creating $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
  fi
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" -V 2>&1); affectjax needs Python 3.11 or newer."
  echo "launch.sh: installing affectjax[${extras}] into $("$PY" -c 'import sys; print(sys.prefix)')"
  "$PY" -m pip install --quiet --upgrade pip
  local target="$ROOT"; [[ -n "$extras" ]] && target="$ROOT[${extras}]"
  "$PY" -m pip install --quiet -e "$target"
  if [[ $own_venv == 1 ]]; then stamp_value "$extras" > "$(stamp_file "$extras")"; fi
  return 0
}

# Sourced (by tests): define the functions only.
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

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
    # exec: signals reach the trainer and its exit status (75 when stopped
    # by a signal after a checkpoint) is the script's, as for train.
    exec "$PY" -m affectjax.main --config=configs/custom_cnn.py:demo \
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
    check_backend
    exec "$PY" -m affectjax.main "$@"
    ;;
  evaluate|predict|export)
    # export --format=onnx needs the converter (the onnx extra), on demand;
    # predict the detect extra (OpenCV: videos, --detect_faces).
    case "$cmd $* " in export*" --format=onnx "*|export*" --format onnx "*) bootstrap onnx ;;
      predict*) bootstrap detect ;;
      *) bootstrap "" ;; esac
    check_backend
    exec "$PY" -m "affectjax.$cmd" "$@"
    ;;
  prep)
    bootstrap ""
    exec "$PY" -m data_prep.affectnet "$@"
    ;;
  help|-h|--help) usage ;;
  *) usage >&2; die "unknown command '$cmd'" ;;
esac
