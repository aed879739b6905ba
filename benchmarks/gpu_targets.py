"""Every GPU measurement of issue 12 in one run: what one call of the device tool (15 minutes a session, a
machine's start included) must bring back.

Each measurement runs in its own process under its own time cap, so that one that fails or hangs costs its cap
and not the rest; each prints one JSON line, which the table below collects. Targets (issue 12):

- **fake Gaussian fit, end to end**: ``ppvi.fit(fake_gaussian.model, y, guide=..., device=DEVICE)``, mean-field
  and full-rank, the default engine and ``engine="compiled"``; the first fit of a fresh process (imports and the
  device's start-up excluded, tracing and compilation included) and a repeat. Target: under 2 s.
- **VSBC, eight schools**: ``ppvi.vsbc`` on the device at M = 1,000 and M = 100,000, mean-field, compiled, after an
  untimed run at M = 2 (the trace and TorchInductor's compilation, which a later run loads from its disk cache).
  Targets: under 2 s and under 10 s.
- **VAE throughput**: ``benchmarks/vae_throughput.py``; ppvi against the raw PyTorch loop (2.12x before issue 12;
  not lower).
- **PSIS**: ``benchmarks/psis_speed.py``; ppvi against ArviZ (114x before issue 12; not lower).

Usage::

    python benchmarks/gpu_targets.py --out "$OUT"           # on the device machine (see benchmarks/README.md)
    python benchmarks/gpu_targets.py --device cpu --quick   # a dry run of the script itself, on any machine

``--quick`` shrinks every measurement (M = 1,000 and 5,000, fewer VAE steps, smaller PSIS) so that the dry run
takes a few minutes on a 2-core CPU; its figures measure nothing the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Seconds each measurement may take before it is stopped, on the device; the sum (about 8 minutes) leaves room in
#: a 10-minute call for the start of Python and CUDA, and a session's 15 minutes for one rerun of a part.
CAPS = {"fit": 100, "vsbc": 150, "vae": 150, "psis": 60}


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for a dry run")
    return torch.device(name)


def _synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def one_fit(guide: str, engine: str, device_name: str) -> dict:
    """Seconds of the first and of a repeated fake Gaussian fit in this process."""
    import torch

    import ppvi
    from ppvi.models import fake_gaussian

    device = _device(device_name)
    torch.zeros(1, device=device)  # the device's start-up, outside the timing
    y = fake_gaussian.simulate(num_points=100, seed=0)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        fit = ppvi.fit(fake_gaussian.model, y, guide=guide, device=device_name, engine=engine, seed=0, progress=False)
        _synchronise(device)
        seconds.append(time.perf_counter() - started)
    return {"first_s": seconds[0], "repeat_s": seconds[1], "steps": fit.steps, "engine": fit.engine}


def one_vsbc(guide: str, M: int, device_name: str) -> dict:
    """Seconds of a VSBC run of eight schools at ``M`` replications, after an untimed run at M = 2."""
    sys.path.insert(0, str(HERE))
    import vsbc_speed

    _device(device_name)
    vsbc_speed.ppvi_batched(guide, 2, device_name, "compiled")
    seconds, result = vsbc_speed.ppvi_batched(guide, M, device_name, "compiled")
    return {"seconds": seconds, "engine": result.engine, "converged": int(result.num_converged)}


def _run(command: list[str], cap: float, log) -> tuple[str, float]:
    """Run ``command`` under ``cap`` seconds; its output (all of it into ``log``) and its wall time."""
    started = time.perf_counter()
    try:
        # The repository's root first on the path: ppvi as checked out, installed or not (the device has no install).
        paths = [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=cap, cwd=HERE.parent, env=environment)
        output = done.stdout + done.stderr
        if done.returncode:
            output += f"\n[exit status {done.returncode}]"
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
        output += f"\n[stopped at its cap of {cap:.0f} s]"
    log.write(f"$ {' '.join(command)}\n{output}\n")
    log.flush()
    return output, time.perf_counter() - started


def _last_json(output: str) -> dict | None:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="a dry run: every measurement shrunk")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the log and the JSON summary")
    parser.add_argument("--only", nargs="+", choices=sorted(CAPS), help="run only these parts (a rerun)")
    parser.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # what each measurement's process runs
    arguments = parser.parse_args(argv)
    if arguments.one:
        kind, *rest = arguments.one
        outcome = one_fit(rest[0], rest[1], rest[2]) if kind == "fit" else one_vsbc(rest[0], int(rest[1]), rest[2])
        print(json.dumps(outcome))
        return 0

    device, python = arguments.device, sys.executable
    sizes = (1_000, 5_000) if arguments.quick else (1_000, 100_000)
    plan: list[tuple[str, str, list[str]]] = []
    for guide in ("meanfield", "fullrank"):
        for engine in ("auto", "compiled"):
            plan.append(("fit", f"fit {guide} {engine}", [python, __file__, "--one", "fit", guide, engine, device]))
    for M in sizes:
        plan.append(("vsbc", f"vsbc meanfield M={M}", [python, __file__, "--one", "vsbc", "meanfield", str(M), device]))
    vae = ["--steps", "40", "--repeats", "1", "--batch-sizes", "128"] if arguments.quick else []
    plan.append(("vae", "vae throughput", [python, str(HERE / "vae_throughput.py"), "--device", device, *vae]))
    psis = ["--rows", "200", "--samples", "1000", "--repeats", "3"] if arguments.quick else []
    plan.append(("psis", "psis", [python, str(HERE / "psis_speed.py"), *psis]))

    out = Path(arguments.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    with open(out / "gpu_targets.log", "w") as log:
        for part, name, command in plan:
            if arguments.only and part not in arguments.only:
                continue
            output, seconds = _run(command, CAPS[part], log)
            outcome = _last_json(output) if part in ("fit", "vsbc") else {"tail": output.strip().splitlines()[-8:]}
            summary[name] = {"wall_s": round(seconds, 1), **(outcome or {"failed": output.strip()[-400:]})}
            print(f"{name}: {json.dumps(summary[name])}", flush=True)
    (out / "gpu_targets.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
