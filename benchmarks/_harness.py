"""What every benchmark shares: child jobs run as a process group of their own, other jobs'
CPU use and the retry of disturbed runs, rotated repeats, medians and paired ratios, options,
Markdown tables, and the report (header, strict JSON, Markdown); see benchmarks/README.md.

Importing this module puts the repository root on ``sys.path``: the checkout's ``hpc_asgd``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def cores() -> int:
    return len(os.sched_getaffinity(0))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- other jobs on a shared machine ---------------------------------------------------------
def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, every core): /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its waited-for descendants (the benchmark's jobs)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class Foreign:
    """Cores used by other jobs (not this process tree) between construction and ``cores()``."""

    def __init__(self) -> None:
        self.b0, self.c0, self.t0 = _machine_busy_s(), _own_cpu_s(), time.monotonic()

    def cores(self) -> float:
        dt = max(time.monotonic() - self.t0, 1e-9)
        return max(0.0, (_machine_busy_s() - self.b0) - (_own_cpu_s() - self.c0)) / dt


def wait_idle(max_wait_s: float, threshold: float) -> float:
    """Wait (at most ``max_wait_s``) until other jobs use fewer than ``threshold`` cores over
    0.5 s; returns the last reading (NaN without /proc/stat)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        probe = Foreign()
        time.sleep(0.5)
        busy = probe.cores()
        if not busy >= threshold or time.monotonic() > deadline:
            return busy


def quietest(run, retries: int, max_foreign: float, wait_s: float, label: str, key: str) -> dict:
    """``run()`` again (up to ``retries`` times) while other jobs used more than ``max_foreign``
    cores; keeps the least disturbed result, adding ``key``, ``attempts``, ``kept_attempt``."""
    best = None
    for attempt in range(1, retries + 2):
        if wait_s > 0:
            wait_idle(wait_s, max_foreign)
        probe = Foreign()
        res = run()
        if "error" in res:
            best = best or res
            best["attempts"] = attempt
            return best
        foreign = probe.cores()
        res[key] = round(foreign, 3) if math.isfinite(foreign) else None
        res["kept_attempt"] = attempt
        if best is None or (res[key] is not None and res[key] < best[key]):
            best = res
        best["attempts"] = attempt
        if not foreign > max_foreign:
            break
        print(f"    {label}: other jobs used {foreign:.2f} cores during the run; "
              + ("retrying" if attempt <= retries else "keeping the least disturbed run"),
              flush=True)  # fmt: skip
    return best


def disturbance(runs: list[dict], key: str = "foreign_cores") -> dict:
    """How much other jobs used the machine during the kept runs (``quietest``)."""
    foreign = [r[key] for r in runs if r.get(key) is not None]
    return {
        "runs": len(runs),
        "retried": sum(r.get("attempts", 1) > 1 for r in runs),
        "median_foreign_cores": median(foreign),
        "max_foreign_cores": max(foreign) if foreign else None,
    }


def disturbance_line(report: dict) -> str:
    d, a = report["disturbance"], report["args"]
    if d["median_foreign_cores"] is None:
        return "Other jobs' CPU use could not be read (/proc/stat)."
    return (
        f"Other jobs on the machine during the kept runs: median {d['median_foreign_cores']:.2f}, "
        f"max {d['max_foreign_cores']:.2f} cores; {d['retried']} of {d['runs']} runs were "
        f"retried because they exceeded {a['max_foreign']} cores (up to {a['retries']} "
        "retries, the least disturbed attempt kept)."
    )


# flag, default, help: the retry of disturbed runs (``guarded``)
GUARD = (
    ("--max-foreign", 0.15, "retry a run in which other jobs used more cores than this"),
    ("--retries", 2, "retries of a disturbed run"),
    ("--idle-wait", 20.0, "seconds to wait before a run for other jobs to fall below that"),
)
OUT = ("--out", "benchmarks/results", "relative to the repository")
MPIRUN = ("--mpirun", None, "mpirun to use (default: the venv's, or PATH)")


def options(p, *specs) -> None:
    """``p.add_argument`` for each (flag, default[, help]): the type is the default's (str
    for None), and a False default makes a bare flag."""
    for flag, default, *text in specs:
        kind = {"type": str if default is None else type(default)}
        if default is False:
            kind = {"action": "store_true"}
        p.add_argument(flag, default=default, help=text[0] if text else None, **kind)


def guarded(run, args, label: str) -> dict:
    """``quietest`` with the ``add_guard_args`` options."""
    return quietest(run, args.retries, args.max_foreign, args.idle_wait, label, "foreign_cores")


