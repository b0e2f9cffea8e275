# gcp_vm.sh: the VM's side of gcp_setup.sh. Everything that happens on the GPU VM lives here:
# building the environment (vm-setup), starting a run detached from the ssh session (vm-run),
# the run itself with its bucket sync (vm-job), resuming it at boot (vm-resume), and
# vm-status, vm-cancel, vm-lab.
#
# Not a program of its own: the laptop calls `bash ./gcp_setup.sh vm-COMMAND ...` over ssh
# (and the VM's startup script calls `bash ./gcp_setup.sh vm-resume RUN` at every boot);
# gcp_setup.sh parses that command line, then sources this file and calls cmd_vm_COMMAND.
# From gcp_setup.sh it uses: die, info, shell_quote, trim; resolve_run, which sets RUN_NAME,
# PARAMS and OUT_DIR (reading a params file through `python -m backpack_nb.params get`, with
# the interpreter in PARAMS_PY); ROOT, GCLOUD, DEFAULT_SYNC_SECONDS; the settled ENV_KIND,
# BUCKET, PORT, SYNC_SECONDS and RUN_ARG; the options opt_python, opt_foreground,
# opt_europarl_source and opt_logger.
#
# Written for bash >= 3.2, like gcp_setup.sh.
# shellcheck shell=bash disable=SC2153,SC2154  # (the names above come from gcp_setup.sh)

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    echo "gcp_vm.sh is the VM side of gcp_setup.sh: run ./gcp_setup.sh vm-COMMAND (see ./gcp_setup.sh --help)" >&2
    exit 2
fi

CONDA_ENV_NAME=backpack-nb
KERNEL_NAME=backpack-nb
# What setup and run leave behind for later calls and for the startup script.
# (The startup script looks in /home/*/.backpack-nb; BACKPACK_NB_STATE is for the tests.)
STATE_DIR=${BACKPACK_NB_STATE:-${HOME:-/tmp}/.backpack-nb}

# --------------------------------------------------------------------------- helpers

boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }

vm_python() { # the interpreter setup chose (--python overrides)
    if [[ -n $opt_python ]]; then
        printf '%s' "$opt_python"
        return 0
    fi
    if [[ ! -f $STATE_DIR/python ]]; then
        die "this VM has no backpack-nb environment yet" "on your laptop: ./gcp_setup.sh setup"
    fi
    local py
    py=$(trim "$(cat "$STATE_DIR/python")")
    printf '%s' "$py"
}

wait_for_gpu() { # wait_for_gpu SECONDS: the driver is installed during the first boot
    local waited=0
    until nvidia-smi >/dev/null 2>&1; do
        if ((waited >= $1)); then return 1; fi
        if ((waited == 0)); then info "waiting for the NVIDIA driver (installed during the first boot: a few minutes)"; fi
        sleep 10
        waited=$((waited + 10))
    done
    return 0
}

kv_get() { # kv_get KEY FILE: the value of a KEY=VALUE line ('' if absent)
    local line
    [[ -f $2 ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == "$1="* ]]; then
            printf '%s' "${line#*=}"
            return 0
        fi
    done <"$2"
    return 0
}

job_running() { # job_running RUN: its job is alive (on this boot: a pid file survives a reboot)
    local pidfile=$STATE_DIR/$1.pid pid="" boot=""
    [[ -f $pidfile ]] || return 1
    read -r pid boot <"$pidfile" || true
    [[ -n $pid && $boot == "$(boot_id)" ]] || return 1
    kill -0 "$pid" 2>/dev/null
}

# ------------------------------------------------------------------------- vm-setup

