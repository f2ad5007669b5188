"""The generic registry, on a fresh instance (the global registries are never mutated)."""

from __future__ import annotations

import pytest

from benchmark.kernel.registry import Registry, RegistryError


@pytest.fixture
def registry() -> Registry[object]:
    reg: Registry[object] = Registry("test")

    @reg.register("gamma")
    def gamma() -> str:
        return "g"

    reg.add("alpha", "A")
    reg.add("beta-2", "B", origin="plugin-pkg")
    return reg


def test_decorator_registers_and_returns_the_object(registry: Registry[object]) -> None:
    def delta() -> int:
        return 4

    returned = registry.register("delta")(delta)
    assert returned is delta
    assert registry.get("delta") is delta
    assert registry.get("delta")() == 4
    assert "delta" in registry
    assert len(registry) == 4


def test_get_returns_registered_objects(registry: Registry[object]) -> None:
    assert registry.get("alpha") == "A"
    assert registry.get("gamma")() == "g"  # type: ignore[operator]
    assert registry.origin("beta-2") == "plugin-pkg"
    assert registry.origin("alpha") == "builtin"


def test_duplicate_name_raises_and_keeps_the_first(registry: Registry[object]) -> None:
    with pytest.raises(RegistryError, match="duplicate test 'alpha'") as info:
        registry.add("alpha", "other")
    assert "builtin" in str(info.value)
    with pytest.raises(RegistryError, match="plugin-pkg"):
        registry.register("beta-2")(object())
    assert registry.get("alpha") == "A"
    assert len(registry) == 3


def test_unknown_name_suggests_closest_and_lists_available(registry: Registry[object]) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get("alpah")
    message = str(info.value)
    assert "unknown test 'alpah'" in message
    assert "did you mean 'alpha'" in message
    assert "available: alpha, beta-2, gamma" in message
    # Still a KeyError for callers that catch that, but printed without quotes.
    assert isinstance(info.value, KeyError)
    assert not message.startswith('"')


def test_unknown_name_without_close_match_has_no_suggestion(registry: Registry[object]) -> None:
    with pytest.raises(RegistryError) as info:
        registry.get("zzzzzzzz")
    message = str(info.value)
    assert "did you mean" not in message
    assert "available: alpha, beta-2, gamma" in message


def test_empty_registry_says_none_available() -> None:
    with pytest.raises(RegistryError, match=r"available: \(none\)"):
        Registry("empty").get("x")


def test_names_sorted_and_items_in_name_order() -> None:
    reg: Registry[int] = Registry("test")
    for i, name in enumerate(["zeta", "alpha", "mu", "Beta"]):
        reg.add(name, i)
    assert reg.names() == sorted(["zeta", "alpha", "mu", "Beta"])
    assert [name for name, _ in reg.items()] == reg.names()
    assert dict(reg.items()) == {"zeta": 0, "alpha": 1, "mu": 2, "Beta": 3}


@pytest.mark.parametrize("name", ["", "with space", "a/b", "semi;colon", "new\nline", "x!"])
def test_invalid_names_rejected(name: str) -> None:
    reg: Registry[int] = Registry("test")
    with pytest.raises(ValueError, match="invalid test name"):
        reg.add(name, 1)
    assert len(reg) == 0


@pytest.mark.parametrize("name", ["a", "sd15", "dp_sgd", "l2-norm", "v1.5"])
def test_valid_names_accepted(name: str) -> None:
    reg: Registry[int] = Registry("test")
    reg.add(name, 1)
    assert reg.names() == [name]


def test_capabilities_and_check_hooks() -> None:
    reg: Registry[object] = Registry("test")
    seen: list[object] = []

    class WithHook:
        needs_public_data = True

        @staticmethod
        def check(request: object) -> None:
            seen.append(request)

    reg.add("hooked", WithHook)
    reg.add("plain", object)
    assert reg.capability("hooked", "needs_public_data") is True
    assert reg.capability("plain", "needs_public_data") is None
    reg.check("hooked", "req")
    reg.check("plain", "req")  # no hook: nothing to check
    assert seen == ["req"]