# ---- repeats and statistics -----------------------------------------------------------------
def rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k``: repeat r runs the contenders from the r-th on."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def sweep(args, contenders, run, show) -> tuple[dict, dict]:
    """``run(model, W, contender)`` each repeat, in an order rotated by repeat + W: returns
    ``{model: {W: {contender: [result per repeat]}}}`` and the runs' ``disturbance``."""
    raw = {m: {str(w): {c: [] for c in contenders} for w in args.workers} for m in args.models}
    for rep in range(args.repeats):
        for model in args.models:
            for w in args.workers:
                for c in rotated(list(contenders), rep + w):
                    res = run(model, w, c)
                    raw[model][str(w)][c].append(res)
                    print(f"  repeat {rep + 1}/{args.repeats} {model} W={w} {c}: {show(res)}",
                          flush=True)  # fmt: skip
    runs = [r for by_w in raw.values() for row in by_w.values() for v in row.values() for r in v]
    return raw, disturbance(runs)


def median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def paired(a: list, b: list) -> float | None:
    """Median over repeats of the per-repeat ratio a / b (both timed in the same repeat)."""
    return median([x / y for x, y in zip(a, b, strict=False) if x is not None and y])


def fmt(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table(head: list[str], rows, align: str) -> list[str]:
    """Markdown table lines; ``align`` is l(eft) or r(ight) per column, its last letter
    repeated for the remaining columns."""
    align += align[-1] * (len(head) - len(align))
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "".join(f"---{':' * (c == 'r')}|" for c in align),
    ]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def strict_json(v):
    """``v`` with every inf / nan (a diverged run's losses) as None: standard JSON."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [strict_json(x) for x in v]
    return v


# ---- the report -------------------------------------------------------------------------------
def new_report(name: str, argv: list[str], args) -> dict:
    command = shlex.join(["python", f"benchmarks/{name}.py", *argv])
    print(f"{name} benchmark: {command}", flush=True)
    return {
        "benchmark": name,
        "command": command,
        "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cores_usable": cores(),
        "load_before": load_average(),
        "t0": time.monotonic(),
    }


def out_dir(out: str) -> Path:
    path = ROOT / out  # an absolute --out stays as given
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_report(report: dict, markdown, stem: str, mpi: bool = False) -> None:
    """Finish ``report`` (versions, load after, wall time), write ``<out>/<stem>.json`` and
    ``<out>/<stem>.md`` and print the Markdown."""
    report["versions"] = versions(mpi)
    report["load_after"] = load_average()
    report["wall_s"] = round(time.monotonic() - report.pop("t0"), 1)
    folder = out_dir(report["args"]["out"])
    text = json.dumps(strict_json(report), indent=2, allow_nan=False)
    (folder / f"{stem}.json").write_text(text + "\n")
    md = markdown(report)
    (folder / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {folder / stem}.json and .md")


def header(report: dict, title: str) -> list[str]:
    """The Markdown title, command and provenance line every result file starts with."""
    v = report["versions"]
    mpi = f"mpi4py {v['mpi4py']}, {v['mpi_library'].split(',')[0]}, " if "mpi4py" in v else ""
    return [
        f"# {title}",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Host `{report['hostname']}`, {report['nproc']} cores ({v['cpu']}), {report['date']}; "
        f"torch {v['torch']}, {mpi}Python {v['python']}; load average before "
        f"{report['load_before']}, after {report['load_after']}; wall time {report['wall_s']} s.",
        "",
    ]


# ---- child jobs -------------------------------------------------------------------------------
def run_tree(
    cmd: list[str], timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess | None:
    """Run ``cmd`` in a session of its own, capturing its output; on a timeout (returns None)
    or any exception of ours (Ctrl-C, SIGTERM) the whole tree is killed: mpirun, its ranks,
    their spawned workers."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _kill_group(proc, only_leftovers=True)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen, only_leftovers: bool = False) -> None:
    """SIGKILL the job's process group (left-overs too: a worker its parent failed to reap)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    if not only_leftovers:
        proc.communicate()


def run_child(cmd: list[str], timeout: float, env: dict | None = None) -> str:
    """``run_tree``, leaving the benchmark with the child's output on a failure or timeout."""
    proc = run_tree(cmd, timeout, env)
    name = Path(sys.argv[0]).name
    if proc is None:
        sys.exit(f"{name}: {shlex.join(cmd)} ran past {timeout} s")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"{name}: {shlex.join(cmd)} failed (rc {proc.returncode})")
    return proc.stdout


