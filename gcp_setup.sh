#!/usr/bin/env bash
# gcp_setup.sh: train backpack-nb on a rented Google Cloud GPU, from a laptop to a running
# papermill batch in a few commands (docs/gcp.md walks through them; --help lists them).
#
# This file is the laptop's side and the one door: it parses every command line, talks to
# gcloud, and reaches the VM over ssh as `bash ./gcp_setup.sh vm-COMMAND ...` in the VM's
# copy of this checkout. What runs there (the vm-* commands) lives in gcp_vm.sh, which this
# file sources for those commands. Both sides are tested without a cloud
# (tests/test_gcp_setup.py, with a fake gcloud).
#
# Written for bash >= 3.2 (macOS laptops): no associative arrays, no mapfile, empty arrays
# are never expanded.
set -euo pipefail

PROG=gcp_setup.sh
case ${BASH_SOURCE[0]} in
    */*) ROOT=${BASH_SOURCE[0]%/*} ;;
    *) ROOT=. ;;
esac
ROOT=$(cd "$ROOT" && pwd)

GCLOUD=${GCLOUD:-gcloud}

DEFAULT_INSTANCE=backpack-nb-gpu
DEFAULT_ZONE=us-central1-a
DEFAULT_GPU=t4
DEFAULT_IMAGE_FAMILY=common-cu128-ubuntu-2204-nvidia-570
DEFAULT_IMAGE_PROJECT=deeplearning-platform-release
DEFAULT_DISK_GB=100
DEFAULT_REMOTE_DIR=backpack-nb
DEFAULT_ENV=conda
DEFAULT_LAB_PORT=8888
DEFAULT_SYNC_SECONDS=60
CONFIG_KEYS="GCP_PROJECT GCP_ZONE GCP_INSTANCE GCP_GPU GCP_GPU_COUNT GCP_MACHINE_TYPE"
CONFIG_KEYS="$CONFIG_KEYS GCP_IMAGE_FAMILY GCP_IMAGE_PROJECT GCP_DISK_SIZE GCP_SPOT GCP_BUCKET"
CONFIG_KEYS="$CONFIG_KEYS GCP_REMOTE_DIR GCP_ENV GCP_REPO GCP_REF"
LOCAL_COMMANDS="create setup connect run status fetch cancel stop start delete"

usage() {
    cat <<EOF
usage: ./gcp_setup.sh COMMAND [RUN_NAME] [options]

Train backpack-nb on a Google Cloud GPU VM (see docs/gcp.md).

commands (on your laptop):
  create            create the GPU VM (does nothing when a VM with that name exists)
  setup             copy this checkout to the VM, create its environment, register the
                    Jupyter kernel, check torch.cuda.is_available() and print the GPU
  connect           ssh into the VM (--lab: also start JupyterLab there and forward its port)
  run RUN_NAME      start the papermill pipeline on the VM in tmux (survives a dropped
                    connection; resumes from out/<run>/ckpt.pt; resumes after a restart)
  status [RUN_NAME] VM state, whether each run is going, its last log line, GPU memory
  fetch RUN_NAME    copy outputs/<run_name>/ and the run's checkpoints back (or from --bucket)
  cancel RUN_NAME   stop a run for good (it will not resume after a restart)
  stop | start      stop the VM (no GPU/CPU charges; the disk is still billed) / start it again
  delete            delete the VM and its disk (asks first unless --yes)

RUN_NAME: a params name (params/<name>.yaml), or the seed's names backpack_full
(= train_europarl_scratch into out/backpack_full) and transformer_full
(= train_europarl_transformer_baseline into out/transformer_full).

options (every one also has a default in gcp.conf or the environment, flags win):
  --project ID          GCP_PROJECT        (default: gcloud config get-value project)
  --zone ZONE           GCP_ZONE           (default: $DEFAULT_ZONE)
  --name NAME           GCP_INSTANCE       (default: $DEFAULT_INSTANCE)
  --config FILE         GCP_CONF           (default: gcp.conf next to this script, if present)
  --dry-run             print every gcloud command instead of running it
 create:
  --gpu t4|l4|a100|a100-80gb  GCP_GPU      (default: $DEFAULT_GPU; machine type follows:
                        n1-standard-8 + T4, g2-standard-8, a2-highgpu-1g, a2-ultragpu-1g)
  --gpu-count N         GCP_GPU_COUNT      (T4 only; default 1)
  --machine-type TYPE   GCP_MACHINE_TYPE   (overrides the one the GPU implies)
  --image-family FAMILY GCP_IMAGE_FAMILY   (default: $DEFAULT_IMAGE_FAMILY)
  --image-project PROJ  GCP_IMAGE_PROJECT  (default: $DEFAULT_IMAGE_PROJECT)
  --disk-size GB        GCP_DISK_SIZE      (default: $DEFAULT_DISK_GB)
  --spot                GCP_SPOT=1         (spot VM: much cheaper, may be stopped at any time;
                        --preemptible is the same)
 setup:
  --env conda|venv      GCP_ENV            (default: $DEFAULT_ENV: environment.yml in
                        ~/miniforge3; venv: make setup with python3.11)
  --repo URL [--ref REF] GCP_REPO, GCP_REF (git clone on the VM instead of copying this checkout)
  --code-only           only copy the code (after a local change), keep the environment
  --remote-dir DIR      GCP_REMOTE_DIR     (checkout on the VM, relative to home;
                        default: $DEFAULT_REMOTE_DIR; every command uses it)
 connect:
  --lab [--port N]      start JupyterLab on the VM and forward localhost:N (default $DEFAULT_LAB_PORT)
 run:
  --bucket gs://B/PATH  GCP_BUCKET         (sync checkpoints and reports to GCS after each save;
                        a fresh VM restores from it; fetch reads from it)
  --europarl-source S   EUROPARL_SOURCE on the VM (a path there, or a URL)
  --logger L            live curves: none, tensorboard or wandb (train.py's --logger; default:
                        the params file's); the VM installs the package, and wandb needs
                        wandb login on the VM once (docs/gcp.md: Watch a run from your laptop)
  --sync-every SECONDS  how often to look for a new checkpoint to sync (default $DEFAULT_SYNC_SECONDS)
 fetch:
  --bucket gs://B/PATH  read from the bucket instead of the VM
  --dest DIR            copy into DIR/out and DIR/outputs (default: this checkout)
 delete:
  --yes                 do not ask

Missing gcloud, no authenticated account or no project: a message with the fix, exit 2.
EOF
}

# ---------------------------------------------------------------------------- messages

die() { # die MESSAGE [FIX]: an error the user can fix: one message, the fix, exit 2
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    if [[ $# -ge 2 ]]; then printf '  fix: %s\n' "$2" >&2; fi
    exit 2
}

info() { printf '%s: %s\n' "$PROG" "$*" >&2; }

shell_quote() { # the arguments as one line a shell reads back as the same words
    local out="" arg q
    local safe='^[A-Za-z0-9_./:=,@%+-]+$'
    for arg in "$@"; do
        if [[ $arg =~ $safe ]]; then
            q=$arg
        else
            q="'${arg//\'/\'\\\'\'}'"
        fi
        out="$out${out:+ }$q"
    done
    printf '%s' "$out"
}

trim() { # trim STRING: without leading and trailing white space
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

unquote() { # unquote STRING: without one pair of surrounding quotes
    local s=$1
    case $s in
        \"*\") s=${s#\"} s=${s%\"} ;;
        \'*\') s=${s#\'} s=${s%\'} ;;
    esac
    printf '%s' "$s"
}

# ------------------------------------------------------------------------------ gcloud

gc() { # gc ARGS...: run gcloud, or print it under --dry-run
    if ((DRY_RUN)); then
        printf '+ %s\n' "$(shell_quote gcloud "$@")"
        return 0
    fi
    "$GCLOUD" "$@"
}

preflight() { # gcloud installed, an account logged in, a project chosen; else exit 2
    if ((DRY_RUN)); then
        gc auth list --filter=status:ACTIVE '--format=value(account)'
        if [[ -z $PROJECT ]]; then
            gc config get-value project
            PROJECT=PROJECT_ID
        fi
        return 0
    fi
    if ! command -v "$GCLOUD" >/dev/null 2>&1; then
        die "gcloud (the Google Cloud CLI) is not installed or not on PATH" \
            "install it (https://cloud.google.com/sdk/docs/install), then run: gcloud init"
    fi
    local account
    account=$("$GCLOUD" auth list --filter=status:ACTIVE '--format=value(account)' 2>/dev/null) || account=""
    if [[ -z $(trim "$account") ]]; then
        die "no authenticated gcloud account" "run: gcloud auth login"
    fi
    if [[ -z $PROJECT ]]; then
        PROJECT=$("$GCLOUD" config get-value project 2>/dev/null) || PROJECT=""
        PROJECT=$(trim "$PROJECT")
    fi
    if [[ -z $PROJECT || $PROJECT == "(unset)" ]]; then
        die "no Google Cloud project set" \
            "run: gcloud config set project PROJECT_ID (or pass --project, export GCP_PROJECT, or write GCP_PROJECT=... into gcp.conf)"
    fi
}

vm_lookup() { # vm_lookup DRY_STATUS: sets VM_STATUS ('' when there is no such VM) and VM_ZONE
    VM_STATUS=""
    VM_ZONE=$ZONE
    if ((DRY_RUN)); then
        gc compute instances list --project="$PROJECT" --filter="name=$INSTANCE" \
            '--format=value(name,zone.basename(),status)'
        VM_STATUS=$1
        return 0
    fi
    local listing name zone status
    listing=$("$GCLOUD" compute instances list --project="$PROJECT" --filter="name=$INSTANCE" \
        '--format=value(name,zone.basename(),status)')
    while read -r name zone status; do
        [[ $name == "$INSTANCE" ]] || continue
        if [[ -z $VM_STATUS || $zone == "$ZONE" ]]; then
            VM_STATUS=$status
            VM_ZONE=$zone
        fi
    done <<<"$listing"
}

require_vm() { # require_vm [running]: the VM exists (and runs); ZONE becomes its zone
    vm_lookup RUNNING
    if [[ -z $VM_STATUS ]]; then
        die "there is no VM named $INSTANCE in project $PROJECT" \
            "create it: ./gcp_setup.sh create (or name another one with --name)"
    fi
    if [[ $VM_ZONE != "$ZONE" ]]; then
        info "$INSTANCE is in zone $VM_ZONE (not $ZONE): using it"
        ZONE=$VM_ZONE
    fi
    if [[ ${1:-} == running && $VM_STATUS != RUNNING ]]; then
        die "VM $INSTANCE is $VM_STATUS, not RUNNING" "start it: ./gcp_setup.sh start"
    fi
}

vm_ssh() { # vm_ssh REMOTE_COMMAND [-- SSH_ARGS...]
    local remote=$1
    shift
    gc compute ssh "$INSTANCE" --project="$PROJECT" --zone="$ZONE" --command="$remote" "$@"
}

in_checkout() { # in_checkout ARGS...: a remote command running this script in the VM's checkout
    printf 'cd %s && %s' "$(shell_quote "$REMOTE_DIR")" "$(shell_quote bash ./gcp_setup.sh "$@")"
}

# ------------------------------------------------------------------------ configuration

is_config_key() {
    local key
    for key in $CONFIG_KEYS; do
        [[ $1 == "$key" ]] && return 0
    done
    return 1
}

load_config() { # KEY=VALUE lines; the environment wins over the file
    local file=${opt_config:-${GCP_CONF:-}} explicit=1
    if [[ -z $file ]]; then
        file=$ROOT/gcp.conf
        explicit=0
    fi
    if [[ ! -f $file ]]; then
        if ((explicit)); then
            die "config file $file not found" "copy gcp.conf.example to $file, or drop --config/GCP_CONF"
        fi
        return 0
    fi
    local line key value n=0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=$(trim "$line")
        [[ -z $line || $line == \#* ]] && continue
        line=${line#export }
        if [[ $line != *=* ]]; then
            die "$file:$n: expected KEY=VALUE, got: $line" "see gcp.conf.example"
        fi
        key=$(trim "${line%%=*}")
        value=$(trim "${line#*=}")
        if ! is_config_key "$key"; then
            die "$file:$n: unknown key $key" "known keys: $CONFIG_KEYS"
        fi
        case $value in
            \"* | \'*) value=$(unquote "$value") ;;
            *) value=$(trim "${value%%[[:space:]]#*}") ;;
        esac
        if [[ -z ${!key:-} ]]; then
            printf -v "$key" '%s' "$value"
        fi
    done <"$file"
}

settle() { # flags > environment > config file > defaults; validate what will be used
    PROJECT=${opt_project:-${GCP_PROJECT:-}}
    ZONE=${opt_zone:-${GCP_ZONE:-$DEFAULT_ZONE}}
    INSTANCE=${opt_instance:-${GCP_INSTANCE:-$DEFAULT_INSTANCE}}
    GPU=${opt_gpu:-${GCP_GPU:-$DEFAULT_GPU}}
    GPU_COUNT=${opt_gpu_count:-${GCP_GPU_COUNT:-1}}
    MACHINE_TYPE=${opt_machine_type:-${GCP_MACHINE_TYPE:-}}
    IMAGE_FAMILY=${opt_image_family:-${GCP_IMAGE_FAMILY:-$DEFAULT_IMAGE_FAMILY}}
    IMAGE_PROJECT=${opt_image_project:-${GCP_IMAGE_PROJECT:-$DEFAULT_IMAGE_PROJECT}}
    DISK_GB=${opt_disk_size:-${GCP_DISK_SIZE:-$DEFAULT_DISK_GB}}
    DISK_GB=${DISK_GB%GB}
    BUCKET=${opt_bucket:-${GCP_BUCKET:-}}
    BUCKET=${BUCKET%/}
    REMOTE_DIR=${opt_remote_dir:-${GCP_REMOTE_DIR:-$DEFAULT_REMOTE_DIR}}
    REMOTE_DIR=${REMOTE_DIR%/}
    ENV_KIND=${opt_env:-${GCP_ENV:-$DEFAULT_ENV}}
    REPO=${opt_repo:-${GCP_REPO:-}}
    REF=${opt_ref:-${GCP_REF:-}}
    PORT=${opt_port:-$DEFAULT_LAB_PORT}
    SYNC_SECONDS=${opt_sync_every:-$DEFAULT_SYNC_SECONDS}
    SPOT=$opt_spot
    case ${GCP_SPOT:-} in
        1 | true | yes | on) SPOT=1 ;;
        "" | 0 | false | no | off) ;;
        *) die "GCP_SPOT must be 1 or 0, got '$GCP_SPOT'" "GCP_SPOT=1 for a spot VM" ;;
    esac

    local name_re='^[a-z]([-a-z0-9]*[a-z0-9])?$' int_re='^[1-9][0-9]*$'
    [[ $INSTANCE =~ $name_re ]] ||
        die "invalid VM name '$INSTANCE'" "lowercase letters, digits and dashes, starting with a letter"
    [[ $GPU_COUNT =~ $int_re ]] || die "--gpu-count must be a positive integer, got '$GPU_COUNT'"
    [[ $DISK_GB =~ $int_re ]] || die "--disk-size must be a number of GB, got '$DISK_GB'"
    [[ $PORT =~ $int_re ]] || die "--port must be a port number, got '$PORT'"
    [[ $SYNC_SECONDS =~ $int_re ]] || die "--sync-every must be a number of seconds, got '$SYNC_SECONDS'"
    case $opt_logger in
        "" | none | tensorboard | wandb) ;; # train.py's choices (backpack_nb.params.LOGGERS)
        *) die "--logger must be none, tensorboard or wandb, got '$opt_logger'" \
            "--logger tensorboard (event files in out/RUN/tensorboard) or --logger wandb (Weights & Biases)" ;;
    esac
    case $ENV_KIND in
        conda | venv) ;;
        *) die "--env must be conda or venv, got '$ENV_KIND'" "--env conda (environment.yml) or --env venv (make setup)" ;;
    esac
    if [[ -n $BUCKET && $BUCKET != gs://?* ]]; then
        die "--bucket must look like gs://BUCKET[/PATH], got '$BUCKET'" \
            "create one: gcloud storage buckets create gs://NAME --location=REGION"
    fi
    case $REMOTE_DIR in
        "" | *[[:space:]]* | *\'* | *\"*) die "--remote-dir must be a plain path, got '$REMOTE_DIR'" ;;
    esac
}

# -------------------------------------------------------------------------------- runs

params_python() { # the interpreter that reads params files: on the VM its environment
    # (PARAMS_PY, set by gcp_vm.sh); on a laptop this checkout's .venv (make setup), else python3
    if [[ -n $PARAMS_PY ]]; then
        printf '%s' "$PARAMS_PY"
    elif [[ -x $ROOT/.venv/bin/python ]]; then
        printf '%s' "$ROOT/.venv/bin/python"
    else
        printf 'python3'
    fi
}

params_get() { # params_get FILE KEY...: each key's validated value on its own line, read by
    # the library (python -m backpack_nb.params get): the defaults and checks of train.py and
    # the notebooks, not a second reading of the YAML here
    local py file=$1 rc=0 err msg
    shift
    py=$(params_python)
    err=$(mktemp "${TMPDIR:-/tmp}/backpack-nb-params.XXXXXX")
    "$py" -m backpack_nb.params get "$file" "$@" 2>"$err" || rc=$?
    msg=$(cat "$err")
    rm -f "$err"
    if ((rc == 2)); then # the library's own message: what is wrong in the file
        die "${msg#error: }"
    elif ((rc != 0)); then # no interpreter, or one without the library: its last line says which
        msg=$(grep -v '^[[:space:]]*$' <<<"$msg" | tail -n 1) || msg=""
        die "could not read ${file#"$ROOT"/} with $py: ${msg:-exit $rc}" \
            "make setup: this checkout's .venv reads params files (backpack_full and transformer_full need no Python)"
    fi
}

list_params() {
    local file names=""
    for file in "$ROOT"/params/*.yaml; do
        [[ -f $file ]] || continue
        file=${file##*/}
        names="$names${names:+, }${file%.yaml}"
    done
    printf '%s' "${names:-none}"
}

