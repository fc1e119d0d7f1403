"""Unit tests for hpc_asgd.models: shapes, parameter counts, errors and seeded init."""

from __future__ import annotations

import pytest
import torch

from hpc_asgd.errors import ConfigError
from hpc_asgd.models import MODELS, build_model
from hpc_asgd.models.resnet_cifar import CifarResNet

SMALL = ("mlp", "cnn", "lenet", "resnet20", "resnet32", "resnet56", "resnet18")
SHAPES = ((1, 8, 8), (1, 28, 28), (3, 32, 32))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names() -> None:
    assert MODELS == (
        "mlp",
        "cnn",
        "lenet",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet18",
        "wrn16_8",
        "resnet50",
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", SMALL)
def test_forward_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 64, 64)])
@pytest.mark.parametrize("name", ["wrn16_8", "resnet50"])
def test_forward_shape_big(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_resnet50_imagenet() -> None:
    torch.manual_seed(0)
    model = build_model("resnet50", (3, 224, 224), 1000)
    assert n_params(model) == 25_557_032
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize(
    ("name", "shape", "classes", "expected"),
    [
        ("mlp", (1, 28, 28), 10, 134_794),
        ("cnn", (1, 28, 28), 10, 1_199_882),  # the PyTorch MNIST example
        ("lenet", (1, 28, 28), 10, 61_706),
        ("resnet20", (3, 32, 32), 10, 269_722),  # He et al.: 0.27M (option A)
        ("resnet32", (3, 32, 32), 10, 464_154),  # 0.46M
        ("resnet56", (3, 32, 32), 10, 853_018),  # 0.85M
        ("resnet18", (3, 32, 32), 10, 11_173_962),
        ("wrn16_8", (3, 32, 32), 10, 10_961_370),  # Zagoruyko & Komodakis: 11.0M
    ],
)
def test_param_counts(name: str, shape: tuple[int, int, int], classes: int, expected: int) -> None:
    assert n_params(build_model(name, shape, classes)) == expected


def test_resnet20_option_b_shortcut() -> None:
    assert n_params(CifarResNet(20, (3, 32, 32), 10, shortcut="B")) == 272_474


def test_mlp_layout() -> None:
    linears = [m for m in build_model("mlp", (1, 8, 8), 10) if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 10),
    ]


def test_unknown_model() -> None:
    with pytest.raises(ConfigError, match=r"model.*resnet50"):
        build_model("vgg16", (3, 32, 32), 10)


def test_bad_shape() -> None:
    with pytest.raises(ConfigError, match="model"):
        build_model("mlp", (3, 4, 4), 10)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_init_is_deterministic(name: str) -> None:
    shape = (3, 32, 32)
    torch.manual_seed(123)
    a = build_model(name, shape, 10).state_dict()
    torch.manual_seed(123)
    b = build_model(name, shape, 10).state_dict()
    torch.manual_seed(124)
    c = build_model(name, shape, 10).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--model", "mynets:nothere"], "model: 'mynets' has no 'nothere'"),
        (["--model", "mynets:NOT_A_FUNCTION"], "is a int, not a function"),
        (["--model", "mynets:boom"], "mynets:boom((1, 64), 8) raised ValueError: no such layer"),
        (["--model", "mynets:number"], "model: mynets:number returned a int, not a torch.nn"),
        (["--model", "mynets:narrow"], "has shape (2, 5), but mynets:load has 8 classes"),
        (["--dataset", "mynets:five"], "dataset: mynets:five returned a int; expected"),
        (["--loss", "mynets:NOT_A_FUNCTION"], "is a int, not a function"),
        (["--model", "mynets"], "model: unknown value 'mynets'"),
    ],
)  # fmt: skip
def test_bad_factories_are_config_errors(nets, monkeypatch, flags, line) -> None:
    """The CLI's preflight (validate, then check_factories) on a user's module of factories:
    each bad one is a ConfigError whose message names the flag and the cause."""
    from hpc_asgd.cli import build_parser, config_from_args

    for folder in reversed(nets["PYTHONPATH"].split(":")):
        monkeypatch.syspath_prepend(folder)
    base = {"--model": "mynets:build", "--dataset": "mynets:load"}
    base.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    args = build_parser().parse_args(["train", *(x for kv in base.items() for x in kv)])
    with pytest.raises(ConfigError) as e:
        cfg = config_from_args(args)
        cfg.validate(2, 2)
        cfg.check_factories()
    assert line in str(e.value) and "\n" not in str(e.value), str(e.value)