def result_line(stdout: str, mark: str) -> dict | None:
    """The JSON a child printed after ``mark`` (its last such line)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(mark)]
    return json.loads(lines[-1][len(mark) :]) if lines else None


def train_cmd(flags: dict) -> list[str]:
    """``python -m hpc_asgd.cli train --key value ...`` (True: a bare flag; None: left out)."""
    cmd = [sys.executable, "-m", "hpc_asgd.cli", "train"]
    for k, v in flags.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v is not None and v is not False:
            cmd += [f"--{k}", str(v)]
    return cmd


# ---- MPI ----------------------------------------------------------------------------------------
def mpirun_exe(given: str | None) -> str:
    for cand in (given, Path(sys.executable).parent / "mpirun", shutil.which("mpirun")):
        if cand and Path(cand).exists():
            return str(cand)
    sys.exit(f"{Path(sys.argv[0]).name}: mpirun not found (pass --mpirun PATH)")


def mpi_env() -> dict[str, str]:
    """The environment of an ``mpirun`` job: root allowed, the venv and this checkout first."""
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # Open MPI refuses root without these
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "HPC_ASGD_FAULT"):
        env.pop(k, None)
    return env


# ---- versions ---------------------------------------------------------------------------------
def versions(mpi: bool = False) -> dict[str, str]:
    """Versions of what the figures depend on; with ``mpi``, mpi4py and the MPI library."""
    import numpy
    import torch

    import hpc_asgd

    out = {
        "hpc_asgd": hpc_asgd.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
    }
    if mpi:
        import mpi4py

        # in a child: importing mpi4py.MPI initialises MPI, which this process must not do
        code = "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
        res = run_tree([sys.executable, "-c", code], 60, mpi_env())
        lib = res.stdout if res is not None and res.returncode == 0 else "unknown"
        out["mpi4py"] = mpi4py.__version__
        out["mpi_library"] = lib.replace("\x00", "").strip()  # the C string's NUL
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---- MNIST-format data without a download (shm_scaling, leashed_repro) ------------------------
def _write_idx(path: Path, arr) -> None:
    import numpy as np

    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape))
        f.write(arr.tobytes())


def mnist_data(data_dir: str | None, tmp: Path, copies: int) -> tuple[str, str, bool]:
    """(folder, description, verify): ``--data-dir``'s MNIST, else the digits written into
    ``tmp`` (``write_mnist_like``; not checked against MNIST's checksums)."""
    if data_dir:
        return data_dir, f"MNIST from {data_dir}", True
    info = write_mnist_like(tmp / "mnist-like", copies)
    note = f"{info['source']} ({info['train']} train, {info['test']} test images, IDX files)"
    return str(tmp / "mnist-like"), note, False


def write_mnist_like(folder: Path, copies: int = 4, seed: int = 0) -> dict:
    """scikit-learn's digits as MNIST IDX files (uint8, 1x28x28): each 8x8 digit is upscaled
    (bilinear) to 20x20 and placed in a 28x28 canvas, centred for the first copy and the test
    set, shifted by up to 2 pixels for the other ``copies - 1`` copies of the training set
    (1,437 x copies training images, 360 test images: digits' own split)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.images, bunch.target, test_size=360, stratify=bunch.target, random_state=0
    )
    rng = np.random.default_rng(seed)

    def place(x: np.ndarray, shifts: bool) -> np.ndarray:
        t = torch.from_numpy(x).float().unsqueeze(1) / 16.0
        up = F.interpolate(t, size=(20, 20), mode="bilinear", align_corners=False)
        up = (up.clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1).numpy()
        out = np.zeros((len(x), 28, 28), np.uint8)
        dy = rng.integers(2, 7, len(x)) if shifts else np.full(len(x), 4)
        dx = rng.integers(2, 7, len(x)) if shifts else np.full(len(x), 4)
        for i in range(len(x)):
            out[i, dy[i] : dy[i] + 20, dx[i] : dx[i] + 20] = up[i]
        return out

    train = np.concatenate([place(x_tr, c > 0) for c in range(copies)])
    folder.mkdir(parents=True, exist_ok=True)
    _write_idx(folder / "train-images-idx3-ubyte", train)
    _write_idx(folder / "train-labels-idx1-ubyte", np.tile(y_tr, copies))
    _write_idx(folder / "t10k-images-idx3-ubyte", place(x_te, False))
    _write_idx(folder / "t10k-labels-idx1-ubyte", y_te)
    return {"train": len(train), "test": len(x_te), "source": "sklearn digits upscaled to 28x28"}
