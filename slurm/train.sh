#!/usr/bin/env bash
# Train on a Slurm cluster: one `accelerate launch` per node, every count derived from Slurm.
#
#   sbatch [--nodes N | --nodes MIN-MAX] [--gpus-per-node G] slurm/train.sh CONFIG [key=value ...]
#
# Every count comes from what Slurm gave this attempt: with a node range a requeued job may
# start on fewer or more nodes, and the run resumes at that world size where its checkpoint
# allows (launcher says so in one line, or refuses in one).
#
# Environment overrides (all optional):
#   ACCELERATE_CONFIG  accelerate YAML (default configs/accelerate/multi_node.yaml; its
#                      per-node values are overridden below, so it fits 1..N nodes, GPU or CPU)
#   GPUS_PER_NODE      processes per node (default: the GPUs the job asked for per node, see
#                      NODE_GPUS below; 1 on CPU nodes)
#   OUTPUT_DIR         parent of the run directory (default: the config's output_dir)
#   RUN_NAME           run directory name (default: as launcher decides it: the config's run_name,
#                      a run_name=... override, else the config file's stem), kept across requeues
#   MAIN_PORT          rendezvous port on the head node (default: 20000 + job id mod 12000, below
#                      Linux's ephemeral ports, 32768 and up, which outgoing connections take)
#   PYTHON             interpreter with launcher installed (default: python3 on PATH)
#   CPUS_PER_NODE      CPUs for the node's ranks (default: every CPU the job has on a node, the
#                      fewest of its nodes where they differ; the job asks for whole nodes with
#                      --exclusive, so collation workers and DeepSpeed's CPU Adam are not
#                      starved); each rank gets CPUS_PER_NODE / ranks per node threads
#   SIGNAL_LEAD_S      seconds before the time limit at which every rank is asked to checkpoint and
#                      stop (default 600: a large checkpoint needs minutes); `launcher plan` shows it.
#                      Lower than 600, also submit with --signal=B:USR1@<s>: the header's USR1 comes
#                      600 s before the limit whatever this says
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT
#                      seconds the node's launch waits after forwarding a SIGTERM before it SIGKILLs
#                      the ranks, as torchrun would (default here 600; torch's own is 30, too short
#                      for a big step plus checkpoint)
#
# Preemption: SIGNAL_LEAD_S before the time limit this script asks every rank to stop (its own
# timer, from the job's end time; Slurm's --signal=B:USR1@600 below is the fallback when the end
# time cannot be read); `scancel --signal=USR1 --batch JOB` does the same by hand. The trap creates LAUNCHER_STOP_FILE
# (signalling srun instead would cancel the job step, killing the ranks mid-step); rank 0
# sees it at the end of a step, the ranks agree on that step, checkpoint it and exit cleanly; then
# the job requeues itself (when launcher said it stopped early: LAUNCHER_STOP_FILE.stopped) and
# the requeued job resumes from that checkpoint into the same MLflow run. A stop before the first
# step writes no checkpoint (the requeued job starts again in place); one asked near the time
# limit (this script's timer, or Slurm's --signal) is not requeued (start-up takes longer than
# the job has before the warning).
# A SIGTERM that reaches srun itself (the time limit, `scancel --full`, a preemption that signals
# the batch step) makes srun SIGKILL the ranks at once ("srun: forcing job termination"; tested),
# so the stop file is the grace that counts: at preemption, ask the admins for a GraceTime that
# fits a step plus a checkpoint and PreemptParameters=send_user_signal, with which Slurm sends
# this header's B:USR1 instead of the SIGTERM when the grace starts.
# A SIGTERM sent to the job step alone (`scancel --signal=TERM JOB`) reaches the node's launch and
# the ranks, not srun: they checkpoint the step in progress and exit.
#SBATCH --job-name=launcher
#SBATCH --nodes=1
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch [--nodes N | --nodes MIN-MAX] [--gpus-per-node G] slurm/train.sh CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
# Counts and seconds from the environment: a word or a unit (GPUS_PER_NODE=eight,
# SIGNAL_LEAD_S=10m) was a bash error some lines on, or quietly read as 1.
for name in GPUS_PER_NODE CPUS_PER_NODE SIGNAL_LEAD_S MAIN_PORT TORCH_ELASTIC_SHUTDOWN_TIMEOUT; do
    value=${!name:-}
    if [ -n "$value" ] && ! [[ "$value" =~ ^(0|[1-9][0-9]*)$ ]]; then
        echo "error: $name: expected a whole number; got '$value'" >&2
        exit 2
    fi
