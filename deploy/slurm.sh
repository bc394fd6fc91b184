#!/bin/bash
# autoresearch on many machines with SLURM: each array task is one node running launch.py (one agent per GPU it
# was given) against one hub the lab runs (`uv run hub.py --data hub-data --host 0.0.0.0 --admin-key KEY
# --baseline-from .` in a checkout of the project: pushes may change only train.py from its files).
#
#   uv run prepare.py                                # once, on a login node: every task reads the same cache
#   export HUB=http://hub.lab:8765 HUB_ADMIN_KEY=KEY
#   export AGENT='claude -p "Read program-hub.md and kick off a new experiment" --dangerously-skip-permissions'
#   sbatch --array=0-3 deploy/slurm.sh               # from the top of your checkout: 4 nodes
#
# Task I works in its own clone, ../autoresearch-tasks/taskI next to the checkout (launch.py keeps its worktrees
# and logs under .agents/ there); its status lines go to autoresearch-JOB-I.out. Submitting again resumes in the
# same clones. A time limit or scancel sends SIGTERM, which launch.py takes as Ctrl-C.
#SBATCH --job-name=autoresearch
#SBATCH --nodes=1
#SBATCH --gres=gpu:8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --output=autoresearch-%A-%a.out
set -euo pipefail
: "${HUB:?export HUB, the URL of the hub}" "${AGENT:?export AGENT, the agent command}"
: "${CUDA_VISIBLE_DEVICES:?no GPUs in this allocation: keep --gres=gpu:N}"

clone="$SLURM_SUBMIT_DIR/../autoresearch-tasks/task$SLURM_ARRAY_TASK_ID"
[ -d "$clone" ] || git clone --quiet "$SLURM_SUBMIT_DIR" "$clone"
cd "$clone"
# SLURM's CUDA_VISIBLE_DEVICES lists this task's GPUs: one agent on each
eval "exec uv run launch.py --gpus $CUDA_VISIBLE_DEVICES --hub $HUB --name $USER-task$SLURM_ARRAY_TASK_ID -- $AGENT"
