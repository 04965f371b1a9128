#!/usr/bin/env bash
# The toy DAG on a real SLURM cluster, built on this machine: profiles/slurm as shipped, run the way
# workflow/README.md ("Profiles") tells cluster users to. CI runs it after scripts/test.sh (.ci/run).
#
#   1. installs slurm-wlm and munge (Debian, apt-get) and the project's `slurm` extra into .venv;
#   2. configures a one-node cluster: CPUs from nproc, memory from the machine, no cgroups, no accounting
#      database (slurmdbd), so `sacct` answers "accounting storage is disabled", as on many small clusters;
#   3. starts munged (as the munge user), slurmctld and slurmd, and submits one `sbatch --wrap` job;
#      checks that `--profile profiles/slurm` does not inherit profiles/default's local memory budget;
#   4. in a fresh copy of the workflow files (like tests/test_workflow.py's workdir fixture):
#      a. the toy DAG to promotion: every job Snakemake ran is a SLURM job (its SLURM comment names its rule;
#         CPUs = the rule's threads, a memory request, the wall time of the workflow's model), and the graph is
#         promoted;
#      b. then a failing gate (tolerances 1e-12): the run fails with the gate's message on stderr, the gate's
#         SLURM job ran once (no retry), and the promoted graph is left as it was;
#      c. in another copy, a partition that does not exist: the run fails at the first submission, naming it;
#      d. in another copy, parity in segments (parity_segment_blocks=1): a SLURM job per segment, the same verdict
#         and graphs as 4a; then one tensor of one segment graph tampered: the gate names the segment and tensor;
#   5. stops the daemons it started (by PID, also on failure) and prints the timings.
#
# Needs root (apt-get, /etc/slurm, the daemons) and a machine that runs no SLURM of its own: the cluster
# config must be /etc/slurm/slurm.conf (the plugin's nested srun drops SLURM_CONF), and an existing one not
# written by this script is left alone (the script stops). Run it from anywhere: bash scripts/slurm_ci.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
SLURM_CONF_PATH=/etc/slurm/slurm.conf
MARKER="# written by gptoss scripts/slurm_ci.sh"
RUN_TIMEOUT=600 # seconds per snakemake run: a run that hangs (e.g. a status command that never answers) fails

# --- timings -----------------------------------------------------------------------------------------------
START=$EPOCHREALTIME
TIMINGS=()
STEP_NAME=""
STEP_START=$START
seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%7.1f s", b - a }'; }
end_step() { [[ -z $STEP_NAME ]] || TIMINGS+=("$(seconds_since "$STEP_START")  $STEP_NAME"); }
step() { # step NAME: close the running step, start the next one
    end_step
    STEP_NAME=$1
    STEP_START=$EPOCHREALTIME
    echo "== $1"
}
print_timings() {
    end_step
    echo "== timings"
    printf '%s\n' "${TIMINGS[@]}"
    echo "$(seconds_since "$START")  in all"
}

if [[ $(id -u) != 0 ]]; then
    echo "slurm_ci.sh: needs root (apt-get, $SLURM_CONF_PATH, starting munged/slurmctld/slurmd)" >&2
    exit 1
fi

# --- 1. packages -------------------------------------------------------------------------------------------
step "install slurm-wlm, munge (apt-get)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
echo "$(slurmctld -V), munge $(munged --version 2>&1 | awk '{print $1}')"

step "install the slurm extra into .venv"
if [[ ! -x .venv/bin/python ]]; then
    echo "slurm_ci.sh: no .venv here; run scripts/test.sh (or scripts/setup.sh) first" >&2
    exit 1
fi
pip_log=$(mktemp)
.venv/bin/pip install --quiet -c constraints.txt -e '.[slurm]' >"$pip_log" 2>&1 || { cat "$pip_log" >&2; exit 1; }
rm -f "$pip_log"
.venv/bin/pip list 2>/dev/null | grep -i '^snakemake-executor-plugin-slurm '

# --- 2. a one-node cluster ---------------------------------------------------------------------------------
step "configure and start a one-node cluster"
if [[ -e $SLURM_CONF_PATH ]] && ! grep -qxF "$MARKER" "$SLURM_CONF_PATH"; then
    echo "slurm_ci.sh: $SLURM_CONF_PATH exists and was not written by this script;" \
        "not touching this machine's SLURM" >&2
    exit 1