done
for name in GPUS_PER_NODE CPUS_PER_NODE; do
    if [ -n "${!name:-}" ] && [ "${!name}" -lt 1 ]; then
        echo "error: $name: must be 1 or more; got ${!name}" >&2
        exit 2
    fi
done
if [ -n "${MAIN_PORT:-}" ] && { [ "$MAIN_PORT" -lt 1 ] || [ "$MAIN_PORT" -gt 65535 ]; }; then
    echo "error: MAIN_PORT: expected a port in 1..65535; got $MAIN_PORT" >&2
    exit 2
fi

PYTHON=${PYTHON:-python3}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
# Said here by the name the user set: the node's launch named it --accelerate-config, a flag
# of `launcher train` this job never took.
if [ ! -f "$ACCELERATE_CONFIG" ]; then
    where=" (relative to $PWD, where the job starts)"
    [[ $ACCELERATE_CONFIG != /* ]] || where=""
    what="no such file"
    [ ! -e "$ACCELERATE_CONFIG" ] || what="not a file"
    echo "error: ACCELERATE_CONFIG: $what: $ACCELERATE_CONFIG$where" >&2
    exit 2
fi
NNODES=${SLURM_NNODES:-1}
# The GPUs the job has on each node. SLURM_GPUS_ON_NODE is set on a node with GPUs, but under
# the header's --exclusive it counts every GPU of the node, while a job step gets only what the
# job asked for: --gpus-per-node ("3", "a100:3", "a100:2,v100:1" in SLURM_GPUS_PER_NODE),
# --gpus-per-task x --ntasks-per-node, or --gpus over the nodes (SLURM_GPUS, when it divides
# evenly); those first (4 ranks on a step of 3 GPUs, seen on Slurm 22.05). A CPU node runs one
# process.
gpu_count() {  # "a100:2,v100:1" -> 3; nothing when it cannot be read
    local total=0 part count
    local -a parts=()
    IFS=, read -ra parts <<< "$1" || true
    for part in "${parts[@]}"; do
        count=${part##*:}
        [[ $count =~ ^[1-9][0-9]*$ ]] || return 0
        total=$((total + count))
    done
    if [ "$total" -ge 1 ]; then echo "$total"; fi
}
NODE_GPUS=$(gpu_count "${SLURM_GPUS_PER_NODE:-}")
TASK_GPUS=$(gpu_count "${SLURM_GPUS_PER_TASK:-}")
if [ -z "$NODE_GPUS" ] && [ -n "$TASK_GPUS" ] && [[ ${SLURM_NTASKS_PER_NODE:-} =~ ^[1-9][0-9]*$ ]]; then
    NODE_GPUS=$((TASK_GPUS * SLURM_NTASKS_PER_NODE))
fi
if [ -z "$NODE_GPUS" ]; then
    ALL_GPUS=$(gpu_count "${SLURM_GPUS:-}")
    if [ -n "$ALL_GPUS" ] && [ $((ALL_GPUS % NNODES)) = 0 ]; then
        NODE_GPUS=$((ALL_GPUS / NNODES))
    fi
fi
if [ -z "$NODE_GPUS" ]; then
    NODE_GPUS=${SLURM_GPUS_ON_NODE:-0}
    [[ $NODE_GPUS =~ ^(0|[1-9][0-9]*)$ ]] || NODE_GPUS=0
fi
if [ -n "${GPUS_PER_NODE:-}" ] && [ "$NODE_GPUS" -ge 1 ] && [ "$GPUS_PER_NODE" -gt "$NODE_GPUS" ]; then
    # (its ranks shared the GPUs, two or more to one, without a word)
    echo "error: GPUS_PER_NODE: $GPUS_PER_NODE ranks per node, but the job has $NODE_GPUS GPU(s) per node;" \
         "ask for more GPUs or lower GPUS_PER_NODE" >&2
    exit 2
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-$NODE_GPUS}
[ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1  # no GPUs (SLURM_GPUS_ON_NODE=0 on a CPU node of a GPU cluster)
NUM_PROCESSES=$((NNODES * GPUS_PER_NODE))
# The fewest CPUs the job has on any of its nodes (SLURM_JOB_CPUS_PER_NODE: "72(x2),36"): srun
# gives every node's task the same count, and a node with fewer than the batch node's
# SLURM_CPUS_ON_NODE refused the step ("More processors requested than permitted").
JOB_CPUS=""
CPU_COUNTS=()
IFS=, read -ra CPU_COUNTS <<< "${SLURM_JOB_CPUS_PER_NODE:-}" || true
for part in "${CPU_COUNTS[@]}"; do
    count=${part%%(*}
    if ! [[ $count =~ ^[1-9][0-9]*$ ]]; then
        JOB_CPUS=""
        break
    fi
    if [ -z "$JOB_CPUS" ] || [ "$count" -lt "$JOB_CPUS" ]; then
        JOB_CPUS=$count
    fi
done
CPUS_PER_NODE=${CPUS_PER_NODE:-${JOB_CPUS:-${SLURM_CPUS_ON_NODE:-$GPUS_PER_NODE}}}
THREADS_PER_RANK=$((CPUS_PER_NODE / GPUS_PER_NODE))
[ "$THREADS_PER_RANK" -ge 1 ] || THREADS_PER_RANK=1
# torchrun would set 1 thread per rank whenever a node runs several; set it from the CPUs instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS_PER_RANK}
SIGNAL_LEAD_S=${SIGNAL_LEAD_S:-600}
# After a SIGTERM to the job step the node's launch gives the ranks this long to checkpoint
# before it SIGKILLs them (torch's default is 30 s); Slurm's GraceTime / KillWait then decide,
# unless the SIGTERM also reached srun, which SIGKILLs the ranks at once (see the header).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
# sed reads the whole list: `head -n1` may exit first, and scontrol's SIGPIPE under pipefail
# ended the job without a word.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
TRAIN_ARGS=("$CONFIG")
# Only when asked: a --run-name here would override the config's run_name and a run_name=...
# override (a sweep's jobs all wrote into one run directory). launcher's own default is the
# same on every requeue.
if [ -n "${RUN_NAME:-}" ]; then
    TRAIN_ARGS+=(--run-name "$RUN_NAME")
fi
if [ -n "${OUTPUT_DIR:-}" ]; then
    TRAIN_ARGS+=(--output-dir "$OUTPUT_DIR")
fi
TRAIN_ARGS+=("$@")

echo "launcher: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} node(s) x ${GPUS_PER_NODE}" \
     "= ${NUM_PROCESSES} process(es), head ${HEAD_NODE}:${MAIN_PORT}, ${ACCELERATE_CONFIG}"
echo "launcher: ${CPUS_PER_NODE} CPUs per node, ${OMP_NUM_THREADS} threads per rank;" \
     "stop warning ${SIGNAL_LEAD_S} s before the time limit"

# $SLURM_NODEID is escaped: it must expand on each node inside srun, not here (where it is 0).
# SIGUSR1 is ignored by accelerate/torchrun, which have no handler for it (a USR1 sent to the
# job step, `scancel --signal=USR1 JOB` without --batch, killed the launcher and then every rank
# mid-step); the ranks install their own handler (launcher.preemption) and checkpoint.
# launcher.launch is `accelerate launch` that forwards a SIGTERM itself and waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT as torchrun does (accelerate's one-process launcher killed its
# process after 5 s), then exits as the ranks did: 0 after their checkpoint (torchrun's own
# handling exited 143, and a clean stop was not requeued).
# Every word is quoted for the node's shell (printf %q): a $ or ` in a path ran there.
LAUNCH="trap \"\" USR1; exec $(printf '%q' "$PYTHON") -m launcher.launch --config_file $(printf '%q' "$ACCELERATE_CONFIG") \
    --num_machines $NNODES --num_processes $NUM_PROCESSES --machine_rank \$SLURM_NODEID \
    --main_process_ip $HEAD_NODE --main_process_port $MAIN_PORT \
    -m launcher train $(printf '%q ' "${TRAIN_ARGS[@]}")"

# One task per node, stated in full here rather than in the header: an allocation's
# --ntasks-per-node=1 makes Slurm count the job's tasks from the minimum of a node range
# (`--nodes 1-2` then always gets 1 node; seen on Slurm 22.05).
# A job's GPU request reaches srun in the environment: asked for per task (--gpus-per-task,
# --ntasks-per-gpu), our one task per node saw 1 of the node's GPUs, or srun refused
# --ntasks-per-node (both seen on Slurm 22.05); a binding (--gpu-bind; Slurm 23.11 binds
# --gpus-per-task itself) would limit the task to one. The node's task gets NODE_GPUS, stated
# here, and none of the job's GPU variables are passed on.
SRUN=(env -u SLURM_GPUS_PER_TASK -u SLURM_NTASKS_PER_GPU -u SLURM_NTASKS_PER_TRES -u SLURM_TRES_PER_TASK
      -u SLURM_GPU_BIND -u SLURM_TRES_BIND -u SLURM_GPUS -u SLURM_GPUS_PER_NODE -u SLURM_GPUS_PER_SOCKET
      -u SLURM_CPUS_PER_GPU  # (--cpus-per-gpu and the --cpus-per-task below exclude each other)
      srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE")
if [ "$NODE_GPUS" -ge 1 ]; then
    SRUN+=(--gpus-per-task="$NODE_GPUS")
fi
if [ "${LAUNCHER_DRY_RUN:-0}" = 1 ]; then  # print what would run (tests check the arithmetic)
    # (sbatch passes the submitting shell's environment on: say why a job did not train)
    echo "launcher: LAUNCHER_DRY_RUN=1: the launch below is printed, not run" >&2
    # Shown as bash reads it back: a quote in an argument (RUN_NAME=o\'brien) broke the '...' form.
    shown="'$LAUNCH'"
    [[ $LAUNCH != *"'"* ]] || shown=$(printf '%q' "$LAUNCH")
    echo "${SRUN[*]} bash -c $shown"
    exit 0
fi

# Rank 0 looks for the stop file after every step, and the ranks stop together at that step. It lives on the shared file system beside the runs (node-local /tmp may be private
# to a container), in a directory private to this job (mktemp -d: 0700), so nobody else who
# can write to the output or working directory can stop the job by creating it.
STOP_DIR=""
if [ -z "${LAUNCHER_STOP_FILE:-}" ]; then
    STOP_PARENT=${OUTPUT_DIR:-$PWD}
    mkdir -p "$STOP_PARENT"
    STOP_DIR=$(mktemp -d "$STOP_PARENT/.launcher-stop-${SLURM_JOB_ID}.XXXXXX")
    LAUNCHER_STOP_FILE=$STOP_DIR/stop
fi
export LAUNCHER_STOP_FILE
rm -f "$LAUNCHER_STOP_FILE" "$LAUNCHER_STOP_FILE.stopped"  # a requeued job starts without the previous attempt's request
PREEMPTED=0
NEAR_LIMIT=0
END_EPOCH=""
on_warning() {  # $1: the signal's name
    PREEMPTED=1
    # Slurm's --signal=B:USR1 may come before this script's timer (up to a minute early, or
    # at 600 s with a lower SIGNAL_LEAD_S): the time left, not which came first, says whether
    # it is the time-limit warning (a requeue after a stop before the first step went round
    # for ever).
    local lead=$((SIGNAL_LEAD_S > 600 ? SIGNAL_LEAD_S : 600))
    if [ -n "$END_EPOCH" ] && [ $((END_EPOCH - $(date +%s))) -le $((lead + 120)) ]; then
        NEAR_LIMIT=1
    fi
    # Named as what it is: a SIGTERM (scancel, a preemption) or a USR1 far from the end time is
    # not the time-limit warning.
    local what="a stop request"  # (a SIGTERM always: scancel, a preemption)
    if [ "$1" = USR1 ] && [ "$NEAR_LIMIT" = 1 ]; then
        what="the time-limit warning"
    elif [ "$1" = USR1 ] && [ -z "$END_EPOCH" ]; then  # Slurm's --signal is the warning then, or one sent by hand
        what="the time-limit warning, or a stop request"
    fi
    echo "launcher: caught SIG$1 ($what); asking every rank to checkpoint and stop"
    # Not under `set -e`: a touch that fails (a full or stale shared file system) ended this
    # script with srun still running, and Slurm then killed the ranks mid-step.
    touch "$LAUNCHER_STOP_FILE" || echo "launcher: warning: cannot create the stop file $LAUNCHER_STOP_FILE;" \
        "the ranks were not asked to stop" >&2
}
trap 'on_warning USR1' USR1
trap 'on_warning TERM' TERM

# Our own timer: SIGNAL_LEAD_S before the job's end time (Slurm's --signal lead is fixed at submission).
# The end time in ISO form whatever the user's SLURM_TIME_FORMAT; anything else (squeue failed or
# timed out: `date -d ""` is today's midnight, which stopped the job at once; UNLIMITED) leaves
# the timer off and Slurm's --signal as the warning.
END_TIME=$(SLURM_TIME_FORMAT=standard squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null || true)
if [[ $END_TIME =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]+$ ]]; then
    END_EPOCH=$(date -d "$END_TIME" +%s 2>/dev/null || echo "")
fi
TIMER_PID=""
if [ -n "$END_EPOCH" ] && [ "$END_EPOCH" -gt "$(date +%s)" ]; then
    LEFT_S=$((END_EPOCH - $(date +%s)))
    WAIT_S=$((LEFT_S - SIGNAL_LEAD_S))
    if [ "$WAIT_S" -lt "$SIGNAL_LEAD_S" ]; then
        echo "launcher: warning: ${LEFT_S} s to the time limit leave less training than SIGNAL_LEAD_S" \
             "(${SIGNAL_LEAD_S} s): each attempt stops after a few steps and requeues (not when it stops before the" \
             "first step); ask for more --time," \
             "or lower SIGNAL_LEAD_S and --signal=B:USR1@<s> together" >&2
    fi
    [ "$WAIT_S" -ge 0 ] || WAIT_S=0
    # $$ is this script even inside the subshell; ending the subshell ends its sleep too.
    ( sleep "$WAIT_S" & SLEEPER=$!; trap 'kill $SLEEPER 2>/dev/null; exit 0' TERM
      wait "$SLEEPER" && echo "launcher: ${SIGNAL_LEAD_S} s to the time limit" && touch "$LAUNCHER_STOP_FILE.timer" \
          && kill -USR1 $$ ) &
    TIMER_PID=$!
fi

"${SRUN[@]}" bash -c "$LAUNCH" &
SRUN_PID=$!
status=0
# `wait` returns early when a trapped signal arrives; wait again until srun has really ended,
# then once more for its own status (srun may end between an interrupted wait and the check,
# which left 128 + the signal as the job's status: a clean stop was not requeued).
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID" || true
done
wait "$SRUN_PID" && status=0 || status=$?

[ -z "$TIMER_PID" ] || kill "$TIMER_PID" 2>/dev/null || true
# launcher writes STOP_FILE.stopped when the run stopped early to a request, with what asked
# (a signal's name, or "stop file ..."): a warning that came after the last step (during the
# final evaluation or export) leaves a finished run.
STOPPED=0
WHY=""
if [ -e "$LAUNCHER_STOP_FILE.stopped" ]; then
    STOPPED=1
    WHY=$(head -c 200 "$LAUNCHER_STOP_FILE.stopped" 2>/dev/null | head -n 1 || true)
fi
TIMER_FIRED=$NEAR_LIMIT
[ ! -e "$LAUNCHER_STOP_FILE.timer" ] || TIMER_FIRED=1
rm -f "$LAUNCHER_STOP_FILE" "$LAUNCHER_STOP_FILE.stopped" "$LAUNCHER_STOP_FILE.timer"
[ -z "$STOP_DIR" ] || rmdir "$STOP_DIR" 2>/dev/null || true
# Any early stop requeues, whoever signalled the ranks (`scancel --signal=USR1 JOB` reaches them,
# not this script; a preemption may signal only the steps; a signal reaches rank 0 after another
# rank): an unfinished run goes on. `scancel JOB` ends a job for good.
if [ "$status" = 0 ] && [ "$STOPPED" = 0 ] && [ "$PREEMPTED" = 1 ]; then
    echo "launcher: the run ended before the stop warning took effect: nothing to requeue"
elif [ "$status" = 0 ] && [ "$STOPPED" = 1 ] && [ "$TIMER_FIRED" = 1 ] && [[ $WHY == *"before the first step"* ]]; then
    # Each requeued attempt would get the same time and start up as long: it would never train.
    echo "launcher: the time-limit warning (SIGNAL_LEAD_S=${SIGNAL_LEAD_S} s before the limit) came before the" \
         "first step: start-up took longer than this job had before it; not requeued (every attempt would do" \
         "the same): ask for more --time, or lower SIGNAL_LEAD_S and --signal=B:USR1@<s> together" >&2
    exit 1
elif [ "$status" = 0 ] && [ "$STOPPED" = 1 ]; then
    echo "launcher: the run stopped early (${WHY:-a stop request}): requeueing job ${SLURM_JOB_ID}; it resumes from the checkpoint just written (before the first step: it starts again in place)"
    if ! scontrol requeue "$SLURM_JOB_ID"; then  # (under set -e it ended the job without a word)
        echo "launcher: the job cannot requeue itself (submitted with --no-requeue?); submit the same command" \
             "again to go on (from the checkpoint just written, or from step 0 in place)" >&2
        exit 1
    fi
    exit 0
fi
exit "$status"