resolve_run() { # resolve_run NAME: sets RUN_NAME, PARAMS, OUT_DIR
    local name=$1 file
    name=${name%.yaml}
    name=${name#params/}
    case $name in
        backpack_full) PARAMS=train_europarl_scratch RUN_NAME=backpack_full OUT_DIR=out/backpack_full ;;
        transformer_full) PARAMS=train_europarl_transformer_baseline RUN_NAME=transformer_full OUT_DIR=out/transformer_full ;;
        *) PARAMS=$name RUN_NAME="" OUT_DIR="" ;;
    esac
    if [[ -n $opt_params ]]; then PARAMS=$opt_params; fi
    file=$ROOT/params/$PARAMS.yaml
    if [[ ! -f $file ]]; then
        die "unknown run '$1': there is no params/$PARAMS.yaml" \
            "give a params name ($(list_params)) or backpack_full / transformer_full"
    fi
    if [[ -z $RUN_NAME || -z $OUT_DIR ]]; then
        local values params_run params_out
        # --only-set: a file without run_name / out_dir runs as the params name, in out/<run_name>
        # (not in the library's default out/backpack_full, where the seed's run may live)
        values=$(params_get "$file" run_name out_dir --only-set) || exit $?
        { IFS= read -r params_run && IFS= read -r params_out; } <<<"$values" || true
        RUN_NAME=${RUN_NAME:-${params_run:-$PARAMS}}
        OUT_DIR=${OUT_DIR:-${params_out:-out/$RUN_NAME}}
    fi
    if [[ -n $opt_out_dir ]]; then OUT_DIR=$opt_out_dir; fi
    OUT_DIR=${OUT_DIR%/}
    local run_re='^[A-Za-z0-9][A-Za-z0-9_.-]*$' dir_re='^[A-Za-z0-9_][A-Za-z0-9_./-]*$'
    [[ $RUN_NAME =~ $run_re ]] || die "run name '$RUN_NAME' (params/$PARAMS.yaml) must be letters, digits, _ . -"
    if ! [[ $OUT_DIR =~ $dir_re ]] || [[ $OUT_DIR == *..* ]]; then
        die "out_dir '$OUT_DIR' must be a relative path inside the checkout (like out/$RUN_NAME)"
    fi
}

