"""Start-up cost of ppvi: CPU time of ``import ppvi`` and of ``ppvi --help``, against ``import torch, pyro``.

Every case runs in a fresh interpreter (a subprocess); its CPU time is the user + system time the child used, read
from ``resource.getrusage(RUSAGE_CHILDREN)`` before and after, and the best of ``--repeats`` runs is reported (the
least disturbed by other work on the machine), with its wall-clock time beside it. One untimed run of each case
first warms the operating system's file cache, so that no case pays for reading the wheels from disk; the timed
runs then go round the cases in turn, so that a busy spell on a shared machine falls on all of them.

The targets (issue 24): ``import ppvi`` adds at most 0.3 s of CPU to ``import torch, pyro``, and ``ppvi --help``
takes under 0.5 s (CPU and wall). ``import ppvi`` loads nothing heavy (the API is imported on first use), so the
row that shows what a fit pays on top of torch and Pyro is ``import ppvi; ppvi.fit`` (and ``from ppvi import *``,
every public name).

Run: ``python benchmarks/startup.py`` (``--repeats 5`` by default).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: Runs per case; the best (least CPU) is reported.
DEFAULT_REPEATS = 5
#: The case the others are compared with: what any Pyro program pays anyway.
BASELINE = "import torch, pyro"


def cases(ppvi_script: str | None) -> dict[str, list[str]]:
    """The command line of every case, by its label."""
    python = sys.executable
    commands = {
        BASELINE: [python, "-c", "import torch, pyro"],
        "import ppvi": [python, "-c", "import ppvi"],
        "import ppvi; ppvi.fit": [python, "-c", "import ppvi; ppvi.fit"],
        "from ppvi import *": [python, "-c", "from ppvi import *"],
        "python -m ppvi --help": [python, "-m", "ppvi", "--help"],
    }
    if ppvi_script is not None:
        commands["ppvi --help"] = [ppvi_script, "--help"]
        commands["ppvi fit --help"] = [ppvi_script, "fit", "--help"]
    return commands


def measure(command: list[str]) -> tuple[float, float]:
    """CPU seconds (user + system) and wall seconds of one run of ``command`` in a subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main(argv: list[str] | None = None) -> None:
    """Measure every case and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"runs per case (default {DEFAULT_REPEATS})")
    arguments = parser.parse_args(argv)
    # The console script installed beside this interpreter (pip install -e . puts it there).
    script = shutil.which("ppvi", path=str(Path(sys.executable).parent))
    commands = cases(script)
    for command in commands.values():
        measure(command)  # warm the file cache
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
    for _ in range(arguments.repeats):  # round robin: a busy spell on the machine slows every case alike
        for label, command in commands.items():
            runs[label].append(measure(command))
    results = {label: min(times) for label, times in runs.items()}
    baseline = results[BASELINE][0]
    print(f"best of {arguments.repeats}, {sys.executable} (Python {sys.version.split()[0]})")
    print(f"{'case':<26} {'CPU s':>7} {'wall s':>7} {'CPU over ' + BASELINE:>28}")
    for label, (cpu, wall) in results.items():
        extra = "" if label == BASELINE else f"{cpu - baseline:+.3f}"
        print(f"{label:<26} {cpu:>7.3f} {wall:>7.3f} {extra:>28}")


if __name__ == "__main__":
    main()
