"""The black-box target: the only handle the attack gets, and the attack package's isolation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attacks
from benchmark.pipeline.models.diffusion import DiffusionModel, black_box, load_model
from benchmark.pipeline.target import BlackBoxTarget, SamplingConfig

ATTACKS_DIR = Path(attacks.__file__).parent
FORBIDDEN_MODULES = (
    "benchmark.pipeline.models",
    "benchmark.pipeline.finetune",
    "benchmark.pipeline.data.splits",
    "benchmark.app.runner",
    "defenses",
)


class FakeGenerator:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, captions: list[str], seed: int) -> np.ndarray:
        self.calls.append((list(captions), seed))
        return np.zeros((len(captions), 8, 8, 3), dtype=np.float32)


def test_counts_queries_and_images() -> None:
    fake = FakeGenerator()
    target = BlackBoxTarget(fake, name="fake")
    assert (target.query_count, target.images_generated) == (0, 0)
    out = target.generate(["a", "b"], num_images=3, seed=7)
    assert out.shape == (2, 3, 8, 8, 3)
    assert (target.query_count, target.images_generated) == (2, 6)
    target.generate(["c"], num_images=1, seed=8)
    assert (target.query_count, target.images_generated) == (3, 7)
    # Each caption is repeated once per requested image, in order.
    assert fake.calls[0] == (["a", "a", "a", "b", "b", "b"], 7)
    assert fake.calls[1] == (["c"], 8)
    assert "queries=3" in repr(target) and "images=7" in repr(target)


@pytest.mark.parametrize("num_images", [0, -1])
def test_generate_rejects_non_positive_num_images(num_images: int) -> None:
    fake = FakeGenerator()
    target = BlackBoxTarget(fake, name="fake")
    with pytest.raises(ValueError, match="num_images"):
        target.generate(["a"], num_images=num_images, seed=0)
    assert fake.calls == []
    assert (target.query_count, target.images_generated) == (0, 0)


def test_counters_are_read_only() -> None:
    target = BlackBoxTarget(FakeGenerator(), name="fake")
    with pytest.raises(AttributeError):
        target.query_count = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        target.model = object()  # type: ignore[attr-defined]  # __slots__: no new attributes


def test_from_model_rejects_non_models() -> None:
    with pytest.raises(TypeError, match="DiffusionModel"):
        black_box(torch.nn.Linear(2, 2), SamplingConfig(), name="x")


@pytest.fixture(scope="module")
def model_target(tiny_model_dir: Path) -> BlackBoxTarget:
    model = load_model(tiny_model_dir)
    return black_box(model, SamplingConfig(num_inference_steps=2), name="tiny")


def test_from_model_generates_images(model_target: BlackBoxTarget) -> None:
    before = model_target.query_count, model_target.images_generated
    images = model_target.generate(["a red circle at the top", "a blue square"], num_images=2, seed=0)
    assert images.shape == (2, 2, 8, 8, 3)
    assert images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert (model_target.query_count - before[0], model_target.images_generated - before[1]) == (2, 4)
    again = model_target.generate(["a red circle at the top", "a blue square"], num_images=2, seed=0)
    np.testing.assert_array_equal(images, again)


def _leaks(value: object) -> bool:
    return isinstance(value, (torch.nn.Module, torch.Tensor, torch.nn.Parameter, DiffusionModel))


def test_from_model_exposes_no_weights(model_target: BlackBoxTarget) -> None:
    public = [name for name in dir(model_target) if not name.startswith("_")]
    assert set(public) >= {"generate", "query_count", "images_generated", "name"}
    for name in public:
        assert not _leaks(getattr(model_target, name)), f"public attribute {name!r} exposes the model"
    with pytest.raises(TypeError):
        vars(model_target)
    assert not hasattr(model_target, "__dict__")
    assert "__dict__" not in BlackBoxTarget.__slots__
    for slot in BlackBoxTarget.__slots__:
        assert not _leaks(getattr(model_target, slot)), f"slot {slot!r} holds the model itself"
    assert not any(isinstance(v, (torch.nn.Module, torch.Tensor)) for v in vars(type(model_target)).values()), (
        "the class must not carry a model either"
    )


def _attack_sources() -> list[Path]:
    files = sorted(ATTACKS_DIR.glob("*.py"))
    assert files, "attacks package has no modules?"
    return files


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the attacks package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # `from benchmark import models` imports benchmark.pipeline.models.
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_MODULES)


@pytest.mark.parametrize("path", _attack_sources(), ids=lambda p: p.name)
def test_attacks_do_not_import_model_training_or_split_code(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    forbidden = sorted(m for m in _imported_modules(tree, "attacks") if _is_forbidden(m))
    assert not forbidden, f"{path.name} imports {forbidden}"


@pytest.mark.parametrize("path", _attack_sources(), ids=lambda p: p.name)
def test_attacks_never_reach_private_attributes(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    private = [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
    ]
    private += [
        f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
        and len(node.args) > 1
        and isinstance(node.args[1], ast.Constant)
        and str(node.args[1].value).startswith("_")
    ]
    private += [
        f"line {node.lineno}: {node.func.id}()"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"vars", "globals"}
    ]
    assert not private, f"{path.name} reaches past public interfaces: {private}"


def test_static_checks_catch_violations() -> None:
    """The checkers above must flag what they look for (so they cannot pass vacuously)."""
    bad = ast.parse(
        "from benchmark.pipeline.models.diffusion import generate\n"
        "from benchmark.app import runner\n"
        "import defenses.none\n"
        "from . import x\n"
    )
    found = _imported_modules(bad, "attacks")
    assert {"benchmark.pipeline.models.diffusion", "benchmark.app.runner", "defenses.none", "attacks.x"} <= found
    assert all(
        _is_forbidden(m) for m in ("benchmark.pipeline.models.diffusion", "benchmark.app.runner", "defenses.none")
    )
    assert not _is_forbidden("benchmark.pipeline.target") and not _is_forbidden("benchmark.modelsx")


def test_importing_attacks_loads_no_model_code() -> None:
    code = (
        "import sys, attacks.attack, attacks.attack_models, attacks.distances, attacks.encoders, attacks.scenarios\n"
        "import attacks.families, attacks.loss\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN_MODULES!r}))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- image-to-image access ----------------------------------------------------------------


class FakeImg2Img:
    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, list[str], float, int]] = []

    def __call__(self, images: np.ndarray, captions: list[str], strength: float, seed: int) -> np.ndarray:
        self.calls.append((images.copy(), list(captions), strength, seed))
        return images * 0.5


def test_img2img_counts_queries_like_generate() -> None:
    fake = FakeImg2Img()
    target = BlackBoxTarget(FakeGenerator(), name="fake", img2img_fn=fake)
    assert target.offers_img2img
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    out = target.img2img(images, ["a", "b"], strength=0.3, num_images=3, seed=5)
    assert out.shape == (2, 3, 8, 8, 3)
    assert (target.query_count, target.images_generated) == (2, 6)
    target.generate(["c"], num_images=2, seed=0)
    assert (target.query_count, target.images_generated) == (3, 8)
    flat_images, captions, strength, seed = fake.calls[0]
    assert captions == ["a", "a", "a", "b", "b", "b"] and strength == 0.3 and seed == 5
    np.testing.assert_array_equal(flat_images[:3], np.repeat(images[:1], 3, axis=0))
    np.testing.assert_allclose(out[1, 2], images[1] * 0.5)
    assert target.seconds_generating >= 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": 0.0}, "strength"),
        ({"strength": 1.5}, "strength"),
        ({"num_images": 0}, "num_images"),
    ],
)
def test_img2img_rejects_bad_arguments_without_counting(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    fake = FakeImg2Img()
    target = BlackBoxTarget(FakeGenerator(), name="fake", img2img_fn=fake)
    args = {"strength": 0.5, "num_images": 1, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        target.img2img(np.zeros((1, 8, 8, 3)), ["a"], **args)
    with pytest.raises(ValueError, match="1 images but 2 captions"):
        target.img2img(np.zeros((1, 8, 8, 3)), ["a", "b"], strength=0.5, num_images=1, seed=0)
    assert fake.calls == [] and (target.query_count, target.images_generated) == (0, 0)


def test_text_only_provider_refuses_img2img() -> None:
    target = BlackBoxTarget(FakeGenerator(), name="text-only")
    assert not target.offers_img2img
    with pytest.raises(PermissionError, match="no image-to-image access"):
        target.img2img(np.zeros((1, 8, 8, 3)), ["a"], strength=0.5, num_images=1, seed=0)
    assert target.query_count == 0


def test_from_model_img2img(model_target: BlackBoxTarget) -> None:
    before = model_target.query_count, model_target.images_generated
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    captions = ["a red circle at the top", "a blue square"]
    out = model_target.img2img(images, captions, strength=0.5, num_images=2, seed=0)
    assert out.shape == (2, 2, 8, 8, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (model_target.query_count - before[0], model_target.images_generated - before[1]) == (2, 4)
    np.testing.assert_array_equal(out, model_target.img2img(images, captions, strength=0.5, num_images=2, seed=0))
    # Less noise keeps the output closer to the query image.
    light = model_target.img2img(images, captions, strength=0.05, num_images=2, seed=0)
    heavy = model_target.img2img(images, captions, strength=1.0, num_images=2, seed=0)
    assert np.abs(light - images[:, None]).mean() < np.abs(heavy - images[:, None]).mean()


def test_score_queries_with_img2img_access() -> None:
    from attacks.attack import AttackConfig, Query, score_queries
    from attacks.scenarios import QueryAccess

    fake = FakeImg2Img()
    target = BlackBoxTarget(FakeGenerator(), name="fake", img2img_fn=fake)
    rng = np.random.default_rng(1)
    queries = [Query(f"q{i}", rng.uniform(size=(8, 8, 3)).astype(np.float32), f"c{i}") for i in range(5)]
    config = AttackConfig(query_access=QueryAccess.IMAGE_TO_IMAGE, strength=0.4, generations_per_query=2, query_batch=2)
    scored = score_queries(target, queries, config)
    assert scored.scores.shape == (5, 2)
    assert scored.queries_spent == 5 and scored.images_generated == 10
    assert [len(call[1]) for call in fake.calls] == [4, 4, 2]
    assert all(call[2] == 0.4 for call in fake.calls)
    assert config.to_dict()["query_access"] == "img2img" and config.to_dict()["strength"] == 0.4
    with pytest.raises(ValueError, match="no caption"):
        score_queries(target, [Query("x", queries[0].image, None)], config)