# ------------------------------------------------------------------- laptop: commands

cmd_create() {
    preflight
    local machine accel=""
    case $GPU in
        t4) machine=n1-standard-8 accel=nvidia-tesla-t4 ;;
        # G2 and A2 machine types come with their GPUs attached: no --accelerator.
        l4) machine=g2-standard-8 ;;
        a100) machine=a2-highgpu-1g ;;
        a100-80gb) machine=a2-ultragpu-1g ;;
        *) die "unknown GPU '$GPU'" "--gpu t4 (default), l4, a100 or a100-80gb" ;;
    esac
    if [[ -z $accel && $GPU_COUNT != 1 ]]; then
        die "--gpu-count applies to T4 only" "for more L4/A100 GPUs pick the machine type, e.g. --machine-type g2-standard-24 or a2-highgpu-2g"
    fi
    machine=${MACHINE_TYPE:-$machine}

    vm_lookup ""
    if [[ -n $VM_STATUS ]]; then
        info "a VM named $INSTANCE already exists (zone $VM_ZONE, $VM_STATUS): not creating another"
        if [[ $VM_STATUS != RUNNING ]]; then info "start it with: ./gcp_setup.sh start"; fi
        return 0
    fi

    local startup
    startup=$(mktemp "${TMPDIR:-/tmp}/backpack-nb-startup.XXXXXX")
    TEMP_FILES="$TEMP_FILES $startup"
    startup_script >"$startup"

    local args=(compute instances create "$INSTANCE" --project="$PROJECT" --zone="$ZONE"
        --machine-type="$machine")
    if [[ -n $accel ]]; then args+=(--accelerator="type=$accel,count=$GPU_COUNT"); fi
    # shellcheck disable=SC2054  # the commas separate gcloud's list items, not array elements
    args+=(--maintenance-policy=TERMINATE
        --image-family="$IMAGE_FAMILY" --image-project="$IMAGE_PROJECT"
        --boot-disk-size="${DISK_GB}GB" --boot-disk-type=pd-balanced
        --metadata=install-nvidia-driver=True
        --metadata-from-file="startup-script=$startup"
        --scopes=default,storage-rw)
    if ((SPOT)); then
        # STOP keeps the disk (and the checkpoints on it); `start` brings the VM back.
        args+=(--provisioning-model=SPOT --instance-termination-action=STOP)
    fi
    gc "${args[@]}"
    if ((DRY_RUN)); then
        printf '# startup-script (%s):\n' "$startup"
        sed 's/^/#   /' "$startup"
        return 0
    fi
    local kind=on-demand
    if ((SPOT)); then kind=spot; fi
    info "created $INSTANCE ($machine, $kind, zone $ZONE): it is billed from now on"
    info "next: ./gcp_setup.sh setup   (the first boot installs the NVIDIA driver: a few minutes)"
    info "when done: ./gcp_setup.sh stop (only the disk is billed) or ./gcp_setup.sh delete"
}