cmd_vm_setup() {
    cd "$ROOT"
    if ! command -v tmux >/dev/null 2>&1; then
        info "installing tmux"
        if ! { sudo apt-get update -qq && sudo apt-get install -y -qq tmux; }; then
            info "could not install tmux: runs will use nohup instead"
        fi
    fi
    if ! wait_for_gpu "${BACKPACK_NB_GPU_WAIT:-600}"; then
        info "warning: nvidia-smi does not answer yet"
    fi
    local py
    case $ENV_KIND in
        conda)
            local conda_root=${MINIFORGE_DIR:-$HOME/miniforge3}
            if [[ ! -x $conda_root/bin/conda ]]; then
                info "installing Miniforge (conda-forge's conda) into $conda_root"
                local installer
                installer=$(mktemp)
                curl -fsSL -o "$installer" \
                    "https://github.com/conda-forge/miniforge/releases/latest/download/Miniforge3-$(uname)-$(uname -m).sh"
                bash "$installer" -b -p "$conda_root"
                rm -f "$installer"
            fi
            if [[ -x $conda_root/envs/$CONDA_ENV_NAME/bin/python ]]; then
                info "updating the conda environment $CONDA_ENV_NAME from environment.yml"
                "$conda_root/bin/conda" env update --name "$CONDA_ENV_NAME" --file environment.yml --prune
            else
                info "creating the conda environment $CONDA_ENV_NAME from environment.yml (several minutes)"
                "$conda_root/bin/conda" env create --name "$CONDA_ENV_NAME" --file environment.yml
            fi
            py=$conda_root/envs/$CONDA_ENV_NAME/bin/python
            ;;
        venv)
            local python=python3
            if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
                if ! command -v python3.11 >/dev/null 2>&1; then
                    info "installing python3.11"
                    sudo apt-get update -qq
                    sudo apt-get install -y -qq python3.11 python3.11-venv
                fi
                python=python3.11
            fi
            if ! command -v make >/dev/null 2>&1; then sudo apt-get install -y -qq make; fi
            make setup PYTHON="$python"
            py=$ROOT/.venv/bin/python
            ;;
    esac
    "$py" -m ipykernel install --user --name "$KERNEL_NAME" --display-name "Python (backpack-nb, GPU)"
    if ! "$py" - <<'EOF'; then
import sys
import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}: torch.cuda.is_available() is False")
props = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}): GPU 0 is {props.name}, "
      f"{props.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} GPU(s)")
EOF
        die "PyTorch sees no GPU on this VM" \
            "check nvidia-smi (the driver installs during the first boot), then run ./gcp_setup.sh setup again"
    fi
    mkdir -p "$STATE_DIR"
    printf '%s\n' "$py" >"$STATE_DIR/python"
    info "ready: $py (Jupyter kernel '$KERNEL_NAME')"
}

# ------------------------------------------------------- vm-run, vm-resume, vm-job

cmd_vm_run() {
    cd "$ROOT"
    local py
    py=$(vm_python)
    # shellcheck disable=SC2034  # resolve_run (gcp_setup.sh) reads params files with it
    PARAMS_PY=$py
    resolve_run "$RUN_ARG"
    if job_running "$RUN_NAME"; then
        info "$RUN_NAME is already running: not starting it twice (./gcp_setup.sh status $RUN_NAME)"
        return 0
    fi
    if [[ -n $BUCKET ]] && ! "$GCLOUD" storage ls "$BUCKET" >/dev/null; then
        die "cannot read $BUCKET from this VM" \
            "create it (gcloud storage buckets create gs://NAME --location=REGION); the VM needs the storage-rw scope that ./gcp_setup.sh create gives it"
    fi
    if [[ -n $opt_logger && $opt_logger != none ]]; then ensure_logger "$py" "$opt_logger"; fi
    mkdir -p "$STATE_DIR/active"
    {
        printf 'repo=%s\n' "$ROOT"
        printf 'run=%s\n' "$RUN_NAME"
        printf 'params=%s\n' "$PARAMS"
        printf 'out_dir=%s\n' "$OUT_DIR"
        printf 'bucket=%s\n' "$BUCKET"
        printf 'europarl_source=%s\n' "$opt_europarl_source"
        printf 'python=%s\n' "$py"
        printf 'sync_every=%s\n' "$SYNC_SECONDS"
        printf 'logger=%s\n' "$opt_logger"
    } >"$STATE_DIR/active/$RUN_NAME"
    launch_job "$RUN_NAME"
}

ensure_logger() { # ensure_logger PYTHON LOGGER: its package in the environment, W&B's key on the VM
    local py=$1 logger=$2
    # the extra of pyproject.toml has the package's name (tensorboard, wandb)
    if ! "$py" -c "import $logger" >/dev/null 2>&1; then
        info "installing the $logger extra: pip install -e '.[$logger]'"
        "$py" -m pip install --quiet -e ".[$logger]" ||
            die "could not install the $logger package on this VM" \
                "on the VM: cd $ROOT && $py -m pip install -e '.[$logger]'; or run without --logger"
    fi
    if [[ $logger == wandb && ${WANDB_MODE:-} != offline && -z ${WANDB_API_KEY:-} ]] &&
        ! grep -qs 'api.wandb.ai' "$HOME/.netrc"; then
        die "W&B has no API key on this VM" \
            "once per VM: ./gcp_setup.sh connect, then $(dirname "$py")/wandb login (paste the key from https://wandb.ai/authorize)"
    fi
}

