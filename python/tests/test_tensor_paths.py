"""The tensor check on a GPU machine, in one process (no group needed):

    python python/tests/test_tensor_paths.py

The extension reads a tensor's metadata through torch's C shim where it can (see
``moe_ep.tensor_path()``), else through the tensor's attributes. Either way the check must accept
and refuse exactly what torch's own answers say, on contiguous, strided, transposed, expanded,
offset, size-1, empty, CPU, float32 and Parameter tensors (and on another GPU where there is one).
Run with ``MOE_EP_TORCH_SHIM=0`` to check the attribute path. Prints the path and the time of one
check."""

import time

import torch

import moe_ep

HIDDEN = 7168


def main():
    # The fast path sets itself up with its own CPU float32 probes, whatever torch's defaults.
    torch.set_default_dtype(torch.float64)
    dev = torch.cuda.current_device()
    base = torch.zeros(6, 8, HIDDEN, dtype=torch.bfloat16, device="cuda")
    cases = {
        "contiguous": base[0],
        "offset rows": base[1, 2:],
        "transposed": base[0, :, :8].t(),
        "every other row": base[0, ::2],
        "expanded": base[0, :1].expand(5, HIDDEN),
        "size-1 dim with an odd stride": base.as_strided((1, HIDDEN), (12345, 1)),
        "empty": base[0, :0],
        "3-d": base[0:2],
        "float32": base[0].float(),
        "float64 (the default dtype here)": torch.zeros(4, HIDDEN, device="cuda"),
        "int64": base[0].long(),
        "cpu": base[0].cpu(),
        "parameter": torch.nn.Parameter(base[0].clone(), requires_grad=False),
    }
    if torch.cuda.device_count() > 1:
        cases["another GPU"] = base[0].to((dev + 1) % torch.cuda.device_count())
    # The path is set up at the first check.
    moe_ep.check_tensor("x", base[0], ["torch.bfloat16"], [None, HIDDEN], dev)
    path = moe_ep.tensor_path()
    for label, t in cases.items():
        want = t.is_cuda and t.get_device() == dev and t.is_contiguous() and t.dtype == torch.bfloat16
        want = want and t.dim() == 2 and t.shape[1] == HIDDEN
        try:
            moe_ep.check_tensor("x", t, ["torch.bfloat16"], [None, HIDDEN], dev)
            got = True
        except moe_ep.InvalidArgument as e:
            got = False
            assert e.argument == "x", e.argument
        assert got == want, f"the tensor check ({path}) {'accepted' if got else 'refused'} the {label} tensor"
    x = base[0]
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        moe_ep.check_tensor("x", x, ["torch.bfloat16"], [None, HIDDEN], dev)
    us = (time.perf_counter() - t0) / n * 1e6
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}: tensor reads through {path}")
    print(f"the check agrees with torch on {len(cases)} kinds of tensor; one check_tensor call from Python: {us:.3f} us")


if __name__ == "__main__":
    main()