startup_script() { # runs as root at every boot of the VM
    cat <<'EOF'
#!/bin/bash
# Written by backpack-nb's gcp_setup.sh. At every boot (a preempted spot VM started again,
# or a stop/start), relaunch the runs that were interrupted, as the user who started them.
for marker in /home/*/.backpack-nb/active/*; do
  [ -f "$marker" ] || continue
  owner=$(stat -c %U "$marker")
  repo=$(sed -n 's/^repo=//p' "$marker")
  run=${marker##*/}
  [ -f "$repo/gcp_setup.sh" ] || continue
  echo "backpack-nb: resuming $run for $owner in $repo"
  sudo -u "$owner" -H bash -lc "$(printf 'cd %q && bash ./gcp_setup.sh vm-resume %q' "$repo" "$run")" ||
    echo "backpack-nb: could not resume $run"
done
EOF
}

make_tarball() { # make_tarball FILE: the checkout's files (git: tracked + untracked not ignored)
    local out=$1
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (
            cd "$ROOT"
            git ls-files -z --cached --others --exclude-standard |
                while IFS= read -r -d '' f; do
                    if [[ -e $f ]]; then printf '%s\0' "$f"; fi
                done |
                COPYFILE_DISABLE=1 tar --null -T - -czf "$out"
        )
    else
        (cd "$ROOT" && COPYFILE_DISABLE=1 tar -czf "$out" --exclude=./.git --exclude=./.venv \
            --exclude=./data --exclude=./out --exclude=./outputs --exclude=./.cache .)
    fi
}

