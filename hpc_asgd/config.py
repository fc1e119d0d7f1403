"""Typed run configuration, validated once, on every rank, before any collective.

One dataclass per component; their field names are unique and ARE the command-line flags
(``batch_size`` <-> ``--batch-size``) and the keys of a ``--config`` TOML file, so the CLI,
preset files and ``summary.json["config"]`` always agree. Precedence: flag > file > default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from hpc_asgd import delays, plugins
from hpc_asgd.errors import ConfigError
from hpc_asgd.registry import SYNCHRONIZERS, UPDATE_RULES

FILE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet")  # need --data-dir
SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adamw")
DEVICES = ("cpu", "cuda")
BUDGETS = ("job", "rank")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


MAX_CONFIG_BYTES = 1 << 20  # a --config file larger than this is not a configuration


def _owners() -> dict[str, str]:
    """{field name: its section}."""
    return {f.name: sec for sec, klass in SECTIONS.items() for f in fields(klass)}


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(name: object, limit: int = 40) -> str:
    """A key or path as one printable line: as it is when plain, else quoted and escaped."""
    text = str(name)
    if not re.fullmatch(r"[\w.\-/ ]*", text, flags=re.ASCII) or not text:
        text = ascii(text)
    return _clip(text, limit)


def _did_you_mean(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _number(v: Any) -> float:
    """A float from an int or float, never from a bool (or a string: flags are typed)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError
    return float(v)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\"} | {
    chr(c): f"\\u{c:04x}" for c in (*range(0x20), 0x7F) if c != 0x09
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):  # a TOML basic string: quote, backslash, controls escaped
        return '"' + "".join(_TOML_ESCAPES.get(c, c) for c in v) + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {type(v).__name__}")


@dataclass
class DataConfig:
    dataset: str = _f(
        "digits",
        "digits | mnist | fashion-mnist | cifar10 | cifar100 | imagenet | synthetic | "
        "module:function, your own: load(data_dir, seed) -> (train, test[, num_classes]), "
        "each split (x, y) tensors or a map-style Dataset of (x, y)",
    )
    data_dir: str | None = _f(None, "folder with the dataset's official files")
    download: bool = _f(False, "download the dataset into --data-dir if it is missing")
    verify: bool = _f(
        True,
        "check official files against their checksums",
        flag="--no-verify",
        flag_help="skip the checksum check (your own files in an official format)",
    )
    batch_size: int = _f(32, "minibatch size per worker")
    synthetic_size: int = _f(50_000, "samples per epoch of the synthetic dataset")


@dataclass
class ModelConfig:
    model: str = _f(
        "mlp",
        "mlp | cnn | lenet | resnet20 | resnet32 | resnet56 | resnet18 | wrn16_8 | resnet50 | "
        "module:function, your own: build(input_shape, num_classes) -> torch.nn.Module",
    )
    loss: str = _f(
        "cross-entropy",
        "cross-entropy | module:function, your own: loss(output, target) -> the batch's mean",
    )


@dataclass
class OptimConfig:
    optimizer: str = _f(
        "sgd", "inner optimizer: sgd | adamw (its state private to each worker and rank)"
    )
    lr: float = _f(0.1, "peak learning rate")
    momentum: float = _f(0.0, "SGD momentum (private to each worker and rank)")
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(0.0, "weight decay: L2 with sgd, decoupled with adamw")
    adam_betas: tuple[float, ...] = _f((0.9, 0.999), "adamw: beta1 beta2")
    adam_eps: float = _f(1e-8, "adamw: epsilon")
    lr_schedule: str = _f("constant", "constant | step | cosine")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs")
    warmup_lr: float | None = _f(None, "learning rate at the start of warm-up (default lr/10)")
    lr_milestones: tuple[float, ...] = _f(
        (), "epochs at which the step schedule multiplies by --lr-gamma"
    )
    lr_gamma: float = _f(0.1, "factor of the step schedule")