cmd_vm_resume() {
    cd "$ROOT"
    local marker=$STATE_DIR/active/$RUN_ARG
    if [[ ! -f $marker ]]; then
        info "$RUN_ARG has no interrupted run to resume"
        return 0
    fi
    if job_running "$RUN_ARG"; then
        info "$RUN_ARG is already running"
        return 0
    fi
    launch_job "$RUN_ARG"
}

launch_job() { # launch_job RUN: vm-job in tmux (or nohup), so that it outlives the ssh session
    local run=$1 session=bnb-$1
    if ((opt_foreground)); then
        RUN_ARG=$run
        cmd_vm_job
        return
    fi
    local out_dir
    out_dir=$(kv_get out_dir "$STATE_DIR/active/$run")
    if [[ ${BACKPACK_NB_LAUNCHER:-tmux} == tmux ]] && command -v tmux >/dev/null 2>&1; then
        tmux kill-session -t "=$session" 2>/dev/null || true
        tmux new-session -d -s "$session" -c "$ROOT" "exec $(shell_quote bash "$ROOT/gcp_setup.sh" vm-job "$run")"
        info "started $run in tmux session $session (watch: tmux attach -t $session, leave: Ctrl-b d)"
    else
        local launcher=()
        if command -v setsid >/dev/null 2>&1; then launcher=(setsid); fi
        # Every descriptor away from the session's, so that ssh returns at once.
        nohup ${launcher[@]+"${launcher[@]}"} bash "$ROOT/gcp_setup.sh" vm-job "$run" \
            </dev/null >/dev/null 2>&1 &
        info "started $run in the background (nohup)"
    fi
    info "log: $ROOT/$out_dir/gcp_pipeline.log"
}

cmd_vm_job() { # the run itself: restore, train/evaluate/report, sync; in tmux or nohup
    cd "$ROOT"
    JOB_RUN=$RUN_ARG
    local marker=$STATE_DIR/active/$JOB_RUN
    [[ -f $marker ]] || die "$JOB_RUN has no active run (start it with vm-run)"
    JOB_OUT=$(kv_get out_dir "$marker")
    JOB_BUCKET=$(kv_get bucket "$marker")
    local params py europarl logger
    params=$(kv_get params "$marker")
    py=$(kv_get python "$marker")
    europarl=$(kv_get europarl_source "$marker")
    logger=$(kv_get logger "$marker")
    JOB_EVERY=$(kv_get sync_every "$marker")
    JOB_EVERY=${JOB_EVERY:-$DEFAULT_SYNC_SECONDS}
    if job_running "$JOB_RUN"; then
        info "$JOB_RUN is already running"
        return 0
    fi
    mkdir -p "$STATE_DIR" "$JOB_OUT"
    printf '%s %s\n' "$$" "$(boot_id)" >"$STATE_DIR/$JOB_RUN.pid"
    JOB_LOG=$JOB_OUT/gcp_pipeline.log
    SYNC_PID=""
    INTERRUPTED=0
    trap job_cleanup EXIT
    trap 'INTERRUPTED=1' TERM HUP INT

    job_log "=== $JOB_RUN: params/$params.yaml into $JOB_OUT, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    if ! wait_for_gpu "${BACKPACK_NB_GPU_WAIT:-600}"; then
        job_log "warning: nvidia-smi does not answer; starting anyway"
    fi
    if [[ -n $JOB_BUCKET ]]; then
        if [[ ! -f $JOB_OUT/ckpt.pt ]]; then
            job_log "no local checkpoint: restoring $JOB_BUCKET/$JOB_OUT if the bucket has it"
            "$GCLOUD" storage rsync --recursive "$JOB_BUCKET/$JOB_OUT" "$JOB_OUT" >>"$JOB_LOG" 2>&1 ||
                job_log "nothing to restore"
        fi
        sync_loop &
        SYNC_PID=$!
    fi
    if [[ -f $JOB_OUT/ckpt.pt ]]; then job_log "checkpoint $JOB_OUT/ckpt.pt found: the pipeline resumes from it"; fi
    if [[ -n $europarl ]]; then export EUROPARL_SOURCE=$europarl; fi
    local cmd=("$py" -m backpack_nb.reports pipeline -f "params/$params.yaml" -p out_dir "$JOB_OUT")
    if [[ -n $logger ]]; then cmd+=(-p logger "$logger"); fi
    job_log "+ $(shell_quote "${cmd[@]}")"
    local rc status
    set +e
    "${cmd[@]}" 2>&1 | tee -a "$JOB_LOG"
    rc=${PIPESTATUS[0]}
    set -e

    if [[ -n $SYNC_PID ]]; then
        kill "$SYNC_PID" 2>/dev/null || true
        wait "$SYNC_PID" 2>/dev/null || true
        SYNC_PID=""
    fi
    if [[ ! -f $marker ]]; then
        status=cancelled
    elif ((INTERRUPTED || rc >= 128)); then
        status=interrupted
    elif ((rc == 0)); then
        status=finished
        rm -f "$marker"
    else
        status=failed
        rm -f "$marker"
    fi
    case $status in
        finished) job_log "=== $JOB_RUN finished: reports in outputs/$JOB_RUN/" ;;
        interrupted) job_log "=== $JOB_RUN interrupted (exit $rc): it resumes at the next boot, or with vm-run" ;;
        cancelled) job_log "=== $JOB_RUN cancelled (exit $rc)" ;;
        failed) job_log "=== $JOB_RUN failed (exit $rc): see the lines above; fix it, then run it again" ;;
    esac
    if [[ -n $JOB_BUCKET ]] && ! sync_up final; then job_log "warning: the final sync to $JOB_BUCKET failed"; fi
    {
        printf 'state=%s\n' "$status"
        printf 'rc=%s\n' "$rc"
        printf 'out_dir=%s\n' "$JOB_OUT"
        printf 'at=%s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    } >"$STATE_DIR/$JOB_RUN.status"
    return "$rc"
}