cmd_setup() {
    preflight
    require_vm running
    local remote
    if [[ -n $REPO ]]; then
        local dir
        dir=$(shell_quote "$REMOTE_DIR")
        if [[ -n $REF ]]; then
            remote="if [ -d $dir/.git ]; then git -C $dir fetch --quiet && git -C $dir checkout --quiet $(shell_quote "$REF") && git -C $dir pull --quiet --ff-only; else git clone --quiet --branch $(shell_quote "$REF") $(shell_quote "$REPO") $dir; fi"
        else
            remote="if [ -d $dir/.git ]; then git -C $dir pull --quiet --ff-only; else git clone --quiet $(shell_quote "$REPO") $dir; fi"
        fi
    else
        local tarball=backpack-nb-src.tar.gz local_tar
        if ((DRY_RUN)); then
            local_tar=${TMPDIR:-/tmp}/$tarball
            info "(dry run) would pack this checkout into $local_tar"
        else
            local_tar=$(mktemp "${TMPDIR:-/tmp}/backpack-nb-src.XXXXXX")
            TEMP_FILES="$TEMP_FILES $local_tar"
            make_tarball "$local_tar"
        fi
        gc compute scp --project="$PROJECT" --zone="$ZONE" "$local_tar" "$INSTANCE:$tarball"
        remote="mkdir -p $(shell_quote "$REMOTE_DIR") && tar -xzf $tarball -C $(shell_quote "$REMOTE_DIR") && rm -f $tarball"
    fi
    if ((opt_code_only)); then
        vm_ssh "$remote"
        info "code updated in ~/$REMOTE_DIR on $INSTANCE"
        return 0
    fi
    vm_ssh "$remote && $(in_checkout vm-setup --env "$ENV_KIND")"
    info "next: ./gcp_setup.sh run backpack_full   (or connect --lab to explore first)"
}