@dataclass
class SyncConfig:
    algo: str = _f("none", "across ranks: none | sync | local-sgd | local-async | lasgd | hier-avg")
    period: int = _f(1, "K: local steps between averaging rounds (local-sgd, local-async, lasgd)")
    post_local_epochs: float = _f(0.0, "average every step (K=1) for the first E0 epochs")
    group_size: int = _f(0, "S: ranks per averaging group (hier-avg); 0 = the ranks of one node")
    local_period: int = _f(1, "K1: steps between group averages (hier-avg)")
    global_period: int = _f(1, "K2: group averages between global averages (hier-avg)")
    hier_mode: str = _f(
        "blocking", "hier-avg: blocking (the paper) | nonblocking (delta correction)"
    )
    outer_lr: float = _f(
        1.0,
        "outer optimizer of the rounds (SlowMo, DiLoCo; local-sgd, local-async, lasgd and "
        "hier-avg's global rounds): its lr on the pseudo-gradient x_g - mean; lr 1 with "
        "momentum 0 is plain averaging. Keeps the global model x_g: one extra copy of the "
        "parameters per rank, two with --outer-momentum",
    )
    outer_momentum: float = _f(0.0, "outer optimizer's momentum (DiLoCo: 0.9, SlowMo: 0.5)")
    outer_nesterov: bool = _f(False, "outer optimizer's Nesterov momentum (DiLoCo's)")
    avg_dtype: str = _f(
        "fp32",
        "the global rounds' payload: fp32 (the model) | bf16 | fp16 (the change since the "
        "last global model in 16 bits, with error feedback; keeps 2.5 extra copies of the "
        "parameters per rank; the final average stays fp32)",
    )
    keep_training: bool = _f(
        False,
        "non-blocking algorithms: a rank that has taken its steps keeps training (extra "
        "steps, averaged in by the rounds) until the slowest rank has taken its own",
    )


@dataclass
class WorkerConfig:
    update: str = _f("hogwild", "inside a rank: hogwild | locked | leashed | partitioned")
    workers: int = _f(1, "W: worker processes per rank sharing one model")
    persistence: int = _f(
        0,
        "B: Leashed-SGD CAS tries (the first included) before a gradient is dropped; 0 = unbounded",
    )
    partition_after_epochs: float = _f(1.0, "partitioned: full steps only before this epoch")
    max_staleness: int = _f(
        0, "hogwild / locked: drop a gradient computed more than S updates ago; 0 = never"
    )
    threads_per_worker: int = _f(0, "intra-op threads of each worker; 0 = the rank's cores / W")
    spawn_workers: bool = _f(
        False, "run W = 1 in a worker process too (without it, W = 1 runs in the rank's own)"
    )