job_log() { # to the log, and to the terminal while there is one (tmux may be gone)
    printf '[gcp_setup] %s\n' "$*" | tee -a "$JOB_LOG" 2>/dev/null || true
}

job_cleanup() {
    if [[ -n ${SYNC_PID:-} ]]; then kill "$SYNC_PID" 2>/dev/null || true; fi
    rm -f "$STATE_DIR/$JOB_RUN.pid"
}

ckpt_stamp() { # changes whenever a checkpoint is saved
    local f stamp=""
    for f in "$JOB_OUT/ckpt.pt" "$JOB_OUT/best.pt"; do
        if [[ -f $f ]]; then stamp="$stamp $(stat -c %Y "$f" 2>/dev/null || stat -f %m "$f")"; fi
    done
    printf '%s' "$stamp"
}

sync_up() { # sync_up [final]: out/<run> and outputs/<run> to the bucket
    local exclude='(^|.*/)\.[^/]*$|.*\.tmp$'
    # The live log is still being written; the final sync takes it.
    if [[ ${1:-} != final ]]; then exclude="$exclude|.*gcp_pipeline\\.log$"; fi
    "$GCLOUD" storage rsync --recursive --exclude="$exclude" "$JOB_OUT" "$JOB_BUCKET/$JOB_OUT" \
        >>"$STATE_DIR/$JOB_RUN.sync.log" 2>&1 || return 1
    if [[ -d outputs/$JOB_RUN ]]; then
        "$GCLOUD" storage rsync --recursive "outputs/$JOB_RUN" "$JOB_BUCKET/outputs/$JOB_RUN" \
            >>"$STATE_DIR/$JOB_RUN.sync.log" 2>&1 || return 1
    fi
    return 0
}

sync_loop() { # after each checkpoint save, sync it to the bucket
    trap - EXIT TERM HUP INT
    local last="" now
    while sleep "$JOB_EVERY"; do
        now=$(ckpt_stamp)
        if [[ -n $now && $now != "$last" ]]; then
            if sync_up; then
                last=$now
                job_log "synced $JOB_OUT to $JOB_BUCKET/$JOB_OUT"
            else
                job_log "sync to $JOB_BUCKET failed (see $STATE_DIR/$JOB_RUN.sync.log); retrying later"
            fi
        fi
    done
}

# ----------------------------------------------------- vm-status, vm-cancel, vm-lab

last_log_line() { # the last non-empty line of a log (progress bars end lines with \r)
    [[ -f $1 ]] || return 0
    tail -c 4000 "$1" | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -n 1 || true
}