fi
for daemon in slurmctld slurmd; do
    if pgrep -x "$daemon" >/dev/null; then
        echo "slurm_ci.sh: a $daemon is already running on this machine; stop it first" >&2
        exit 1
    fi
done

STATE=$(mktemp -d /tmp/slurm_ci.XXXXXX) # spool directories, daemon logs, the workflow copies
chmod 755 "$STATE"
mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log"
NODE=$(hostname -s)
CPUS=$(nproc)
# Memory in MB: MemTotal, or the cgroup limit when that is lower (a container).
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
if [[ -r /sys/fs/cgroup/memory.max ]] && [[ $(cat /sys/fs/cgroup/memory.max) =~ ^[0-9]+$ ]]; then
    cgroup_mb=$(($(cat /sys/fs/cgroup/memory.max) / 1024 / 1024))
    ((cgroup_mb < MEM_MB)) && MEM_MB=$cgroup_mb
fi

cat >"$SLURM_CONF_PATH" <<EOF
$MARKER (a one-node test cluster; safe to delete)
ClusterName=gptoss-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
# No cgroups: processes tracked through /proc, no task binding or containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No accounting database: sacct reports "accounting storage is disabled".
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# CPUs and memory are both scheduled (sbatch --cpus-per-task, --mem).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Trust the node line below rather than the detected socket/core layout.
SlurmdParameters=config_overrides
ReturnToService=2
# Ended jobs stay visible to squeue for an hour (default 300 s), so the checks after a slow run still see them.
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
echo "node $NODE: $CPUS CPUs, $MEM_MB MB; state and logs in $STATE"

