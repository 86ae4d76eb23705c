"""The Lua scripts touch only keys their caller declared (Redis Cluster routes by KEYS, and a key built
inside a script may live on another node), and use KEYS/ARGV only through the positions named in
streammf/store/scripts.py."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from streammf.store import scripts

LUA = resources.files("streammf.store").joinpath("lua")
FILES = sorted(p.name for p in LUA.iterdir() if p.name.endswith(".lua"))


def _code(name: str) -> str:
    """The file without comments and string literals (what is left is what runs)."""
    text = LUA.joinpath(name).read_text()
    text = re.sub(r"--[^\n]*", "", text)
    return re.sub(r"'[^'\n]*'", "''", text)


def test_every_script_file_is_declared_and_every_declared_script_has_a_file() -> None:
    declared = {s.name for s in scripts.ALL} | {"prelude"}
    assert {name.removesuffix(".lua") for name in FILES} == declared


@pytest.mark.parametrize("name", FILES)
def test_no_key_is_built_inside_a_script(name: str) -> None:
    code = _code(name)
    for match in re.finditer(r"redis\.call\(\s*''\s*,\s*([^,)]+)", code):
        key = match.group(1).strip()
        assert ".." not in key, f"{name}: a key built by concatenation: {key}"
        assert "ARGV" not in key, f"{name}: a key taken from ARGV: {key}"
    # Variables holding keys may only be assigned from KEYS (or be a prelude helper's parameter).
    for match in re.finditer(r"local\s+([\w, ]+)=\s*([^\n]+)", code):
        if "key" in match.group(1) or "meta" in match.group(1):
            assert "KEYS[" in match.group(2) or "redis.call" in match.group(2), f"{name}: {match.group(0)}"


@pytest.mark.parametrize("name", [n for n in FILES if n != "prelude.lua"])
def test_fixed_positions_are_used_by_name_only(name: str) -> None:
    code = _code(name)
    assert not re.search(r"(KEYS|ARGV)\[\s*\d+\s*\]", code), f"{name}: a magic KEYS/ARGV index"
    script = next(s for s in scripts.ALL if s.name == name.removesuffix(".lua"))
    for kind, names in (("K", script.keys), ("A", script.args)):
        used = set(re.findall(rf"\b{kind}\.(\w+)", code))
        assert used <= set(names), f"{name}: {kind}.{sorted(used - set(names))} is not declared"


def test_arguments_are_checked_against_the_declared_names() -> None:
    with pytest.raises(ValueError, match="declared"):
        scripts.DISCARD.key_list(meta="m")
    assert scripts.DISCARD.key_list(["t"], meta="m", retired="r") == ["m", "r", "t"]