cmd_connect() {
    preflight
    require_vm running
    if ((opt_lab)); then
        info "JupyterLab: open the URL printed below on this laptop (the port is forwarded); exit the shell to close"
        vm_ssh "$(in_checkout vm-lab --port "$PORT"); exec bash -l" -- -t -L "$PORT:localhost:$PORT"
    else
        gc compute ssh "$INSTANCE" --project="$PROJECT" --zone="$ZONE"
    fi
}

cmd_run() {
    resolve_run "$RUN_ARG"
    preflight
    require_vm running
    local args=(vm-run "$RUN_NAME" --params "$PARAMS" --out-dir "$OUT_DIR" --sync-every "$SYNC_SECONDS")
    if [[ -n $BUCKET ]]; then args+=(--bucket "$BUCKET"); fi
    if [[ -n $opt_europarl_source ]]; then args+=(--europarl-source "$opt_europarl_source"); fi
    if [[ -n $opt_logger ]]; then args+=(--logger "$opt_logger"); fi
    vm_ssh "$(in_checkout "${args[@]}")"
    info "follow it: ./gcp_setup.sh status $RUN_NAME   (or connect, then: tmux attach -t bnb-$RUN_NAME)"
    info "the VM is billed while it runs: stop or delete it when the run is done and fetched"
}

cmd_status() {
    local args=(vm-status)
    if [[ -n $RUN_ARG ]]; then
        resolve_run "$RUN_ARG"
        args+=("$RUN_NAME")
    fi
    preflight
    vm_lookup RUNNING
    if [[ -z $VM_STATUS ]]; then
        echo "no VM named $INSTANCE in project $PROJECT (./gcp_setup.sh create)"
        return 0
    fi
    ZONE=$VM_ZONE
    echo "VM $INSTANCE (zone $ZONE): $VM_STATUS"
    if [[ $VM_STATUS != RUNNING ]]; then
        echo "  not running; ./gcp_setup.sh start resumes interrupted runs (a stopped VM bills only its disk)"
        return 0
    fi
    vm_ssh "$(in_checkout "${args[@]}")"
}

