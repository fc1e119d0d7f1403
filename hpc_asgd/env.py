"""The one reader of launcher variables (Open MPI, PMI/PMIx, SLURM, torchrun).

Nothing else in the package looks at ``os.environ`` for launch facts: the rest of the code gets
a :class:`Launch` and stays the same whether it was started by ``mpirun``, ``srun``,
``torchrun`` or as a single process (world size 1 runs the same code path).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Fault:
    """Fault injection for tests: ``HPC_ASGD_FAULT=KIND@RANK:STEP``; the process (rank or
    worker) that takes node step STEP on rank RANK raises, stops (SIGSTOP) or kills itself."""

    # "raise" | "stop" | "kill" | "killgroup" (SIGKILL to the rank's process group: the rank,
    # its fork server and its workers, as a node that dies takes them all; from a worker's
    # step) | "ckptkill" (SIGKILL while writing a checkpoint) | "nan" (the
    # step's loss is NaN, as a bad batch or an overflow makes it) | "startstop" (SIGSTOP once
    # the engine started, before its start-up exchange; STEP unused)
    kind: str
    rank: int
    step: int


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as the launcher told it."""

    launcher: str  # "mpirun" | "srun" | "torchrun" | "pmi" | "single"
    rank: int
    size: int
    local_rank: int
    local_size: int
    hostname: str
    master_addr: str | None  # torch.distributed rendezvous, when the launcher gives one
    master_port: int | None
    slurm_job_id: str | None
    fault: Fault | None
    # OMP_NUM_THREADS when set: the intra-op threads the user (or the SLURM template, from
    # --cpus-per-task) gave each rank; None: the rank takes a fair share of its cores
    threads: int | None = None
    # torchrun's agent already hosts the rendezvous store at MASTER_ADDR:MASTER_PORT
    # (TORCHELASTIC_USE_AGENT_STORE=True): every rank, rank 0 included, connects as a client
    agent_store: bool = False
    # Open MPI runs with ULFM (``mpirun --with-ft ulfm`` sets OMPI_MCA_mpi_ft_enable=1): a dead
    # rank is reported to the survivors instead of ending the job (``--min-ranks``)
    ulfm: bool = False
    # how to start this process again (the CLI's own command line): the survivors of a loss
    # start replacements with it (``--max-ranks``)
    command: tuple[str, ...] = ()
    # this process is such a replacement (``--join``, set by the survivors on its command)
    joining: bool = False

    @property
    def under_mpi(self) -> bool:
        """True when an MPI launcher (mpirun, or srun with PMI) started this process."""
        return self.launcher in ("mpirun", "pmi") or (
            self.launcher == "srun" and _mpi_pmi_present(os.environ)
        )


def _int(env: dict[str, str], *names: str) -> int | None:
    for name in names:
        # SLURM writes counts such as "2(x3)": the leading integer is the one we want.
        m = re.match(r"\d+", env.get(name) or "")
        if m:
            return int(m.group())
    return None


def _mpi_pmi_present(env: Mapping[str, str]) -> bool:
    return any(k.startswith(("PMI_", "PMIX_")) for k in env)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as ``node[03-05,07],gpu1`` -> ``node03``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def short_host(name: str) -> str:
    """``node2.cluster.local`` -> ``node2``: how summaries and error lines name a node."""
    return name.split(".", maxsplit=1)[0]


def _parse_fault(spec: str | None, rank: int = 0) -> Fault | None:
    """``KIND@RANK:STEP``, or several separated by commas (one per rank: this rank's, else
    the first), e.g. ``kill@3:30,kill@2:60`` for two losses one after the other."""
    if not spec:
        return None
    kinds = "raise|stop|killgroup|kill|ckptkill|nan|startstop"
    faults = []
    for part in spec.split(","):
        m = re.fullmatch(rf"({kinds})@(\d+):(\d+)", part.strip())
        if not m:
            raise ValueError(f"HPC_ASGD_FAULT={spec!r}: expected {kinds}@RANK:STEP[,...]")
        faults.append(Fault(m.group(1), int(m.group(2)), int(m.group(3))))
    return next((f for f in faults if f.rank == rank), faults[0])


