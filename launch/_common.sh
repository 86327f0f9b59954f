# Shared by the launch scripts (sourced, not run): the guardx overrides chosen by environment variables,
# and how the final command is run. The overrides go after the user's arguments, so they win.
#
#   BACKEND     ddp (default) | deepspeed
#   ZERO        deepspeed: ZeRO stage (default 2); DS_CONFIG defaults to launch/ds_zero$ZERO.json
#   PRECISION   fp32 | bf16 | fp16 (default: the config's)
#   GRAD_ACCUM  micro-batches per optimiser step (default: the config's)
#   PYTHON      the interpreter guardx is installed in (default: python)
#   DRY_RUN=1   print the command instead of running it

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}
BACKEND=${BACKEND:-ddp}

DIST_OVERRIDES=("distributed.backend=$BACKEND")
if [ "$BACKEND" = deepspeed ]; then
    ZERO=${ZERO:-2}
    DIST_OVERRIDES+=("distributed.zero_stage=$ZERO")
    DS_CONFIG=${DS_CONFIG:-$LAUNCH_DIR/ds_zero$ZERO.json}
    if [ -f "$DS_CONFIG" ]; then
        DIST_OVERRIDES+=("distributed.deepspeed_config=$DS_CONFIG")
    fi
fi
if [ -n "${PRECISION:-}" ]; then DIST_OVERRIDES+=("distributed.precision=$PRECISION"); fi
if [ -n "${GRAD_ACCUM:-}" ]; then DIST_OVERRIDES+=("distributed.grad_accum=$GRAD_ACCUM"); fi

run_or_print() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        exec "$@"
    fi
}
