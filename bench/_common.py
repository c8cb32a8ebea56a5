"""Shared helpers for the benchmark scripts: a beets config dir, timed child processes, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_EMOTIFY = ROOT.parent / "shared" / "data" / "emotify"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # measure the working tree's plugin, not an installed copy

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def write_config(beetsdir: Path, model_dir, extra: str = "") -> Path:
    """config.yaml for a temp library in ``beetsdir`` with the crnn plugin and ``model_dir``'s model."""
    beetsdir.mkdir(parents=True, exist_ok=True)
    (beetsdir / "config.yaml").write_text(
        textwrap.dedent(
            f"""\
            directory: {beetsdir / 'lib'}
            library: {beetsdir / 'library.db'}
            plugins: crnn
            import:
              copy: no
              write: no
              autotag: no
            crnn:
              model: {model_dir}
            """
        )
        + extra
    )
    return beetsdir / "library.db"


def beets_env(beetsdir: Path) -> dict:
    env = dict(os.environ)
    env["BEETSDIR"] = str(beetsdir)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class Run:
    """A finished child process: wall seconds, peak RSS (bytes), CPU seconds, exit code, output."""

    def __init__(self, argv, wall, rss, cpu, rc, stdout, stderr):
        self.argv, self.wall, self.rss, self.cpu, self.rc = argv, wall, rss, cpu, rc
        self.stdout, self.stderr = stdout, stderr

    def check(self) -> "Run":
        if self.rc != 0:
            raise SystemExit(f"{' '.join(map(str, self.argv))} failed ({self.rc}):\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}")
        return self


# A tiny middle process runs each command: Linux carries a process's peak RSS across fork+exec,
# so a child forked straight from a benchmark holding a large library in memory would report
# the benchmark's peak, not its own. Children of this small spawner start from its ~10 MB.
_SPAWNER = """
import json, os, subprocess, sys, time
out = sys.argv[1]
t = time.perf_counter()
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t
p.returncode = os.waitstatus_to_exitcode(status)
with open(out, "w") as f:
    json.dump({"wall": wall, "rss": ru.ru_maxrss * 1024, "cpu": ru.ru_utime + ru.ru_stime, "rc": p.returncode}, f)
"""


def run_timed(argv, env=None, cwd=None, timeout=None) -> Run:
    """Run a command as a fresh process: its wall time, its own peak RSS and CPU time (via wait4)."""
    argv = [str(a) for a in argv]
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        stats = os.path.join(tmp, "stats.json")
        with open(os.path.join(tmp, "out"), "w+b") as out, open(os.path.join(tmp, "err"), "w+b") as err:
            proc = subprocess.run([sys.executable, "-c", _SPAWNER, stats, *argv], env=env, cwd=cwd, stdout=out,
                                  stderr=err, stdin=subprocess.DEVNULL, timeout=timeout)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        if proc.returncode != 0 or not os.path.exists(stats):
            return Run(argv, float("nan"), 0, 0.0, proc.returncode or 1, stdout, stderr)
        with open(stats) as f:
            st = json.load(f)
    return Run(argv, st["wall"], st["rss"], st["cpu"], st["rc"], stdout, stderr)


def beet(beetsdir: Path, *args, python_flags=(), timeout=None) -> Run:
    return run_timed([sys.executable, *python_flags, "-m", "beets", *args], env=beets_env(beetsdir), timeout=timeout)


def self_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mib(n_bytes) -> float:
    return n_bytes / 2**20


def table(rows, headers) -> str:
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(c) -> str:
    if isinstance(c, float):
        if c == 0:
            return "0"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        if abs(c) >= 0.1:
            return f"{c:.2f}"
        return f"{c:.3g}"
    return str(c)


def machine() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {"cores": cores, "nice": os.nice(0), "loadavg_1m": load, "python": sys.version.split()[0]}


def print_json(record: dict) -> None:
    print(json.dumps(record, sort_keys=False, default=_json_default))


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)
