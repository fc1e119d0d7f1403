"""A configuration is read strictly or refused with one line (``--config`` files and flags):
no table or key is flattened away, no value changes type on the way in, and whatever is
accepted round-trips (``Config -> TOML -> Config``). Property tests with ``hypothesis``."""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpc_asgd.cli import build_parser, config_from_args
from hpc_asgd.config import MAX_CONFIG_BYTES, SECTIONS, Config
from hpc_asgd.errors import ConfigError

FIELDS = {f.name: f for klass in SECTIONS.values() for f in fields(klass)}
SETTINGS = settings(
    max_examples=int(os.environ.get("HPC_ASGD_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

REFUSED = [
    # the cases: a table that does not exist, a key given twice, a bool as a number
    ("[nonexistent]\nlr = 0.5\n", r"unknown table \[nonexistent\]"),
    ("lr = 0.01\n[optim]\nlr = 5.0\n", r"lr given twice \(lr, \[optim\] lr\)"),
    ("[x]\nlr = 5.0\n", r"unknown table \[x\]"),
    ("epochs = true\n", "epochs = True is not of type float"),
    # a "did you mean" for a misspelt table or key
    ("[optm]\nlr = 0.5\n", r"unknown table \[optm\] \(did you mean optim\?\)"),
    ("learning_rte = 0.5\n", r"unknown key learning_rte"),
    ("[sync]\nperoid = 4\n", r"unknown key \[sync\] peroid \(did you mean period\?\)"),
    # a key in the table of another section
    ("[sync]\nlr = 0.5\n", r"\[sync\] lr: lr belongs in \[optim\]"),
    ("[optim.inner]\nlr = 0.5\n", r"\[optim\] inner: a table inside a table"),
    ("[optim]\nlr = {a = 1}\n", r"\[optim\] lr: a table inside a table"),
    # strict types: no string for a number, no number for a string, no bool in a list
    ('lr = "0.1"\n', "lr = '0.1' is not of type float"),
    ("dataset = 5\n", "dataset = 5 is not of type str"),
    ("period = 2.5\n", "period = 2.5 is not of type int"),
    ('lr_milestones = "12"\n', "lr_milestones = '12' is not of type tuple"),
    ("lr_milestones = [true]\n", r"lr_milestones = \[True\] is not of type tuple"),
    ("keep_training = 1\n", "keep_training = 1 is not of type bool"),
    ("lr = 1" + "0" * 400 + "\n", r"lr = 1000.*\.\.\. is not of type float"),  # overflows
    ('algo = ["lasgd"]\n', r"algo = \['lasgd'\] is not of type str"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_a_misread_config_is_refused_with_one_line(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        Config.from_flat(Config.read_file(str(path)), source=str(path))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300, str(e.value)


def test_pathological_files_are_one_line(tmp_path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("lr = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"nested too deeply|not valid TOML"):
        Config.read_file(str(deep))
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="too large for a configuration"):
        Config.read_file(str(big))
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"lr = \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.read_file(str(binary))
    with pytest.raises(ConfigError, match="no such file"):
        Config.read_file(str(tmp_path / "absent.toml"))


def test_sections_and_the_top_level_both_read(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'algo = "local-sgd"\n[optim]\nlr = 0.4\nweight-decay = 0.001\n[sync]\nperiod = 8\n'
    )
    cfg = Config.from_flat(Config.read_file(str(path)))
    assert (cfg.sync.algo, cfg.sync.period, cfg.optim.lr) == ("local-sgd", 8, 0.4)
    assert cfg.optim.weight_decay == 0.001  # a flag's spelling is the field's


def test_the_flag_misspelt_says_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"unknown field\(s\) perod \(did you mean period\?\)"):
        Config.from_flat({"perod": 4})


# ---- properties ------------------------------------------------------------------------------

NAMES = st.sampled_from(sorted(FIELDS) + sorted(SECTIONS))
KEYS = st.one_of(NAMES, st.text(min_size=1, max_size=12))
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # TOML's integers are 64-bit
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
DOCS = st.dictionaries(
    KEYS, st.one_of(VALUES, st.dictionaries(KEYS, VALUES, max_size=5)), max_size=8
)


def _quote(s: str) -> str:
    """A TOML basic string (its own escaping, not the code's under test: \\U for the rest)."""
    plain = (c if c.isprintable() and c not in '"\\' else f"\\U{ord(c):08x}" for c in s)
    return '"' + "".join(plain) + '"'


def _toml(v) -> str:
    """A TOML value for the test's own documents."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _quote(v)
    return "[" + ", ".join(_toml(x) for x in v) + "]"


def _document(doc: dict) -> str:
    top = [f"{_quote(k)} = {_toml(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    tables = [
        f"[{_quote(k)}]\n" + "\n".join(f"{_quote(a)} = {_toml(b)}" for a, b in v.items())
        for k, v in doc.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


@SETTINGS
@given(doc=DOCS)
def test_no_toml_document_gives_anything_but_a_config_or_one_line(tmp_path, doc: dict) -> None:
    path = tmp_path / "c.toml"
    path.write_text(_document(doc), encoding="utf-8", errors="surrogatepass")
    try:
        cfg = Config.from_flat(Config.read_file(str(path)), source=str(path))
        cfg.validate(world_size=2, local_size=2)
    except ConfigError as e:
        assert "\n" not in str(e)


def _value_for(name: str):
    """Values of the field's own type (and of the others, which must be refused)."""
    typ = FIELDS[name].type
    if typ.startswith("tuple"):
        own = st.lists(st.floats(allow_nan=False, width=64), max_size=4).map(tuple)
    elif typ.startswith("bool"):
        own = st.booleans()
    elif typ.startswith("int"):
        own = st.integers(min_value=-(2**40), max_value=2**40)
    elif typ.startswith("float"):
        own = st.one_of(st.floats(allow_nan=False), st.integers(-(2**40), 2**40))
    else:
        own = st.text(max_size=16)
    return st.one_of(own, own, SCALARS)


FLATS = st.lists(st.sampled_from(sorted(FIELDS)), max_size=8, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: _value_for(n) for n in names})
)


@SETTINGS
@given(flat=FLATS)
def test_every_accepted_config_round_trips_through_toml(tmp_path, flat: dict) -> None:
    try:
        cfg = Config.from_flat(flat)
        cfg.validate(world_size=2, local_size=2)
    except ConfigError as e:
        assert "\n" not in str(e)
        assume(False)
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert Config.from_flat(Config.read_file(str(path)), source=str(path)) == cfg
    assert Config.from_flat(cfg.to_dict()) == cfg  # summary.json's config, the same way


FLAG_NAMES = sorted(
    {
        s
        for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
        for s in a.option_strings
        if s.startswith("--") and s not in ("--help", "--config")
    }
)
ARGV = st.lists(
    st.one_of(
        st.sampled_from(FLAG_NAMES),
        st.text(max_size=8),
        st.integers(-5, 10**6).map(str),
        st.floats().map(str),
    ),
    max_size=10,
)


@SETTINGS
@given(argv=ARGV)
def test_no_command_line_gives_a_traceback(argv: list[str], capsys) -> None:
    try:
        args = build_parser().parse_args(["train", *argv])
        cfg = config_from_args(args)
        cfg.validate(world_size=4, local_size=2)
    except SystemExit as e:  # argparse: its usage line and exit 2
        assert e.code == 2
    except ConfigError as e:
        assert "\n" not in str(e)
    capsys.readouterr()


def test_presets_round_trip(tmp_path) -> None:
    for path in sorted(Path(__file__).resolve().parents[2].glob("configs/*.toml")):
        cfg = Config.from_flat(Config.read_file(str(path)), source=str(path))
        (tmp_path / path.name).write_text(cfg.to_toml())
        assert Config.from_flat(Config.read_file(str(tmp_path / path.name))) == cfg, path


def test_tensorboard_asked_for_and_missing_is_one_line(tmp_path, monkeypatch) -> None:
    import importlib.util

    from hpc_asgd import board

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a)
    )
    cfg = Config.from_flat({"tensorboard": str(tmp_path / "tb")})
    with pytest.raises(ConfigError, match=r"needs the tensorboard package: pip install"):
        cfg.check_paths()
    assert board.INSTALL.startswith("tensorboard: ")
