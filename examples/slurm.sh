#!/bin/bash
# Train one tunesmith config on several machines under Slurm: one torchrun per node, meeting at the first node.
#   sbatch examples/slurm.sh examples/banking77-lora.yaml train.parallel=fsdp
# output_dir must be on storage every node sees (NFS, Lustre...): each rank writes its checkpoint shards there.
# docs/distributed.md explains the settings; adjust the #SBATCH lines to your cluster.
#SBATCH --job-name=tunesmith
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
CONFIG=${1:?usage: sbatch examples/slurm.sh CONFIG [key=value ...]}
shift
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}            # INFO shows which network NCCL picked
# export NCCL_SOCKET_IFNAME=ib0                  # the interface between nodes, if NCCL picks the wrong one
# export NCCL_IB_HCA=mlx5                        # InfiniBand adapters to use (or NCCL_IB_DISABLE=1 for none)
srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "${SLURM_GPUS_ON_NODE:-8}" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" --rdzv-id "$SLURM_JOB_ID" \
    -m tunesmith train "$CONFIG" "$@"
