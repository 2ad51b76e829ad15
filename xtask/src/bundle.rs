//! `gpu-bundle`: everything a GPU machine with no Rust needs, in `target/gpu-bundle/`.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;

const RUN_SH: &str = r#"#!/usr/bin/env bash
# moe-ep GPU bundle: runs every test binary, then the benchmark, on a machine with no Rust.
# usage: run.sh [all|tests|isolated|mps|examples|bench|soak|python|nvshmem] [arguments for the test binaries, the benchmark or the soak]
#        run.sh mps [tests|python|exit|soak|bench|overhead]...   (default: tests python soak bench)
# Logs and the benchmark report go to $OUT (or ./out beside this script). Time limits: TEST_LIMIT
# seconds per test binary, PY_LIMIT per Python run (default 600 and 300). session.sh wraps a
# whole device call.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/out}
mkdir -p "$out"
what=${1:-all}
shift || true
# Never use NVLink multicast on shared machines.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# NCCL (for the benchmark's baseline) from the Python environment, if there is one.
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
if [ -n "$nccl" ] && [ -d "$nccl" ]; then
  mkdir -p /tmp/moe-ep-nccl
  ln -sf "$(ls "$nccl"/libnccl.so* | head -n 1)" /tmp/moe-ep-nccl/libnccl.so
  export LD_LIBRARY_PATH=/tmp/moe-ep-nccl:$nccl:${LD_LIBRARY_PATH:-}
