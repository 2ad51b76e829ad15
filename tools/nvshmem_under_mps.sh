#!/usr/bin/env bash
# Does NVSHMEM initialise and run the probe with its PEs as processes on one GPU under CUDA MPS?
# (An earlier session saw one segfault in NVSHMEM's initialisation under MPS, not diagnosed; run
# without MPS, NVSHMEM falls back to its limited mode, where the PEs take turns on the GPU.)
# usage: tools/nvshmem_under_mps.sh BUNDLE_DIR LOG [PES] [LIMIT_S]: a private MPS daemon for the
# duration (stopped at the end, also on failure), the bundle's probe at PES (default 2) PEs,
# NVSHMEM_DEBUG=INFO, all output to LOG.
set -u
bundle=${1:?bundle directory}; log=${2:?log file}; pes=${3:-2}; limit=${4:-60}
root=$(mktemp -d /tmp/moe-ep-nvmps.XXXXXX)
export CUDA_MPS_PIPE_DIRECTORY=$root/pipe CUDA_MPS_LOG_DIRECTORY=$root/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
stop() {
  echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
  sleep 2
  pgrep -x nvidia-cuda-mps | xargs -r kill -9
  echo "MPS stopped; MPS processes left: $(pgrep -x nvidia-cuda-mps | wc -l)" >> "$log"
}
nvidia-cuda-mps-control -d || { echo "MPS did not start" > "$log"; exit 1; }
trap stop EXIT
nv_lib=$(python3 -c 'import nvidia.nvshmem, os; print(os.path.join(list(nvidia.nvshmem.__path__)[0], "lib", "libnvshmem_host.so.3"))')
echo "NVSHMEM host library $nv_lib; $pes PEs on GPU 0 under MPS (pipe $CUDA_MPS_PIPE_DIRECTORY)" > "$log"
NVSHMEM_HOST_LIB=$nv_lib LD_LIBRARY_PATH=$(dirname "$nv_lib"):${LD_LIBRARY_PATH:-} NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NVLS=1 \
  NVSHMEM_DEBUG=INFO MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 MOE_EP_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') \
  NVSHMEM_PROBE_ITERS=200 NVSHMEM_PROBE_MIB=16 PYTHONFAULTHANDLER=1 \
  timeout -k 5 "$limit" python3 -m torch.distributed.run --nproc-per-node "$pes" --no-python "$bundle/examples/nvshmem_probe" "$bundle/ptx/moe_ep_nvshmem.cubin" >> "$log" 2>&1
rc=$?
echo "probe exit $rc" >> "$log"
cp "$CUDA_MPS_LOG_DIRECTORY"/control.log "$log.mps-control" 2> /dev/null
exit $rc
