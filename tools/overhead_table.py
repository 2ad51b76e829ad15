"""One row per rank and run of ``run.sh mps overhead`` (``python/examples/overhead.py``), from the
summaries it printed, by build, then by the Rust API's own share of the same calls:

    python3 tools/overhead_table.py bench/results/FOLDER/summary.log [more summary.log files]

Each row gives, for DeepEP's face (``moe_ep.deep_ep.Buffer``), the Rust API's host time per
``low_latency_dispatch`` / ``low_latency_combine``, what the binding adds over it, and the
do-nothing call of the same signature timed in the same loop. The Rust API and the do-nothing
call say how fast that process's CPU ran in that run: on the shared virtual machines the device
tool lends, the same calls take from about 4.3 to 8 us in the Rust API alone, and the binding's
share scales with them. Prints nothing but the table (markdown).
"""

import os
import re
import sys

RUN = re.compile(r"=== python overhead, .*\), (\w+) \(.*?\)(?:, (\w+)'s wheel, round (\d+))?: exit")
CALL = re.compile(
    r"rank (\d+) of \d+ .*moe_ep\.deep_ep\.Buffer\.low_latency_(dispatch|combine): host ([\d.]+) us per call, "
    r"of which Rust API ([\d.]+) us, so the binding adds (-?[\d.]+) us"
)
PROBE = re.compile(r"rank (\d+) of \d+ .*doing nothing, timed as the calls above: host ([\d.]+) us")


def rows(path):
    """{(folder, pass, build, round, rank): {"dispatch": (api, adds), "combine": ..., "probe": us}}."""
    out, run = {}, None
    with open(path) as f:
        for line in f:
            m = RUN.match(line)
            if m:
                run = (os.path.basename(os.path.dirname(os.path.abspath(path))), m[1], m[2] or "bundle", m[3] or "1")
                continue
            m = CALL.match(line)
            if m and run:
                out.setdefault(run + (int(m[1]),), {})[m[2]] = (float(m[4]), float(m[5]))
                continue
            m = PROBE.match(line)
            if m and run:
                out.setdefault(run + (int(m[1]),), {})["probe"] = float(m[2])
    return out


def main(paths):
    table = {}
    for p in paths:
        table.update(rows(p))
    done = [(k, v) for k, v in table.items() if "dispatch" in v and "combine" in v]
    done.sort(key=lambda kv: (kv[0][2], kv[1]["dispatch"][0]))
    print("| results folder | pass | build | round | rank | Rust API, dispatch / combine (us) | binding adds (us) | do-nothing call (us) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (folder, pas, build, rnd, rank), v in done:
        (da, dx), (ca, cx) = v["dispatch"], v["combine"]
        probe = f"{v['probe']:.2f}" if "probe" in v else "-"
        print(f"| {folder} | {pas} | {build} | {rnd} | {rank} | {da:.1f} / {ca:.1f} | {dx:.1f} / {cx:.1f} | {probe} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