fi
nvidia-smi -L | tee "$out/devices.txt"
status=0
# The Python package from the bundle's wheel, freshly installed into $py (on PYTHONPATH).
py=/tmp/moe-ep-python
installed=0
install_wheel() {
  rm -rf "$py"
  python3 -m pip install --quiet --no-deps --no-index --target "$py" "$here"/wheels/*.whl || status=1
  installed=1
}
# run_tests PREFIX LABEL BINARIES... -- ARGS: each test binary with its own log
# ($out/PREFIX-NAME.log) and a time limit (TEST_LIMIT seconds, default 600), in the caller's
# environment.
run_tests() {
  local prefix=$1 label=$2; shift 2
  local bins=()
  while [ "$1" != -- ]; do bins+=("$1"); shift; done
  shift
  for t in "${bins[@]}"; do
    name=$(basename "$t")
    timeout -k 10 "${TEST_LIMIT:-600}" "$t" --test-threads=1 --nocapture "$@" > "$out/$prefix-${name%%-*}.log" 2>&1
    rc=$?
    echo "=== $name$label: exit $rc"
    [ "$rc" -eq 0 ] || status=1
    grep -E "^test .*(ok|FAILED)$|^test result|SKIP|panicked|Error:|differ|^rank 0: .* share" "$out/$prefix-${name%%-*}.log" | head -n 30
  done
}
if [ "$what" = isolated ]; then
  # Not part of `all`: the multi-GPU tests again, one process per GPU with each process seeing
  # only its own GPU (CUDA_VISIBLE_DEVICES set per child, as Slurm and Kubernetes do).
  MOE_EP_TEST_ONE_GPU_PER_PROCESS=1 run_tests isolated ", one visible GPU per process" "$here"/tests/gpu_ht-* "$here"/tests/gpu_ll-* -- "$@"
fi
if [ "$what" = mps ]; then
  # Not part of `all`: on a one-GPU machine, the whole multi-process stack with every rank a
  # process on GPU 0 under CUDA MPS (a correctness check: no figure from it says anything about
  # NVLink). A private MPS control daemon (own pipe and log directories) runs for the duration
  # and is stopped at the end, also when a step fails or times out. Parts (default: tests
  # python soak bench): tests (every multi-rank test binary at each rank count of MPS_RANKS,
  # default "2 3 4 8", one log per binary and rank count; MPS_TESTS picks binaries by name, e.g.
  # "gpu_ht gpu_ll"), python (the torchrun example and the Python tests at each rank count, the
  # exit test among them), exit (the exit test alone: ranks that end without destroying
  # anything), soak (SOAK_ITERS iterations, default 3000, at 4 ranks, at most SOAK_SECONDS),
  # bench (the benchmark's smoke run at 2 ranks, which prints the labelled flag round trip),
  # overhead (python/overhead.py at 2 ranks: the host time per call of each Python face; see
  # the part for OVERHEAD_PASSES, OVERHEAD_ROUNDS and OVERHEAD_COMPARE).
  # MPS_ROOT names the daemon's directory (default: a fresh one under /tmp).
  parts=${*:-tests python soak bench}
  set --
  mps_root=${MPS_ROOT:-$(mktemp -d /tmp/moe-ep-mps.XXXXXX)}
  export CUDA_MPS_PIPE_DIRECTORY=$mps_root/pipe CUDA_MPS_LOG_DIRECTORY=$mps_root/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # The daemon and its server by process name (nvidia-cuda-mps-control and -server, both
  # "nvidia-cuda-mps" in the kernel's 15-character name), never by command line.
  mps_pids() { pgrep -x nvidia-cuda-mps; }
  mps_stop() {
    echo quit | nvidia-cuda-mps-control > /dev/null 2>&1
    for _ in $(seq 100); do mps_pids > /dev/null || break; sleep 0.1; done
    if mps_pids > /dev/null; then
      echo "MPS: still running 10 s after quit, killed: $(ps -o pid=,args= -p "$(mps_pids | paste -sd,)" | tr '\n' ';')"
      mps_pids | xargs -r kill -9
      sleep 1
    fi
    echo "MPS: daemon stopped; MPS processes left: $(mps_pids | wc -l)"
    cp "$CUDA_MPS_LOG_DIRECTORY"/control.log "$out/mps-control.log" 2> /dev/null
  }
  if ! command -v nvidia-cuda-mps-control > /dev/null; then
    echo "MPS: nvidia-cuda-mps-control is not on this machine; the multi-process tests cannot share the GPU"; exit 1
  fi
  if ! nvidia-cuda-mps-control -d; then
    echo "MPS: the control daemon did not start (see $CUDA_MPS_LOG_DIRECTORY)"; exit 1
  fi
  trap 'mps_stop' EXIT
  trap 'exit 130' INT TERM
  for _ in $(seq 50); do [ -e "$CUDA_MPS_PIPE_DIRECTORY/control" ] && break; sleep 0.1; done
  if [ ! -e "$CUDA_MPS_PIPE_DIRECTORY/control" ]; then echo "MPS: no control pipe in $CUDA_MPS_PIPE_DIRECTORY after 5 s"; exit 1; fi
  echo "MPS: control daemon up (pipe $CUDA_MPS_PIPE_DIRECTORY)"
  ranks=${MPS_RANKS:-2 3 4 8}
  # Ranks that end without destroying anything, seconds apart: every process must exit 0.
  run_exit_test() {
    MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
      timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$1" "$here/python/test_exit.py" > "$out/mps$1-python-exit.log" 2>&1; rc=$?
    echo "=== python exit test, $1 ranks sharing GPU 0 (MPS): exit $rc"; grep -E "^rank|exitcode|Fatal|Segmentation|File" "$out/mps$1-python-exit.log" | head -n 30; [ "$rc" -eq 0 ] || status=1
  }
  for part in $parts; do
    case $part in
      tests)
        for n in $ranks; do
          bins=()
          for b in ${MPS_TESTS:-gpu_}; do
            found=("$here"/tests/"$b"*)
            if [ -e "${found[0]}" ]; then bins+=("${found[@]}"); else echo "MPS_TESTS: no test binary named $b*"; status=1; fi
          done
          [ "${#bins[@]}" -gt 0 ] || continue
          MOE_EP_TEST_MPS=1 MOE_EP_TEST_RANKS=$n run_tests "mps$n" ", $n ranks sharing GPU 0 (MPS)" "${bins[@]}" --
        done ;;
      python)
        install_wheel
        for n in $ranks; do
          MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 MOE_EP_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') \
            timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" --no-python "$here/examples/torchrun" > "$out/mps$n-example-torchrun.log" 2>&1; rc=$?
          echo "=== example torchrun, $n ranks sharing GPU 0 (MPS): exit $rc"; grep -E "^rank|FAILED|Error" "$out/mps$n-example-torchrun.log" | head -n 12; [ "$rc" -eq 0 ] || status=1
          MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
            timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_gpu.py" > "$out/mps$n-python.log" 2>&1; rc=$?
          echo "=== python test_gpu.py, $n ranks sharing GPU 0 (MPS): exit $rc"; grep -E "passed|Error|assert" "$out/mps$n-python.log" | head -n 12; [ "$rc" -eq 0 ] || status=1
          MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
            timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_deep_ep.py" > "$out/mps$n-python-deep-ep.log" 2>&1; rc=$?
          echo "=== python test_deep_ep.py, $n ranks sharing GPU 0 (MPS): exit $rc"; grep -E "^rank 0|passed|Error|assert" "$out/mps$n-python-deep-ep.log" | head -n 16; [ "$rc" -eq 0 ] || status=1
          # A rank killed mid-decode: torchrun itself then exits non-zero, so count the
          # survivors' verdicts (its agent looks at its workers only every 10 s).
          MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
            timeout 120 python3 -m torch.distributed.run --monitor-interval 10 --nproc-per-node "$n" "$here/python/test_kill.py" > "$out/mps$n-python-kill.log" 2>&1
          passes=$(grep -o "PASS rank" "$out/mps$n-python-kill.log" | wc -l)
          echo "=== python kill test, $n ranks sharing GPU 0 (MPS): $passes of $(( n - 1 )) survivors passed"; grep -E "^(PASS|FAIL)|Error" "$out/mps$n-python-kill.log" | head -n 10
          [ "$passes" -eq $(( n - 1 )) ] || status=1
          run_exit_test "$n"
        done ;;
      exit)
        [ "$installed" = 1 ] || install_wheel
        for n in $ranks; do run_exit_test "$n"; done ;;
      soak)
        timeout $(( ${SOAK_SECONDS:-120} + 60 )) "$here/bin/moe-ep-soak" --shared-gpu --ranks 4 --iters "${SOAK_ITERS:-3000}" --seconds "${SOAK_SECONDS:-120}" > "$out/mps-soak.log" 2>&1; rc=$?
        echo "=== soak, 4 ranks sharing GPU 0 (MPS): exit $rc"; tail -n 4 "$out/mps-soak.log"; [ "$rc" -eq 0 ] || status=1 ;;
      overhead)
        # Host CPU time per low-latency call through each Python face (the GPU figures it also
        # prints are of ranks sharing one GPU: not NVLink figures). Passes (OVERHEAD_PASSES,
        # default all three): plain (each rank's process on whichever cores the OS picks),
        # pinned (on a physical core of its own, MOE_EP_PIN_CORES=1), staggered (rank 1 starts
        # each step 200 us after rank 0, so that the ranks' calls do not meet in the driver and
        # MPS server). OVERHEAD_ROUNDS (default 1) repeats them. OVERHEAD_COMPARE names folders
        # each holding another build's wheel: each pass then runs those wheels (compare1,
        # compare2, ...), then the bundle's, in the same round (an A/B on one machine in one call).
        [ "$installed" = 1 ] || install_wheel
        builds=""
        i=0
        for dir in ${OVERHEAD_COMPARE:-}; do
          i=$(( i + 1 ))
          rm -rf "/tmp/moe-ep-python-compare$i"
          python3 -m pip install --quiet --no-deps --no-index --target "/tmp/moe-ep-python-compare$i" "$dir"/*.whl || status=1
          builds="$builds compare$i"
        done
        builds="$builds bundle"
        for round in $(seq "${OVERHEAD_ROUNDS:-1}"); do
          for pass in ${OVERHEAD_PASSES:-plain pinned staggered}; do
            case $pass in plain|pinned|staggered) ;; *) echo "OVERHEAD_PASSES: no pass named $pass (plain, pinned, staggered)"; status=1; continue ;; esac
            for build in $builds; do
              log="$out/mps-python-overhead-$pass-$build-$round.log"
              path=$([ $build = bundle ] && echo "$py" || echo "/tmp/moe-ep-python-$build")
              pin=$([ $pass = pinned ] && echo 1 || echo 0); stagger=$([ $pass = staggered ] && echo 200 || echo 0)
              MOE_EP_PIN_CORES=$pin MOE_EP_OVERHEAD_STAGGER_US=$stagger MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$path" \
                timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node 2 "$here/python/overhead.py" > "$log" 2>&1; rc=$?
              echo "=== python overhead, 2 ranks sharing GPU 0 (MPS), $pass (MOE_EP_PIN_CORES=$pin, MOE_EP_OVERHEAD_STAGGER_US=$stagger), $build's wheel, round $round: exit $rc"
              grep -E "^rank [0-9]+: (not )?pinned|binding adds|stage marks|doing nothing, timed|passes' thread|Error" "$log" | grep "pinned\|deep_ep\|doing\|thread\|Error" | head -n 16; [ "$rc" -eq 0 ] || status=1
            done
          done
        done ;;
      bench)
        timeout 300 "$here/bin/moe-ep-bench" p2p ll --quick --shared-gpu --ranks 2 > "$out/mps-bench.log" 2>&1; rc=$?
        echo "=== benchmark smoke run, 2 ranks sharing GPU 0 (MPS): exit $rc"; grep -E "SHARED GPU|round trip" "$out/mps-bench.log" | head -n 6; [ "$rc" -eq 0 ] || status=1 ;;
      *) echo "run.sh mps: unknown part $part (tests, python, exit, soak, bench, overhead)"; status=1 ;;
    esac
  done
  exit $status
fi
if [ "$what" = all ] || [ "$what" = tests ]; then
  run_tests test "" "$here"/tests/* -- "$@"
fi
if [ "$what" = all ] || [ "$what" = examples ]; then
  # The examples print what they checked; torchrun's comes through torch's launcher.
  gpus=$(nvidia-smi -L | wc -l)
  for e in threads decode_graph prefill; do
    timeout 300 "$here/examples/$e" > "$out/example-$e.log" 2>&1; rc=$?
    echo "=== example $e: exit $rc"; cat "$out/example-$e.log"; [ "$rc" -eq 0 ] || status=1
  done
  MOE_EP_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') timeout -k 10 "${PY_LIMIT:-300}" \
    python3 -m torch.distributed.run --nproc-per-node "$gpus" --no-python "$here/examples/torchrun" > "$out/example-torchrun.log" 2>&1; rc=$?
  echo "=== example torchrun: exit $rc"; grep -E "^rank|FAILED" "$out/example-torchrun.log"; [ "$rc" -eq 0 ] || status=1
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  if [ "$what" = all ]; then set --; fi
  "$here/bin/moe-ep-bench" --out "$out/results" "$@" 2>&1 | tee "$out/bench.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if [ "$what" = python ]; then
  # Not part of `all`: the moe_ep wheel under torchrun at 2 ranks and at every GPU.
  gpus=$(nvidia-smi -L | wc -l)
  install_wheel
  for n in 2 "$gpus"; do
    PYTHONPATH="$py" timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_gpu.py" > "$out/python-$n.log" 2>&1; rc=$?
    echo "=== python, $n ranks: exit $rc"; grep -E "^rank|Error|assert" "$out/python-$n.log" | head -n 40; [ "$rc" -eq 0 ] || status=1
    PYTHONPATH="$py" timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_deep_ep.py" > "$out/python-deep-ep-$n.log" 2>&1; rc=$?
    echo "=== python deep_ep, $n ranks: exit $rc"; grep -E "^rank 0|passed|Error|assert" "$out/python-deep-ep-$n.log" | head -n 20; [ "$rc" -eq 0 ] || status=1
  done
  # A rank killed mid-decode at every GPU: count the survivors' verdicts (torchrun itself exits
  # non-zero when a worker is killed).
  PYTHONPATH="$py" timeout 120 python3 -m torch.distributed.run --monitor-interval 10 --nproc-per-node "$gpus" "$here/python/test_kill.py" > "$out/python-kill.log" 2>&1
  passes=$(grep -o "PASS rank" "$out/python-kill.log" | wc -l)
  echo "=== python kill test, $gpus ranks: $passes of $(( gpus - 1 )) survivors passed"; grep -E "^(PASS|FAIL)|Error" "$out/python-kill.log" | head -n 10
  [ "$passes" -eq $(( gpus - 1 )) ] || status=1
  for shim in 1 0; do
    MOE_EP_TORCH_SHIM=$shim PYTHONPATH="$py" timeout 120 python3 "$here/python/test_tensor_paths.py" > "$out/python-tensor-paths-$shim.log" 2>&1; rc=$?
    echo "=== python tensor paths (MOE_EP_TORCH_SHIM=$shim): exit $rc"; cat "$out/python-tensor-paths-$shim.log" | tail -n 5; [ "$rc" -eq 0 ] || status=1
  done
  MOE_EP_TORCH_SHIM=0 PYTHONPATH="$py" timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$gpus" "$here/python/overhead.py" > "$out/python-overhead-attributes.log" 2>&1; rc=$?
  echo "=== python example overhead, tensor attributes, $gpus ranks: exit $rc"; grep -E "^rank|Error" "$out/python-overhead-attributes.log" | head -n 20; [ "$rc" -eq 0 ] || status=1
  for ex in moe_layer overhead; do
    PYTHONPATH="$py" timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$gpus" "$here/python/$ex.py" > "$out/python-$ex.log" 2>&1; rc=$?
    echo "=== python example $ex, $gpus ranks: exit $rc"; grep -E "^rank|Error" "$out/python-$ex.log" | head -n 20; [ "$rc" -eq 0 ] || status=1
  done
fi
if [ "$what" = nvshmem ]; then
  # Not part of `all`: NVSHMEM bootstrapped on a moe-ep group and the probe kernels (NVSHMEM
  # 3.4.5 device bitcode, sm_90 cubin) at each PE count of NVSHMEM_PES (default "2 3 4"), every
  # PE a process on GPU 0 without MPS (NVSHMEM's limited multi-process mode: the processes take
  # turns on the GPU, so its figures say nothing about a link), against the Python environment's
  # NVSHMEM host library (or NVSHMEM_HOST_LIB).
  nv_lib=${NVSHMEM_HOST_LIB:-$(python3 -c 'import nvidia.nvshmem, os; print(os.path.join(list(nvidia.nvshmem.__path__)[0], "lib", "libnvshmem_host.so.3"))' 2>/dev/null)}
  if [ -z "$nv_lib" ] || [ ! -e "$nv_lib" ]; then echo "nvshmem: no NVSHMEM host library (pip install nvidia-nvshmem-cu13, or set NVSHMEM_HOST_LIB)"; exit 1; fi
  echo "nvshmem: host library $nv_lib"
  # Each PE count twice: the low-latency buffer's peers by direct stores (nvshmem_ptr), then
  # through NVSHMEM calls (MOE_EP_NVSHMEM_PUT=all: the put path a PE on another node takes).
  for n in ${NVSHMEM_PES:-2 3 4}; do
    for put in direct all; do
      log="$out/nvshmem$n-probe$([ $put = all ] && echo -put).log"
      NVSHMEM_HOST_LIB=$nv_lib LD_LIBRARY_PATH=$(dirname "$nv_lib"):${LD_LIBRARY_PATH:-} NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo} \
        MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 MOE_EP_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') MOE_EP_NVSHMEM_PUT=$put \
        NVSHMEM_PROBE_ITERS=${NVSHMEM_PROBE_ITERS:-20} NVSHMEM_PROBE_MIB=${NVSHMEM_PROBE_MIB:-16} \
        timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" --no-python "$here/examples/nvshmem_probe" "$here/ptx/moe_ep_nvshmem.cubin" > "$log" 2>&1; rc=$?
      echo "=== NVSHMEM probe, $n PEs sharing GPU 0 (no MPS), MOE_EP_NVSHMEM_PUT=$put: exit $rc"; grep -E "^rank|nvshmem_probe:|Error|error" "$log" | head -n 40; [ "$rc" -eq 0 ] || status=1
    done
  done
  # Ranks standing for two nodes (NVSHMEM_PROBE_NODE_SIZE: every 2 ranks one node, MOE_EP_NODE):
  # the group spans nodes, the IPC buffer must be refused, the NVSHMEM one checked on its own;
  # at each PE count of NVSHMEM_NODE_PES (default "4", "" skips it), direct stores and puts.
  for n in ${NVSHMEM_NODE_PES-4}; do
    for put in direct all; do
      log="$out/nvshmem$n-probe-two-nodes$([ $put = all ] && echo -put).log"
      NVSHMEM_HOST_LIB=$nv_lib LD_LIBRARY_PATH=$(dirname "$nv_lib"):${LD_LIBRARY_PATH:-} NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo} \
        MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 MOE_EP_SECRET=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n') MOE_EP_NVSHMEM_PUT=$put \
        NVSHMEM_PROBE_NODE_SIZE=2 NVSHMEM_PROBE_ITERS=${NVSHMEM_PROBE_ITERS:-20} NVSHMEM_PROBE_MIB=${NVSHMEM_PROBE_MIB:-16} \
        timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" --no-python "$here/examples/nvshmem_probe" "$here/ptx/moe_ep_nvshmem.cubin" > "$log" 2>&1; rc=$?
      echo "=== NVSHMEM probe, $n PEs sharing GPU 0 (no MPS) standing for 2 nodes, MOE_EP_NVSHMEM_PUT=$put: exit $rc"; grep -E "^rank|nvshmem_probe:|Error|error" "$log" | head -n 40; [ "$rc" -eq 0 ] || status=1
    done
  done
  # The Python package's test with its low-latency buffer in NVSHMEM's memory (NVSHMEM_PY_PES=""
  # skips it).
  install_wheel
  # Again each rank count twice: direct stores, then NVSHMEM calls through the bound module.
  for n in ${NVSHMEM_PY_PES-2 4}; do
    for put in direct all; do
      log="$out/nvshmem$n-python$([ $put = all ] && echo -put).log"
      # Direct stores with no module bound (MOE_EP_NVSHMEM_MODULE=none); the put path with the
      # module the wheel carries (MOE_EP_NVSHMEM_MODULE unset).
      if [ $put = all ]; then unset MOE_EP_NVSHMEM_MODULE; else export MOE_EP_NVSHMEM_MODULE=none; fi
      MOE_EP_LL_TRANSPORT=nvshmem MOE_EP_NVSHMEM_PUT=$put \
        NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo} MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
        timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_gpu.py" > "$log" 2>&1; rc=$?
      echo "=== python test_gpu.py, low-latency buffer on NVSHMEM, $n ranks sharing GPU 0 (no MPS), MOE_EP_NVSHMEM_PUT=$put: exit $rc"; grep -E "^rank|Error|assert" "$log" | head -n 20; [ "$rc" -eq 0 ] || status=1
    done
  done
  # The same test with the ranks standing for two nodes and no transport named: the package
  # must pick NVSHMEM, and refuse the high-throughput buffer and its own heap.
  unset MOE_EP_NVSHMEM_MODULE
  for n in ${NVSHMEM_NODE_PES-4}; do
    log="$out/nvshmem$n-python-two-nodes.log"
    MOE_EP_TEST_NODE_SIZE=2 NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=${NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME:-lo} MOE_EP_SHARE_GPU=1 CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$py" \
      timeout -k 10 "${PY_LIMIT:-300}" python3 -m torch.distributed.run --nproc-per-node "$n" "$here/python/test_gpu.py" > "$log" 2>&1; rc=$?
    echo "=== python test_gpu.py, $n ranks sharing GPU 0 (no MPS) standing for 2 nodes, no transport named: exit $rc"; grep -E "^rank|Error|assert" "$log" | head -n 20; [ "$rc" -eq 0 ] || status=1
  done
fi
if [ "$what" = soak ]; then
  # Not part of `all`: a long run (moe-ep-soak --iters N).
  "$here/bin/moe-ep-soak" "$@" 2>&1 | tee "$out/soak.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
"#;

const SESSION_SH: &str = r#"#!/usr/bin/env bash
# One device call: session.sh LIMIT_S [run.sh arguments...]. run.sh writes its logs to a folder
# in /tmp, which is packed into $OUT/logs.tgz every 15 s and at the end, so a call stopped at its
# limit still returns what ran; $OUT/summary.log is run.sh's own output. run.sh (and every
# process it started) is killed after LIMIT_S seconds; an MPS daemon it left is then stopped.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:?session.sh writes to \$OUT}
limit=${1:?usage: session.sh LIMIT_S [run.sh arguments...]}
shift
logs=$(mktemp -d /tmp/moe-ep-logs.XXXXXX)
export MPS_ROOT=${MPS_ROOT:-$(mktemp -d /tmp/moe-ep-mps.XXXXXX)}
snap() { tar -czf "$out/logs.tgz.part" -C "$logs" . 2> /dev/null && mv "$out/logs.tgz.part" "$out/logs.tgz"; }
( while sleep 15; do snap; done ) &
snapper=$!
t0=$(date +%s)
OUT=$logs timeout -s KILL "$limit" "$here/run.sh" "$@" > "$out/summary.log" 2>&1
rc=$?
echo "=== session: run.sh $* exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" >> "$out/summary.log"
kill "$snapper" 2> /dev/null
if pgrep -x nvidia-cuda-mps > /dev/null; then
  echo quit | CUDA_MPS_PIPE_DIRECTORY=$MPS_ROOT/pipe nvidia-cuda-mps-control > /dev/null 2>&1
  sleep 3
  pgrep -x nvidia-cuda-mps | xargs -r kill -9
  echo "=== session: stopped the MPS daemon run.sh left; MPS processes left: $(pgrep -x nvidia-cuda-mps | wc -l)" >> "$out/summary.log"
fi
snap
exit $rc
"#;

pub fn build(root: &Path) -> Result<()> {
    crate::ptx::build_and_check(root, false)?;
    crate::cargo(root, &["build", "--release", "-p", "moe-ep-bench"])?;
    crate::cargo(root, &["build", "--release", "-p", "moe-ep-tests", "--bin", "moe-ep-soak"])?;
    crate::cargo(root, &["build", "--release", "-p", "moe-ep", "--examples"])?;
    // The NVSHMEM module (its PTX and sm_90 cubin) and the probe that binds it.
    crate::nvshmem::build(root)?;
    crate::cargo(root, &["build", "--release", "-p", "moe-ep", "--features", "nvshmem,testing", "--example", "nvshmem_probe"])?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["test", "--release", "--workspace", "--no-run", "--message-format=json"])
        .output()
        .context("building the release test binaries")?;
    if !out.status.success() {
        bail!("building the release test binaries failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let dir = root.join("target/gpu-bundle");
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["bin", "tests", "ptx", "examples", "wheels", "python"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let mut n = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Test executables of the workspace: `"profile":{..."test":true...}` with an executable.
        // (The target's own `"test":true` only says it has tests: the profile's is the one.)
        let test_profile = line.split("\"profile\":{").nth(1).and_then(|r| r.split('}').next()).is_some_and(|p| p.contains("\"test\":true"));
        if !line.contains("\"reason\":\"compiler-artifact\"") || !test_profile {
            continue;
        }
        let Some(exe) = line.split("\"executable\":\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let src = Path::new(exe);
        let name = src.file_name().unwrap().to_string_lossy().to_string();
        std::fs::copy(src, dir.join("tests").join(&name))?;
        n += 1;
    }
    for b in ["moe-ep-bench", "moe-ep-soak"] {
        std::fs::copy(root.join("target/release").join(b), dir.join("bin").join(b))?;
    }
    for e in ["threads", "torchrun", "decode_graph", "prefill"] {
        std::fs::copy(root.join("target/release/examples").join(e), dir.join("examples").join(e))?;
    }
    std::fs::copy(root.join(crate::ptx::PTX_FILE), dir.join("ptx/moe_ep_kernels.ptx"))?;
    std::fs::copy(root.join("target/release/examples/nvshmem_probe"), dir.join("examples/nvshmem_probe"))?;
    for ext in ["ptx", "cubin"] {
        std::fs::copy(root.join("target/ptx/moe_ep_nvshmem").with_extension(ext), dir.join("ptx/moe_ep_nvshmem").with_extension(ext))?;
    }
    let wheel = crate::python::build_wheel(root, true)?;
    std::fs::copy(&wheel, dir.join("wheels").join(wheel.file_name().context("wheel name")?))?;
    for (from, to) in [
        ("tests/test_gpu.py", "test_gpu.py"),
        ("examples/moe_layer.py", "moe_layer.py"),
        ("examples/overhead.py", "overhead.py"),
        ("tests/test_tensor_paths.py", "test_tensor_paths.py"),
        ("tests/test_kill.py", "test_kill.py"),
        ("tests/test_exit.py", "test_exit.py"),
        ("tests/test_deep_ep.py", "test_deep_ep.py"),
    ] {
        std::fs::copy(root.join("python").join(from), dir.join("python").join(to))?;
    }
    for (name, text) in [("run.sh", RUN_SH), ("session.sh", SESSION_SH)] {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    let size: u64 = walk(&dir)?;
    println!(
        "gpu bundle: {} ({n} test binaries, examples, benchmark, soak, PTX, the Python wheel, run.sh, session.sh; {:.1} MiB)",
        dir.display(),
        size as f64 / (1 << 20) as f64
    );
    println!("run it there with: target/gpu-bundle/run.sh [all|tests|isolated|mps|examples|bench|soak|python]");
    Ok(())
}

fn walk(d: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(d)? {
        let e = e?;
        total += if e.file_type()?.is_dir() { walk(&e.path())? } else { e.metadata()?.len() };
    }
    Ok(total)
}