@dataclass
class RunConfig:
    comm: str = _f("auto", "engine: auto | mpi | gloo | nccl | horovod | local")
    comm_timeout: float = _f(300.0, "deadline in seconds on every collective wait")
    epochs: float = _f(1.0, "passes over the training set (see --budget)")
    budget: str = _f(
        "job",
        "job: the ranks together take --epochs passes over the whole training set, so with "
        "a non-blocking --algo a fast rank trains on instead of idling while a slow one "
        "finishes, and the LR schedule follows the job's progress; rank: each rank takes "
        "exactly --epochs passes over its shard (reproducible step for step)",
    )
    time_budget: float = _f(
        0.0,
        "minutes of wall time from the first step after which training ends, whatever "
        "--epochs says (non-blocking algorithms and none; 0: off)",
    )
    seed: int = _f(0, "seed of the model initialisation and the data order")
    device: str = _f("cpu", "cpu | cuda")
    eval_every: float = _f(1.0, "epochs between evaluations")
    out: str | None = _f(None, "output folder for summary.json, metrics.jsonl, model.pt")
    tensorboard: str | None = _f(
        None,
        "rank 0 writes TensorBoard scalars to this folder at every evaluation and at the end "
        "(needs the log extra: pip install 'hpc_asgd[log]')",
    )
    slow_rank: int = _f(-1, "straggler injection: this rank's steps are slowed")
    slow_factor: float = _f(1.0, "straggler injection: the slow rank's steps take F times as long")
    delay: str = _f(
        "",
        "random delay after every step of every rank and worker: exp:MEAN_MS or "
        "lognormal:MEAN_MS[:SIGMA] (sigma of log(delay), default 1); seeded from --seed, rank "
        "and worker, apart from the training RNG",
    )
    pause_rank: int = _f(-1, "one-off pause (a node hiccup): this rank pauses once (-1: none)")
    pause_at: int = _f(
        0,
        "the pause comes after the work of this node step (1-based, as --stop-at-step counts); "
        "with W workers, the worker that takes that step pauses",
    )
    pause_s: float = _f(0.0, "the pause's length in seconds")
    checkpoint_dir: str | None = _f(None, "folder of checkpoints; enables USR1 preemption handling")
    checkpoint_every: int = _f(0, "checkpoint every N node steps (0: off)")
    checkpoint_minutes: float = _f(0.0, "checkpoint every M minutes (0: off)")
    check_every: int = _f(200, "node steps between the ranks' checks for USR1 and the timer")
    check_seconds: float = _f(
        20.0,
        "seconds between those checks as well, whatever the step time (SLURM warns 120 s ahead)",
    )
    resume: str | None = _f(
        None, "'auto' (newest checkpoint in --checkpoint-dir, if any) or a folder"
    )
    stop_at_step: int = _f(
        0, "checkpoint and stop at this node step, as a preemption does (0: off)"
    )
    force_resume: bool = _f(
        False, "resume from a checkpoint even if another configuration wrote it"
    )
    min_ranks: int = _f(
        0,
        "keep training while at least M ranks live: a rank that dies is dropped and the "
        "survivors shrink the job, average their models and take its remaining steps (MPI "
        "with ULFM: mpirun --with-ft ulfm; lasgd, local-async, local-sgd, blocking hier-avg, "
        "sync, none; any W); 0: the world size (a lost rank ends the job)",
    )
    max_ranks: int = _f(
        0,
        "with --min-ranks: after a loss the survivors start replacements (MPI_Comm_spawn on "
        "mpirun's free slots) until the job has M ranks again; each receives the current model "
        "from a live rank and trains on (blocking synchronisers, W = 1); 0: none",
    )
    max_nonfinite: int = _f(
        3,
        "steps with a non-finite loss or gradient tolerated per rank (each is skipped before "
        "it reaches the model); one more ends the job",
    )


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "sync": SyncConfig,
    "workers": WorkerConfig,
    "run": RunConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "config") -> Config:
        """Build from ``{field: value}``; unknown keys are an error naming them."""
        owner = _owners()
        unknown = sorted(set(values) - set(owner))
        if unknown:
            hint = _did_you_mean(unknown[0], owner)
            names = ", ".join(_shown(u) for u in unknown)
            raise ConfigError(f"{source}: unknown field(s) {names}{hint}")
        parts: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
        for key, value in values.items():
            parts[owner[key]][key] = value
        cfg = cls(**{sec: SECTIONS[sec](**kw) for sec, kw in parts.items()})
        cfg._coerce(source)
        return cfg

    @staticmethod
    def read_file(path: str) -> dict[str, Any]:
        """A TOML file of field names: at the top level, or in the table of their section
        (``[sync] period = 8``). Strict: an unknown table or key (with a "did you mean"), a key
        in another section's table, a key given twice, a table inside a table, and a file
        too large or nested too deeply are refused with one line."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {_shown(path, 200)}")
        where = f"--config {_shown(path, 200)}"
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: {size} bytes: too large for a configuration (1 MiB)")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}: not valid TOML: {e}") from e
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to be a configuration") from None
        owner = _owners()
        flat: dict[str, Any] = {}
        given: dict[str, str] = {}  # field -> where it was set (for "given twice")
        for key, value in raw.items():
            if isinstance(value, dict):
                if key not in SECTIONS:
                    raise ConfigError(
                        f"{where}: unknown table [{_shown(key)}]{_did_you_mean(key, SECTIONS)} "
                        f"(tables: {', '.join(SECTIONS)}; or the keys at the top level)"
                    )
                items = [(f"[{key}] {_shown(k)}", k, v, key) for k, v in value.items()]
            else:
                items = [(_shown(key), key, value, "")]
            for place, k, v, table in items:
                name = k.replace("-", "_")
                if isinstance(v, dict):
                    raise ConfigError(f"{where}: {place}: a table inside a table")
                if name not in owner:
                    raise ConfigError(f"{where}: unknown key {place}{_did_you_mean(name, owner)}")
                if table and owner[name] != table:
                    raise ConfigError(f"{where}: {place}: {name} belongs in [{owner[name]}]")
                if name in given:
                    raise ConfigError(f"{where}: {name} given twice ({given[name]}, {place})")
                flat[name], given[name] = v, place
        return flat

    def to_toml(self) -> str:
        """This configuration as a TOML file that ``read_file`` reads back equal: one table
        per section (None fields, unset, are left out)."""
        lines: list[str] = []
        for sec in SECTIONS:
            lines.append(f"[{sec}]")
            for key, value in dataclasses.asdict(getattr(self, sec)).items():
                if value is not None:
                    lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def _coerce(self, source: str) -> None:
        """Check every field's type strictly (TOML and flags give str/int/float/bool/list): a
        bool is not a number (``epochs = true``), a number is not a string."""
        for sec in SECTIONS:
            obj = getattr(self, sec)
            for f in fields(obj):
                value = getattr(obj, f.name)
                typ = str(f.type)
                try:
                    if value is None and "None" in typ:
                        continue
                    if typ.startswith("tuple"):
                        if isinstance(value, str | bytes | dict):
                            raise TypeError
                        value = tuple(_number(v) for v in value)
                    elif typ.startswith("bool"):
                        if not isinstance(value, bool):
                            raise TypeError
                    elif typ.startswith("int"):
                        if isinstance(value, bool) or float(value) != int(value):
                            raise TypeError
                        value = int(value)
                    elif typ.startswith("float"):
                        value = _number(value)
                    elif typ.startswith("str"):
                        if not isinstance(value, str | os.PathLike):
                            raise TypeError
                        value = str(value)
                except (TypeError, ValueError, OverflowError):
                    raise ConfigError(
                        f"{source}: {f.name} = {_clip(repr(value), 60)} is not of type {typ}"
                    ) from None
                setattr(obj, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{field: value}`` (lists for tuples): JSON- and ``weights_only``-safe."""
        out: dict[str, Any] = {}
        for sec in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, sec)).items():
                out[key] = list(value) if isinstance(value, tuple) else value
        return out

    # ---- validation ----------------------------------------------------------------------
    def validate(self, world_size: int, local_size: int = 1) -> None:
        """Every rule that can be checked without a collective. Same verdict on every rank."""
        from hpc_asgd.comm import ENGINES
        from hpc_asgd.data import DATASETS
        from hpc_asgd.data.registry import TRAIN_SIZES
        from hpc_asgd.models import MODELS
        from hpc_asgd.shard import ShardSampler

        d, o, s, w, r = self.data, self.optim, self.sync, self.workers, self.run
        for sec in SECTIONS:  # inf and nan slip through every comparison below, or overflow
            for f in fields(getattr(self, sec)):
                value = getattr(getattr(self, sec), f.name)
                for v in value if isinstance(value, tuple) else (value,):
                    if isinstance(v, float) and not math.isfinite(v):
                        raise ConfigError(f"{f.name}: must be a finite number, got {v}")
        m = self.model
        for name, value, choices in (
            ("dataset", d.dataset, DATASETS),
            ("model", m.model, MODELS),
            ("loss", m.loss, plugins.LOSSES),
        ):
            if plugins.is_spec(value):
                plugins.check_spec(name, value)
            else:
                _choice(name, value, choices)
        _choice("optimizer", o.optimizer, OPTIMIZERS)
        _choice("algo", s.algo, SYNCHRONIZERS.names())
        _choice("update", w.update, UPDATE_RULES.names())
        _choice("lr_schedule", o.lr_schedule, SCHEDULES)
        _choice("device", r.device, DEVICES)
        _choice("comm", r.comm, ENGINES)
        _choice("hier_mode", s.hier_mode, ("blocking", "nonblocking"))
        _choice("avg_dtype", s.avg_dtype, ("fp32", "bf16", "fp16"))
        _choice("budget", r.budget, BUDGETS)
        positive_ints = {
            "batch_size": d.batch_size,
            "period": s.period,
            "local_period": s.local_period,
            "global_period": s.global_period,
            "workers": w.workers,
            "synthetic_size": d.synthetic_size,
        }
        for name, value in positive_ints.items():
            if value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value}")
        positive = {
            "lr": o.lr,
            "epochs": r.epochs,
            "comm_timeout": r.comm_timeout,
            "eval_every": r.eval_every,
            "check_seconds": r.check_seconds,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
        # a batch larger than a rank's shard: no step per epoch (known here, before the engine)
        size = d.synthetic_size if d.dataset == "synthetic" else TRAIN_SIZES.get(d.dataset)
        if size is not None:
            ShardSampler.check_fits(size, world_size, d.batch_size)
        non_negative = {
            "momentum": o.momentum,
            "weight_decay": o.weight_decay,
            "warmup_epochs": o.warmup_epochs,
            "post_local_epochs": s.post_local_epochs,
            "persistence": w.persistence,
            "group_size": s.group_size,
            "threads_per_worker": w.threads_per_worker,
            "partition_after_epochs": w.partition_after_epochs,
            "checkpoint_every": r.checkpoint_every,
            "checkpoint_minutes": r.checkpoint_minutes,
            "stop_at_step": r.stop_at_step,
            "time_budget": r.time_budget,
            "min_ranks": r.min_ranks,
            "max_ranks": r.max_ranks,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name}: must be >= 0, got {value}")
        if o.momentum >= 1:
            raise ConfigError(f"momentum: must be below 1, got {o.momentum}")
        if o.nesterov and not o.momentum:
            raise ConfigError("nesterov: needs --momentum > 0")
        if o.optimizer == "adamw":
            if o.momentum or o.nesterov:
                raise ConfigError(
                    "momentum: adamw has no --momentum (its betas are --adam-betas); add "
                    "--momentum 0 where a --config preset sets one"
                )
            if len(o.adam_betas) != 2 or not all(0 <= b < 1 for b in o.adam_betas):
                raise ConfigError(f"adam_betas: two numbers in [0, 1), got {list(o.adam_betas)}")
            if not o.adam_eps > 0:
                raise ConfigError(f"adam_eps: must be positive, got {o.adam_eps}")
        outer = s.outer_lr != 1.0 or s.outer_momentum or s.outer_nesterov
        for name, asked in (("outer_lr", outer), ("avg_dtype", s.avg_dtype != "fp32")):
            if asked and not SYNCHRONIZERS.get(s.algo).outer_step:
                able = [n for n, c in SYNCHRONIZERS.items() if c.outer_step]
                raise ConfigError(
                    f"{name}: only for the model-averaging rounds ({', '.join(able)}); "
                    f"{s.algo!r} has none"
                )
        if s.avg_dtype == "bf16" and r.comm == "horovod":
            raise ConfigError(
                "avg_dtype: Horovod 0.28 has no bfloat16 allreduce; use --avg-dtype fp16, "
                "or another --comm"
            )
        if outer:
            from hpc_asgd.sync.outer import OuterSGD

            OuterSGD(s.outer_lr, s.outer_momentum, s.outer_nesterov)  # its own checks
        if w.max_staleness < 0:
            raise ConfigError(f"max_staleness: must be >= 0, got {w.max_staleness}")
        algo, rule = SYNCHRONIZERS.get(s.algo), UPDATE_RULES.get(w.update)
        algo.validate(self, world_size, local_size)  # each algorithm's own rules
        rule.validate(self)
        if s.keep_training and not algo.keeps_training(self):
            from hpc_asgd.sync import keep_training_refused

            raise keep_training_refused(s.algo)
        if s.keep_training and r.budget == "job":
            raise ConfigError(
                "keep_training: --budget job (the default) already keeps every rank training "
                "until the job's budget is spent; --keep-training is for --budget rank"
            )
        if r.time_budget and s.algo != "none" and not _non_blocking(self):
            raise ConfigError(
                f"time_budget: {s.algo!r} meets its peers at fixed node steps, so its ranks "
                "cannot stop at different ones; use a non-blocking algorithm or none"
            )
        if s.keep_training and o.lr_schedule == "cosine":
            raise ConfigError(
                "keep_training: the cosine schedule ends at lr 0, so the steps past --epochs "
                "would not move the model; use a constant or step schedule"
            )
        if r.min_ranks > world_size:
            raise ConfigError(
                f"min_ranks: {r.min_ranks} is more than the job's {world_size} rank(s)"
            )
        if r.max_ranks and not 0 < r.min_ranks < world_size:
            raise ConfigError(
                "max_ranks: replacements follow a loss that the job survives: set --min-ranks "
                f"below the job's {world_size} rank(s) too"
            )
        if r.max_ranks > world_size:
            raise ConfigError(
                f"max_ranks: {r.max_ranks} is more than the job's {world_size} rank(s) (a "
                "replacement takes a lost rank's place)"
            )
        if r.slow_rank >= world_size:
            raise ConfigError(f"slow_rank: {r.slow_rank} is not a rank of a {world_size}-rank job")
        if r.check_every <= 0:
            raise ConfigError(f"check_every: must be a positive integer, got {r.check_every}")
        wants_dir = (
            r.checkpoint_every or r.checkpoint_minutes or r.stop_at_step or r.resume == "auto"
        )
        if wants_dir and not r.checkpoint_dir:
            raise ConfigError("checkpoint_dir: checkpoints and --resume auto need --checkpoint-dir")
        if r.slow_factor < 1:
            raise ConfigError(f"slow_factor: must be >= 1, got {r.slow_factor}")
        delays.validate(self, world_size)
        if d.dataset in FILE_DATASETS and not d.data_dir:
            raise ConfigError(f"data_dir: dataset {d.dataset!r} needs --data-dir")
        if r.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device: 'cuda' asked for, but torch sees no CUDA GPU")

    def check_factories(self) -> None:
        """Your own model, dataset and loss (``module:function``), before any engine starts:
        each imports and builds, and the model's output fits the dataset and the loss (one
        forward pass of two samples), so that a bad one is one line and exit status 2."""
        from hpc_asgd.models import check_model

        m, d = self.model, self.data
        if not any(map(plugins.is_spec, (m.model, d.dataset, m.loss))):
            return
        check_model(m.model, d.dataset, d.data_dir, m.loss, self.run.seed)

    def check_paths(self) -> None:
        """The file-system half of validation, before any engine starts: folders that must
        exist do, and the output folders can be written (created if missing, then probed),
        so that a run never trains for hours to fail at its first write."""
        d, r = self.data, self.run
        # digits and synthetic read no files: a --data-dir given to them (a sweep may) is unused
        if d.dataset in FILE_DATASETS and not d.download and not Path(d.data_dir or "").is_dir():
            raise ConfigError(f"data_dir: no such folder {d.data_dir} (add --download?)")
        if r.resume not in (None, "auto") and not (Path(r.resume) / "manifest.json").is_file():
            raise ConfigError(
                f"resume: {r.resume} is not a committed checkpoint folder (no manifest.json); "
                "give a step-NNNNNNNNN folder or 'auto'"
            )
        for name, folder in (
            ("out", r.out),
            ("checkpoint_dir", r.checkpoint_dir),
            ("tensorboard", r.tensorboard),
        ):
            if folder:
                _probe_write(name, Path(folder))
        if r.tensorboard:
            from hpc_asgd.board import check_installed

            check_installed()


def _non_blocking(cfg: Config) -> bool:
    """Whether the algorithm's ranks may take different numbers of node steps."""
    try:
        return SYNCHRONIZERS.get(cfg.sync.algo).keeps_training(cfg)
    except ConfigError:  # a blocking mode of it
        return False


def shares_budget(cfg: Config, world_size: int) -> bool:
    """Whether the ranks share the job's step budget (``--budget job``): a non-blocking
    algorithm and more than one rank (otherwise every rank takes its own steps anyway)."""
    return cfg.run.budget == "job" and world_size > 1 and _non_blocking(cfg)


def _probe_write(name: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"{name}: cannot write to {folder} ({e.strerror or type(e).__name__})"
        ) from None


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {', '.join(choices)}")