def detect(env: dict[str, str] | None = None) -> Launch:
    """Read the launcher's variables. Precedence: Open MPI, PMIx/PMI, torchrun, SLURM, single."""
    env = dict(os.environ if env is None else env)
    base = _detect(env)
    launch = replace(
        base,
        threads=_int(env, "OMP_NUM_THREADS") or None,
        fault=_parse_fault(env.get("HPC_ASGD_FAULT"), base.rank),
        ulfm=env.get("OMPI_MCA_mpi_ft_enable", "0").lower() in ("1", "true", "yes", "ulfm"),
    )
    if launch.launcher == "torchrun":
        # torch's own env:// rendezvous makes the same test (the string torch writes is "True").
        launch = replace(launch, agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True")
    return launch


# Each launcher's variables, in precedence order: (name, present when, rank, size, local rank,
# local size), each a list of variables of which the first set one counts.
_LAUNCHERS: list[tuple[str, tuple[str, ...], list[str], list[str], list[str], list[str]]] = [
    (
        "mpirun",  # Open MPI
        ("OMPI_COMM_WORLD_RANK",),
        ["OMPI_COMM_WORLD_RANK"],
        ["OMPI_COMM_WORLD_SIZE"],
        ["OMPI_COMM_WORLD_LOCAL_RANK"],
        ["OMPI_COMM_WORLD_LOCAL_SIZE"],
    ),
    (
        "pmi",  # MPICH/Hydra, or srun --mpi=pmi2|pmix (then SLURM_* gives the local facts)
        ("PMI_RANK", "PMIX_RANK"),
        ["PMI_RANK", "PMIX_RANK"],
        ["PMI_SIZE", "SLURM_NTASKS", "MPI_LOCALNRANKS"],
        ["MPI_LOCALRANKID", "SLURM_LOCALID", "PMI_LOCAL_RANK"],
        ["MPI_LOCALNRANKS", "SLURM_NTASKS_PER_NODE", "PMI_LOCAL_SIZE"],
    ),
    ("torchrun", ("RANK",), ["RANK"], ["WORLD_SIZE"], ["LOCAL_RANK"], ["LOCAL_WORLD_SIZE"]),
    (
        "srun",  # srun without an MPI plugin (torch.distributed ranks)
        ("SLURM_PROCID",),
        ["SLURM_PROCID"],
        ["SLURM_NTASKS"],
        ["SLURM_LOCALID"],
        ["SLURM_NTASKS_PER_NODE"],
    ),
]


def _detect(env: dict[str, str]) -> Launch:
    host = short_host(socket.gethostname())
    job = env.get("SLURM_JOB_ID")
    port = _int(env, "MASTER_PORT")
    addr = env.get("MASTER_ADDR")
    for name, when, rank, size, local_rank, local_size in _LAUNCHERS:
        if not any(v in env for v in when) or _int(env, *size) is None:
            continue
        if name == "srun":  # no MPI to bootstrap from: the rendezvous follows from SLURM's
            if addr is None and env.get("SLURM_JOB_NODELIST"):
                addr = _first_slurm_host(env["SLURM_JOB_NODELIST"])
            if port is None and job:
                port = 20000 + int(job) % 20000
        ids = (_int(env, *v) for v in (rank, size, local_rank, local_size))
        r, n, lr, ln = (x if x is not None else d for x, d in zip(ids, (0, 1, 0, 1), strict=True))
        kind = "srun" if name == "pmi" and "SLURM_PROCID" in env else name
        return Launch(kind, r, n, lr, ln, host, addr, port, job, None)
    return Launch("single", 0, 1, 0, 1, host, addr, port, job, None)


def is_tty(stream) -> bool:
    """Progress bars only on a terminal; SLURM logs get one line per epoch."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False