cmd_fetch() {
    resolve_run "$RUN_ARG"
    preflight
    local dest=${opt_dest:-$ROOT}
    dest=${dest%/}
    local parent=${OUT_DIR%/*}
    if [[ $parent == "$OUT_DIR" ]]; then parent=.; fi
    if ((!DRY_RUN)); then mkdir -p "$dest/$parent" "$dest/outputs"; fi
    if [[ -n $BUCKET ]]; then
        gc storage rsync --recursive "$BUCKET/$OUT_DIR" "$dest/$OUT_DIR"
        if ! gc storage rsync --recursive "$BUCKET/outputs/$RUN_NAME" "$dest/outputs/$RUN_NAME"; then
            info "no reports in $BUCKET/outputs/$RUN_NAME yet (the pipeline writes them after training)"
        fi
    else
        require_vm running
        gc compute scp --recurse --project="$PROJECT" --zone="$ZONE" \
            "$INSTANCE:$REMOTE_DIR/$OUT_DIR" "$dest/$parent/"
        if ! gc compute scp --recurse --project="$PROJECT" --zone="$ZONE" \
            "$INSTANCE:$REMOTE_DIR/outputs/$RUN_NAME" "$dest/outputs/"; then
            info "no reports in outputs/$RUN_NAME on the VM yet (the pipeline writes them after training)"
        fi
    fi
    info "fetched $RUN_NAME into $dest/$OUT_DIR and $dest/outputs/$RUN_NAME"
}

cmd_cancel() {
    resolve_run "$RUN_ARG"
    preflight
    require_vm running
    vm_ssh "$(in_checkout vm-cancel "$RUN_NAME")"
}

cmd_stop() {
    preflight
    require_vm
    gc compute instances stop "$INSTANCE" --project="$PROJECT" --zone="$ZONE"
    info "stopped: no more GPU/CPU charges; the disk is billed until ./gcp_setup.sh delete"
    info "./gcp_setup.sh start brings it back, and interrupted runs resume by themselves"
}

cmd_start() {
    preflight
    require_vm
    gc compute instances start "$INSTANCE" --project="$PROJECT" --zone="$ZONE"
    info "started (billed again): interrupted runs resume by themselves; ./gcp_setup.sh status"
}

cmd_delete() {
    preflight
    vm_lookup RUNNING
    if [[ -z $VM_STATUS ]]; then
        info "there is no VM named $INSTANCE in project $PROJECT: nothing to delete"
        return 0
    fi
    ZONE=$VM_ZONE
    if ((!opt_yes && !DRY_RUN)); then
        printf 'Delete VM %s (zone %s, project %s) and its disk? Checkpoints and reports not\nfetched (or synced to a bucket) are lost. Type yes to delete: ' \
            "$INSTANCE" "$ZONE" "$PROJECT" >&2
        local answer=""
        read -r answer || true
        if [[ $answer != yes ]]; then
            info "not deleted"
            exit 1
        fi
    fi
    gc compute instances delete "$INSTANCE" --project="$PROJECT" --zone="$ZONE" --quiet
    info "deleted $INSTANCE (a bucket, if you used one, is kept: gcloud storage rm -r gs://... to empty it)"
}

# ------------------------------------------------------------------------------- main

DRY_RUN=0 opt_yes=0 opt_spot=0 opt_lab=0 opt_foreground=0 opt_code_only=0
opt_project="" opt_zone="" opt_instance="" opt_config="" opt_gpu="" opt_gpu_count=""
opt_machine_type="" opt_image_family="" opt_image_project="" opt_disk_size="" opt_bucket=""
opt_remote_dir="" opt_env="" opt_repo="" opt_ref="" opt_port="" opt_europarl_source=""
opt_dest="" opt_params="" opt_out_dir="" opt_python="" opt_sync_every="" opt_logger=""
CMD="" RUN_ARG="" TEMP_FILES="" PARAMS_PY=""

set_opt() { # set_opt FLAG VALUE
    case $1 in
        --project) opt_project=$2 ;;
        --zone) opt_zone=$2 ;;
        --name | --instance) opt_instance=$2 ;;
        --config) opt_config=$2 ;;
        --gpu) opt_gpu=$2 ;;
        --gpu-count) opt_gpu_count=$2 ;;
        --machine-type) opt_machine_type=$2 ;;
        --image-family) opt_image_family=$2 ;;
        --image-project) opt_image_project=$2 ;;
        --disk-size) opt_disk_size=$2 ;;
        --bucket) opt_bucket=$2 ;;
        --remote-dir) opt_remote_dir=$2 ;;
        --env) opt_env=$2 ;;
        --repo) opt_repo=$2 ;;
        --ref) opt_ref=$2 ;;
        --port) opt_port=$2 ;;
        --europarl-source) opt_europarl_source=$2 ;;
        --logger) opt_logger=$2 ;;
        --dest) opt_dest=$2 ;;
        --params) opt_params=$2 ;;
        --out-dir) opt_out_dir=$2 ;;
        --python) opt_python=$2 ;;
        --sync-every) opt_sync_every=$2 ;;
        *) die "unknown option $1" "./gcp_setup.sh --help lists the options" ;;
    esac
}

takes_value() {
    case $1 in
        --project | --zone | --name | --instance | --config | --gpu | --gpu-count | --machine-type | \
            --image-family | --image-project | --disk-size | --bucket | --remote-dir | --env | --repo | \
            --ref | --port | --europarl-source | --dest | --params | --out-dir | --python | --sync-every | \
            --logger)
            return 0
            ;;
    esac
    return 1
}

parse_args() {
    local positional=()
    while (($#)); do
        case $1 in
            -h | --help)
                usage
                exit 0
                ;;
            --dry-run) DRY_RUN=1 ;;
            -y | --yes) opt_yes=1 ;;
            --spot | --preemptible) opt_spot=1 ;;
            --lab) opt_lab=1 ;;
            --foreground) opt_foreground=1 ;;
            --code-only) opt_code_only=1 ;;
            --*=*) set_opt "${1%%=*}" "${1#*=}" ;;
            -*)
                takes_value "$1" || die "unknown option $1" "./gcp_setup.sh --help lists the options"
                (($# >= 2)) || die "$1 needs a value"
                set_opt "$1" "$2"
                shift
                ;;
            *) positional+=("$1") ;;
        esac
        shift
    done
    if ((${#positional[@]} > 0)); then CMD=${positional[0]}; fi
    if ((${#positional[@]} > 1)); then RUN_ARG=${positional[1]}; fi
    if ((${#positional[@]} > 2)); then die "too many arguments: ${positional[*]}" "./gcp_setup.sh --help"; fi
}

only_for() { # only_for FLAG VALUE COMMAND...: a flag given to a command that ignores it is an error
    local flag=$1 value=$2 c
    shift 2
    [[ -z $value || $value == 0 ]] && return 0
    for c in "$@"; do [[ $CMD == "$c" ]] && return 0; done
    die "$flag does not apply to '$CMD'" "it is an option of: $*"
}

check_command_line() {
    case $CMD in
        run | fetch | cancel | vm-run | vm-job | vm-resume | vm-cancel)
            [[ -n $RUN_ARG ]] || die "$CMD needs a RUN_NAME" "e.g. ./gcp_setup.sh $CMD backpack_full (or a params name: $(list_params))"
            ;;
        status | vm-status) ;;
        *) [[ -z $RUN_ARG ]] || die "$CMD takes no RUN_NAME (got '$RUN_ARG')" "./gcp_setup.sh --help" ;;
    esac
    only_for --gpu "$opt_gpu" create
    only_for --gpu-count "$opt_gpu_count" create
    only_for --machine-type "$opt_machine_type" create
    only_for --image-family "$opt_image_family" create
    only_for --image-project "$opt_image_project" create
    only_for --disk-size "$opt_disk_size" create
    only_for --spot "$opt_spot" create
    only_for --env "$opt_env" setup vm-setup
    only_for --repo "$opt_repo" setup
    only_for --ref "$opt_ref" setup
    only_for --code-only "$opt_code_only" setup
    only_for --lab "$opt_lab" connect
    only_for --port "$opt_port" connect vm-lab
    only_for --bucket "$opt_bucket" run fetch vm-run
    only_for --europarl-source "$opt_europarl_source" run vm-run
    only_for --logger "$opt_logger" run vm-run
    only_for --sync-every "$opt_sync_every" run vm-run
    only_for --dest "$opt_dest" fetch
    only_for --yes "$opt_yes" delete
    only_for --params "$opt_params" vm-run
    only_for --out-dir "$opt_out_dir" vm-run
    only_for --python "$opt_python" vm-run vm-lab
    only_for --foreground "$opt_foreground" vm-run vm-resume
}

load_vm_side() { # the vm-* commands live in gcp_vm.sh, beside this file in every checkout
    local file=$ROOT/gcp_vm.sh
    if [[ ! -f $file ]]; then
        die "$CMD runs on the VM, from gcp_vm.sh, and $file is missing" \
            "copy the whole checkout to the VM again: on your laptop, ./gcp_setup.sh setup --code-only"
    fi
    # shellcheck source-path=SCRIPTDIR source=gcp_vm.sh
    source "$file"
}

cleanup_temp_files() {
    local f
    for f in $TEMP_FILES; do rm -f "$f"; done
}

main() {
    parse_args "$@"
    if [[ -z $CMD ]]; then
        usage >&2
        exit 2
    fi
    check_command_line
    case $CMD in vm-*) ;; *) load_config ;; esac
    settle
    trap cleanup_temp_files EXIT
    case $CMD in
        create) cmd_create ;;
        setup) cmd_setup ;;
        connect) cmd_connect ;;
        run) cmd_run ;;
        status) cmd_status ;;
        fetch) cmd_fetch ;;
        cancel) cmd_cancel ;;
        stop) cmd_stop ;;
        start) cmd_start ;;
        delete) cmd_delete ;;
        help) usage ;;
        vm-setup | vm-run | vm-resume | vm-job | vm-status | vm-cancel | vm-lab)
            # On the VM (over ssh, or the startup script's vm-resume at every boot).
            load_vm_side
            "cmd_${CMD//-/_}"
            ;;
        *) die "unknown command '$CMD'" "one of: $LOCAL_COMMANDS (./gcp_setup.sh --help)" ;;
    esac
}

main "$@"