PIDS=() # daemons this script started, in start order
cleanup() {
    local rc=$?
    set +e
    step "stop the cluster"
    # Jobs left by a failed run, then the daemons in reverse start order.
    if ((${#PIDS[@]})) && scontrol ping >/dev/null 2>&1; then
        mapfile -t left < <(squeue -h -o %i 2>/dev/null)
        ((${#left[@]})) && scancel "${left[@]}"
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${PIDS[i]}" 2>/dev/null
        for _ in $(seq 50); do kill -0 "${PIDS[i]}" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "${PIDS[i]}" 2>/dev/null
        wait "${PIDS[i]}" 2>/dev/null
    done
    rm -f "$SLURM_CONF_PATH"
    if ((rc == 0)); then
        rm -rf "$STATE"
    else
        echo "slurm_ci.sh: failed (exit $rc); daemon logs and workflow copies kept in $STATE" >&2
        tail -n 20 "$STATE/log/slurmctld.log" >&2 2>/dev/null
    fi
    print_timings
    exit "$rc"
}
trap cleanup EXIT

# munged refuses to run as root: run it as the munge user (setpriv execs it, so $! is munged itself).
# A munged already running (a systemd service) is used as it is.
if ! munge -n >/dev/null 2>&1; then
    install -d -o munge -g munge -m 755 /run/munge
    setpriv --reuid=munge --regid=munge --init-groups -- /usr/sbin/munged --foreground >"$STATE/log/munged.out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
fi
munge -n | unmunge >/dev/null
slurmctld -D >"$STATE/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D >"$STATE/log/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
    [[ $(sinfo -h -n "$NODE" -o %T 2>/dev/null) == idle ]] && break
    sleep 0.2
done
sinfo

step "a trivial sbatch job"
hello=$(sbatch --parsable -o "$STATE/hello.out" -c 1 --mem 100 -t 1 --wrap 'srun hostname')
job_state() { squeue --states=all -h -j "$hello" -o '%T'; }
for _ in $(seq 150); do [[ $(job_state) == COMPLETED ]] && break; sleep 0.2; done # (sbatch --wait polls every 10 s)
[[ $(job_state) == COMPLETED ]] || { echo "job $hello: $(job_state)" >&2; exit 1; }
[[ $(cat "$STATE/hello.out") == "$NODE" ]] || { echo "sbatch --wrap printed: $(cat "$STATE/hello.out")" >&2; exit 1; }
echo "sbatch --wrap 'srun hostname' printed $NODE"

# --- 3. the profiles -----------------------------------------------------------------------------------------
step "profiles: --profile profiles/slurm does not inherit the local budget"
# Snakemake's own argument parsing, as `snakemake ARGS` would see it (profiles/default is loaded implicitly).
.venv/bin/python - <<'EOF'
import sys
from snakemake.cli import parse_args

def settings(*argv):
    sys.argv = ["snakemake", *argv]  # profiles/default reads the command line
    _, args = parse_args(list(argv))
    return {"executor": args.executor, "cores": args.cores, "resources": dict(args.resources or {}),
            "latency_wait": args.latency_wait}

local = settings("--cores", "4", "promote_baseline2")
assert local["executor"] in (None, "local") and "mem_mb" in local["resources"], local
for how in ("--profile", "--workflow-profile"):
    cluster = settings(how, "profiles/slurm", "promote_baseline2")
    assert cluster["executor"] == "slurm", (how, cluster)
    assert not cluster["resources"] and cluster["cores"] is None and cluster["latency_wait"] == 60, (how, cluster)
    print(f"{how} profiles/slurm: {cluster}")
print(f"local (profiles/default): {local}")
EOF

# A fresh copy of the workflow files, as in a new clone (no results/, no .snakemake/).
WORKFLOW_FILES=(Snakefile workflow config profiles environment.yml environment.post-deploy.sh)
fresh_copy() {
    local dir=$STATE/$1
    mkdir -p "$dir"
    tar -C "$REPO" --exclude=__pycache__ -cf - "${WORKFLOW_FILES[@]}" | tar -C "$dir" -xf -
    echo "$dir"
}

# snakemake_in DIR ARGS...: `snakemake ARGS`, the cluster user's command (workflow/README.md "Profiles"), run
# in DIR with the venv active; stdout and stderr to DIR/stdout.log and DIR/stderr.log. Prints the exit status.
snakemake_in() {
    local dir=$1
    shift
    (
        cd "$dir"
        # shellcheck disable=SC1091
        source "$REPO/.venv/bin/activate"
        export JAX_PLATFORMS=cpu
        timeout "$RUN_TIMEOUT" snakemake "$@" >stdout.log 2>stderr.log
    ) && echo 0 || echo $?
}

# check_run DIR passed|failed: the Snakemake log of the run in DIR against SLURM's own record of its jobs.
check_run() {
    squeue --states=all -h -o '%i|%j|%k|%T|%C|%m|%l' >"$1/squeue.txt"
    .venv/bin/python - "$1" "$2" <<'EOF'
"""Every job Snakemake ran is a SLURM job, or a local rule without a command; each SLURM job's comment names the
rule Snakemake said it submitted, its CPUs are the job's threads, it asked for memory and got the wall time its
rule's `runtime` asks for (the workflow's model, gptoss.resources, on the toy; a profile's set-resources would
override it); no job was submitted twice (no retries). A passed run: every SLURM job COMPLETED. A failed run:
exactly one FAILED. Rule names come from the logs and the rules' files, never from this script."""
import re
import sys
from pathlib import Path

import yaml

from gptoss.resources import estimate_config, estimate_runtime_min, estimate_segment_runtime_min, parity_step
from gptoss.segment_plan import parse_segment

workdir, expect = Path(sys.argv[1]), sys.argv[2]
# The submit host's own lines: without the failed jobs' logs that show-failed-logs prints, each framed by
# "=====" lines (a SLURM job's log holds the jobstep's Snakemake output, with job numbers of its own).
rule_line = "=" * 80
log = re.sub(rf"^{rule_line}\nLogfile .*:\n{rule_line}\n.*?^{rule_line}$", "", (workdir / "stderr.log").read_text(),
             flags=re.M | re.S)
run_id = re.search(r"^SLURM run ID: (\S+)$", log, re.M)[1]
profile = yaml.safe_load((workdir / "profiles/slurm/config.yaml").read_text())

# Snakemake's side: the job blocks of the log (each starts with a timestamp line).
jobs = {}  # snakemake job id -> {"rule", "command", "local"}
for block in re.split(r"^\[\w{3} \w{3} [ \d]\d [\d:]{8} \d{4}\]$", log, flags=re.M):
    # A job starts with "Job N: <message>" (rules with a message) or "[local]rule NAME:" + "    jobid: N".
    start = re.match(r"\s*(?:Job (\d+): |(local)?rule \w+:\n(?:    .*\n)*?    jobid: (\d+)$)", block, re.M)
    if start:
        command = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs[int(start[1] or start[3])] = {"local": bool(start[2]), "command": command[1] if command else None}
submitted = {int(n): (int(m), rule) for n, m, rule in re.findall(
    r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: .*/rule_(\w+?)/", log, re.M)}
finished = {int(n): rule for n, rule in re.findall(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$", log, re.M)}
for n, rule in finished.items():
    jobs[n]["rule"] = rule

# SLURM's side: every job of this run (job name = the plugin's run ID), from squeue (which keeps ended jobs
# MinJobAge seconds).
slurm = {}
for line in (workdir / "squeue.txt").read_text().splitlines():
    jid, name, comment, state, cpus, mem, limit = line.split("|")
    if name == run_id:
        slurm[int(jid)] = {"comment": comment, "state": state, "cpus": int(cpus), "mem": mem, "limit": limit}

def minutes(limit):  # squeue's [D-]HH:MM:SS or MM:SS
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    return int(days or 0) * 1440 + parts[0] * 60 + parts[1] + (parts[2] > 0)

# The wall time each rule asks for: its `runtime=runtime("STEP")` in workflow/rules/*.smk, the model's minutes
# for that step on the toy (parity's step follows the job's {stage}, the last part of its SLURM comment).
steps = {}
for smk in sorted((workdir / "workflow/rules").glob("*.smk")):
    for rule, body in re.findall(r"^rule (\w+):\n((?:[ #].*\n|\n)*)", smk.read_text(), re.M):
        step = re.search(r'^ +runtime=(segment_)?runtime\("(\w+)"\),$', body, re.M)
        if step:
            steps[rule] = (step[2], bool(step[1]))
toy = yaml.safe_load((workdir / "config/toy.yaml").read_text())["checkpoints"]["toy"]
toy_model = estimate_config(toy["layers"], workdir / "results/toy/checkpoint", toy["preset"])
overrides = profile.get("set-resources") or {}


def expected_runtime(rule, comment):
    if "runtime" in overrides.get(rule, {}):
        return overrides[rule]["runtime"]
    if rule not in steps:
        return None
    step, per_segment = steps[rule]
    layers = toy_model.num_hidden_layers
    if per_segment and step == "manifest":  # the whole graph's tensors
        return estimate_segment_runtime_min(toy_model, toy["weight_format"], step, 0, layers + 1)
    if per_segment:  # a segment's job: its {segment} is the comment's last part
        segment = parse_segment(comment.rsplit("_", 1)[1], layers)
        return estimate_segment_runtime_min(toy_model, toy["weight_format"], step, segment.first, segment.last)
    step = parity_step(comment.rsplit("_", 1)[1]) if step == "parity" else step
    return estimate_runtime_min(toy_model, toy["weight_format"], step)


errors = []
print(f"{'rule':<20} {'snakemake job':>13} {'SLURM job':>9} {'state':<10} {'CPUs':>4} {'mem':>7} {'time limit':>10}")
for n, job in sorted(jobs.items(), key=lambda item: submitted.get(item[0], (10**9,))[0]):
    rule = job.get("rule") or submitted.get(n, (None, "?"))[1]
    if job["local"]:
        print(f"{rule:<20} {n:>13} {'(local)':>9}")
        if job["command"] not in (None, "None"):
            errors.append(f"{rule} (job {n}) ran a command on the submit host: {job['command']}")
        continue
    if n not in submitted:
        errors.append(f"{rule} (job {n}) was not submitted to SLURM")
        continue
    jid, logged_rule = submitted[n]
    s = slurm.get(jid)
    if s is None:
        errors.append(f"{rule}: SLURM job {jid} unknown to squeue")
        continue
    print(f"{rule:<20} {n:>13} {jid:>9} {s['state']:<10} {s['cpus']:>4} {s['mem']:>7} {s['limit']:>10}")
    if not s["comment"].startswith(f"rule_{logged_rule}"):
        errors.append(f"{rule}: SLURM job {jid} has comment {s['comment']!r}")
    threads = re.search(r"--threads (\d+)", job["command"] or "")
    if threads and s["cpus"] != int(threads[1]):
        errors.append(f"{rule}: SLURM job {jid} got {s['cpus']} CPUs, the rule runs {threads[1]} threads")
    if not re.fullmatch(r"[1-9]\d*[MG]", s["mem"]):
        errors.append(f"{rule}: SLURM job {jid} has no memory request ({s['mem']})")
    runtime = expected_runtime(logged_rule, s["comment"])
    if runtime is None:
        errors.append(f"rule {logged_rule} has no runtime=runtime(STEP) in workflow/rules/*.smk")
    elif minutes(s["limit"]) != runtime:
        errors.append(f"{rule}: SLURM job {jid} time limit {s['limit']}, its rule asks for {runtime} min")
if len(slurm) != len(submitted):
    errors.append(f"{len(slurm)} SLURM jobs for {len(submitted)} Snakemake submissions (a retry?)")
comments = [s["comment"] for s in slurm.values()]
if len(comments) != len(set(comments)):
    errors.append(f"a job was submitted twice: {sorted(comments)}")
states = sorted(s["state"] for s in slurm.values())
if expect == "passed" and set(states) != {"COMPLETED"}:
    errors.append(f"SLURM states {states}, expected all COMPLETED")
if expect == "failed" and states.count("FAILED") != 1:
    errors.append(f"SLURM states {states}, expected exactly one FAILED")
if errors:
    sys.exit("\n".join(["check failed:", *errors]))
print(f"{len(submitted)} SLURM jobs, {sum(j['local'] for j in jobs.values())} local jobs without a command: ok")
EOF
}

# The toy's baseline2 folder (promote.dir in config/toy.yaml).
PROMOTED=$(.venv/bin/python -c 'import yaml; print(yaml.safe_load(open("config/toy.yaml"))["promote"]["dir"])')
PROMOTED=$PROMOTED/baseline2

# --- 4a. the toy DAG to promotion ------------------------------------------------------------------------------
step "toy DAG on SLURM: promote_baseline2"
TOY=$(fresh_copy toy)
rc=$(snakemake_in "$TOY" --workflow-profile profiles/slurm promote_baseline2 --configfile config/toy.yaml)
if [[ $rc != 0 ]]; then
    echo "toy DAG failed (exit $rc):" >&2
    tail -n 40 "$TOY/stderr.log" >&2
    exit 1
fi
check_run "$TOY" passed
test -s "$TOY/$PROMOTED/manifest.json" && test -s "$TOY/$PROMOTED/model.onnx.data"
cp "$TOY/results/toy/gate/verdict.json" "$STATE/verdict_unsegmented.json" # 4b's failing gate removes it; 4d compares
echo "promoted: $(cd "$TOY/$PROMOTED" && echo *)"
grep '^Elapsed time' "$TOY/stderr.log" || true

# --- 4b. a failing gate ---------------------------------------------------------------------------------------
# In the same copy: tolerances no graph can meet re-run parity and the gate (the CSVs carry the tolerances).
# `reference=none generate_tokens=0` only keep this run short (no transformers reference, no decoder graph:
# two parity jobs instead of four); the gate fails on the debug graph's taps either way.
# The graph promoted by 4a must stay as it is: snapshot its files (size, mtime, sha256) before and after.
step "toy DAG on SLURM: a failing gate"
snapshot() ( # a subshell: the cd stays inside
    cd "$TOY/$PROMOTED"
    find . -type f -printf '%p %s %T@\n' | sort
    find . -type f -print0 | sort -z | xargs -0 sha256sum
)
before=$(snapshot)
rc=$(snakemake_in "$TOY" --workflow-profile profiles/slurm promote_baseline2 --configfile config/toy.yaml \
    --config 'tolerances={logits: 1e-12, hidden_states: 1e-12, block_taps: 1e-12}' reference=none generate_tokens=0)
if [[ $rc == 0 || $rc == 124 ]]; then
    echo "the failing gate run exited $rc (expected a failure, not success or a timeout)" >&2
    tail -n 40 "$TOY/stderr.log" >&2
    exit 1
fi
grep -m1 'gptoss gate: error: gate failed:' "$TOY/stderr.log" || { tail -n 40 "$TOY/stderr.log" >&2; exit 1; }
check_run "$TOY" failed
if [[ $(snapshot) != "$before" ]]; then
    echo "the failing gate run changed the promoted graph in $PROMOTED" >&2
    exit 1
fi
echo "exit $rc; the graph promoted by the passing run is unchanged, nothing else promoted"
grep '^Elapsed time' "$TOY/stderr.log" | tail -n 1 || true

# --- 4c. a wrong partition ------------------------------------------------------------------------------------
# What a cluster user might type into profiles/slurm: the run fails at the first submission, naming it.
# (An account cannot be tested here: without accounting, SLURM accepts and ignores any account.)
step "a wrong partition fails at once"
WRONG=$(fresh_copy wrong_partition)
rc=$(snakemake_in "$WRONG" --workflow-profile profiles/slurm promote_baseline2 --configfile config/toy.yaml \
    --default-resources slurm_partition=no_such_partition runtime=30)
if [[ $rc == 0 || $rc == 124 ]] || ! grep -m1 'invalid partition specified: no_such_partition' "$WRONG/stderr.log"; then
    echo "a wrong partition: exit $rc, expected a failure naming it" >&2
    tail -n 40 "$WRONG/stderr.log" >&2
    exit 1
fi

# --- 4d. parity in segments ------------------------------------------------------------------------------------
# In a fresh copy: `parity_segment_blocks=1` fans the debug and canonical parity out into one SLURM job per
# segment (the embedding, each block, the head; the toy has two blocks), each on a graph of its own pieces and
# continuing from the states the one before it left. The verdict must be the unsegmented run's (4a): passed, the
# same worst row of every group with the same differences, for the very same graphs (their sha256). Then one
# tensor of one segment graph is tampered: that segment's parity re-runs, and the gate must refuse, naming the
# segment and the tensor.
step "toy DAG on SLURM: parity in segments, then a tampered segment"
RUN_TIMEOUT=1200 # about 30 SLURM jobs: one per segment graph and per segment's parity (about 7 min here)
SEG=$(fresh_copy segments)
rc=$(snakemake_in "$SEG" --workflow-profile profiles/slurm promote_baseline2 --configfile config/toy.yaml \
    --config parity_segment_blocks=1)
if [[ $rc != 0 ]]; then
    echo "segmented toy DAG failed (exit $rc):" >&2
    tail -n 40 "$SEG/stderr.log" >&2
    exit 1
fi
check_run "$SEG" passed
.venv/bin/python - "$STATE/verdict_unsegmented.json" "$SEG/results/toy/gate/verdict.json" <<'EOF'
import json
import sys

whole, segmented = (json.load(open(path)) for path in sys.argv[1:])
jobs = {stage: len(found) for stage, found in segmented["segments"].items()}
assert segmented["passed"] and jobs == {"debug": 4, "canonical": 4}, (segmented["passed"], jobs)
assert segmented["graphs"] == whole["graphs"], (segmented["graphs"], whole["graphs"])
for key in ("worst", "stages", "generation", "first_failure"):
    assert segmented[key] == whole[key], (key, segmented[key], whole[key])
print(
    f"segmented verdict: passed, {jobs} segments, the same {len(whole['graphs'])} graphs, worst rows and row counts "
    "as the unsegmented run"
)
EOF
.venv/bin/python - "$SEG/results/toy/onnx/debug.seg_blocks01-01.onnx" <<'EOF'
import sys

import onnx

path = sys.argv[1]
model = onnx.load(path)
(sinks,) = [t for t in model.graph.initializer if t.name == "layers.1.attn.sinks"]
values = onnx.numpy_helper.to_array(sinks)
sinks.CopyFrom(onnx.numpy_helper.from_array((values.astype("float32") + 0.5).astype(values.dtype), sinks.name))
onnx.save(model, path)
print(f"tampered layers.1.attn.sinks in {path}")
EOF
rc=$(snakemake_in "$SEG" --workflow-profile profiles/slurm promote_baseline2 --configfile config/toy.yaml \
    --config parity_segment_blocks=1)
wanted='gate failed: debug segment blocks01-01: tensor layers.1.attn.sinks is not the whole graph'
if [[ $rc == 0 || $rc == 124 ]] || ! grep -m1 "$wanted" "$SEG/stderr.log"; then
    echo "a tampered segment: exit $rc, expected the gate to name the segment and the tensor" >&2
    tail -n 40 "$SEG/stderr.log" >&2
    exit 1
fi
check_run "$SEG" failed
grep '^Elapsed time' "$SEG/stderr.log" | tail -n 1 || true