cmd_vm_status() {
    cd "$ROOT"
    local runs="" file run
    if [[ -n $RUN_ARG ]]; then
        runs=$RUN_ARG
    else
        for file in "$STATE_DIR"/active/* "$STATE_DIR"/*.status; do
            [[ -f $file ]] || continue
            run=${file##*/}
            run=${run%.status}
            case " $runs " in *" $run "*) ;; *) runs="$runs${runs:+ }$run" ;; esac
        done
    fi
    if [[ -z $runs ]]; then echo "no runs on this VM yet (./gcp_setup.sh run RUN_NAME)"; fi
    local out_dir state ckpt
    for run in $runs; do
        out_dir=$(kv_get out_dir "$STATE_DIR/active/$run")
        if [[ -z $out_dir ]]; then out_dir=$(kv_get out_dir "$STATE_DIR/$run.status"); fi
        if [[ -z $out_dir ]]; then out_dir=out/$run; fi
        if job_running "$run"; then
            state="running (pid $(cut -d' ' -f1 "$STATE_DIR/$run.pid"))"
        elif [[ -f $STATE_DIR/active/$run ]]; then
            state="interrupted: resumes at the next boot (or ./gcp_setup.sh run $run)"
        elif [[ -f $STATE_DIR/$run.status ]]; then
            state="$(kv_get state "$STATE_DIR/$run.status") (exit $(kv_get rc "$STATE_DIR/$run.status"), $(kv_get at "$STATE_DIR/$run.status"))"
        else
            state="never started"
        fi
        echo "run $run: $state"
        if [[ -f $out_dir/ckpt.pt ]]; then
            ckpt=$(date -u -r "$out_dir/ckpt.pt" '+%Y-%m-%d %H:%M UTC' 2>/dev/null || echo "?")
            echo "  checkpoint: $out_dir/ckpt.pt (saved $ckpt)"
        fi
        if [[ -f $out_dir/gcp_pipeline.log ]]; then
            echo "  last log line: $(last_log_line "$out_dir/gcp_pipeline.log")"
        fi
    done
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "GPU (name, memory used, memory total, utilization):"
        nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader |
            sed 's/^/  /' || echo "  nvidia-smi failed"
    else
        echo "GPU: nvidia-smi not found (driver not installed yet?)"
    fi
}

cmd_vm_cancel() {
    cd "$ROOT"
    local run=$RUN_ARG pid="" pgid="" waited=0
    rm -f "$STATE_DIR/active/$run"
    if job_running "$run"; then
        read -r pid _ <"$STATE_DIR/$run.pid" || true
        pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') || pgid=""
        if [[ $pgid == "$pid" ]]; then
            # tmux and setsid make the job a process-group leader: end the pipeline with it.
            kill -TERM -- "-$pid" 2>/dev/null || true
        else
            pkill -TERM -P "$pid" 2>/dev/null || true
            kill -TERM "$pid" 2>/dev/null || true
        fi
        while job_running "$run" && ((waited < 300)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        info "cancelled $run (its checkpoint stays; run it again to resume)"
    elif command -v tmux >/dev/null 2>&1 && tmux has-session -t "=bnb-$run" 2>/dev/null; then
        tmux kill-session -t "=bnb-$run"
        info "cancelled $run (its checkpoint stays; run it again to resume)"
    else
        info "$run was not running; it will not resume at the next boot"
    fi
}

cmd_vm_lab() {
    cd "$ROOT"
    local py url_re=":$PORT/"
    py=$(vm_python)
    if ! "$py" -m jupyter server list 2>/dev/null | grep -q "$url_re"; then
        local lab=("$py" -m jupyter lab --no-browser --ip=127.0.0.1 --port="$PORT"
            --ServerApp.port_retries=0 --ServerApp.root_dir="$ROOT")
        if [[ $(id -u) == 0 ]]; then lab+=(--allow-root); fi
        local log=$STATE_DIR/lab.log lab_pid=""
        mkdir -p "$STATE_DIR"
        : >"$log"
        if command -v tmux >/dev/null 2>&1; then
            tmux kill-session -t "=bnb-lab" 2>/dev/null || true
            tmux new-session -d -s bnb-lab -c "$ROOT" "$(shell_quote "${lab[@]}") >$(shell_quote "$log") 2>&1"
        else
            nohup "${lab[@]}" </dev/null >"$log" 2>&1 &
            lab_pid=$!
        fi
        local waited=0
        until grep -q "http://127.0.0.1$url_re" "$log"; do
            if [[ -n $lab_pid ]] && ! kill -0 "$lab_pid" 2>/dev/null; then waited=9999; fi
            if [[ -z $lab_pid ]] && ! tmux has-session -t "=bnb-lab" 2>/dev/null; then waited=9999; fi
            if ((waited >= 600)); then
                die "JupyterLab did not start on port $PORT; the end of $log:
$(tail -n 5 "$log")" "free the port or pick another one: ./gcp_setup.sh connect --lab --port 8890"
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    echo "JupyterLab runs on the VM (tmux session bnb-lab). On your laptop open:"
    "$py" -m jupyter server list 2>/dev/null | grep "$url_re" |
        sed -e 's#^http://[^:/]*:#  http://localhost:#' -e 's# :: .*##'
}

