"""The tiny models shipped with the package: they are the default recipe's build, they are used
before the cache and a build, and (marker ``tiny_rebuild``) a rebuild reproduces them byte for byte."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from relay_agents.tiny import build

REBUILD = os.environ.get("RELAY_TINY_REBUILD") == "1"


def test_the_shipped_weights_are_the_default_recipes_build() -> None:
    manifest = json.loads((build.SHIPPED_DIR / build.MANIFEST).read_text())
    assert manifest["recipe_hash"] == build.DEFAULT_RECIPE.digest(), (
        "the recipe changed: rebuild and ship it with `python -m relay_agents.tiny ship`"
    )
    assert build.verify_pair(build.SHIPPED_DIR, build.DEFAULT_RECIPE.digest())
    assert build.shipped_pair() == build.TinyPair.in_build(build.SHIPPED_DIR)
    total = sum(p.stat().st_size for p in build.SHIPPED_DIR.rglob("*") if p.is_file())
    assert total < 15 * 2**20  # package data stays small


def test_the_shipped_pair_comes_first_then_the_cache(tmp_path: Path) -> None:
    shipped = build.build_tiny_pair(tmp_path)  # no build: nothing lands in the cache
    assert shipped.root == build.SHIPPED_DIR and not list(tmp_path.iterdir())
    digest = build.DEFAULT_RECIPE.digest()
    cached = build.ship_pair(shipped, dest=tmp_path / digest)  # a verified copy, as the cache holds it
    assert build.build_tiny_pair(tmp_path, use_shipped=False) == cached
    # another recipe is not served from the shipped files
    other = build.Recipe(teacher=build.DEFAULT_RECIPE.student, student=build.DEFAULT_RECIPE.student)
    assert build.shipped_pair(other) is None
    # a changed file fails the checksum
    (cached.student_dir / "config.json").write_text("{}")
    assert not build.verify_pair(cached.root, digest)


def test_shipping_replaces_the_destination_with_a_verified_copy(tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    (dest / "teacher").mkdir(parents=True)
    (dest / "teacher" / "stale.bin").write_bytes(b"old")
    copy = build.ship_pair(build.TinyPair.in_build(build.SHIPPED_DIR), dest=dest)
    assert copy.root == dest and build.verify_pair(dest, build.DEFAULT_RECIPE.digest())
    assert not (dest / "teacher" / "stale.bin").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # no temporary directory is left
    shutil.rmtree(dest / "solo")
    with pytest.raises(RuntimeError, match="not a verified build"):
        build.ship_pair(copy, dest=tmp_path / "again")


def test_the_shipped_tokenizer_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    """The cheap part of the rebuild check, on every run: a new ``tokenizers`` that trains a
    different vocabulary shows here before the weekly full rebuild."""
    from relay_agents.tiny.tokenizer import save_tokenizer

    recipe = build.DEFAULT_RECIPE
    save_tokenizer(build.build_tokenizer(recipe), tmp_path, model_max_length=recipe.max_position_embeddings)
    for name in build.MODEL_NAMES:
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tmp_path / file).read_bytes() == (build.SHIPPED_DIR / name / file).read_bytes(), file


@pytest.mark.tiny_rebuild
@pytest.mark.skipif(not REBUILD, reason="a full rebuild: set RELAY_TINY_REBUILD=1 (docs/tiny-world.md)")
def test_a_rebuild_reproduces_the_shipped_files_byte_for_byte(tmp_path: Path) -> None:
    rebuilt = build.build_tiny_pair(tmp_path, force=True)
    shipped = json.loads((build.SHIPPED_DIR / build.MANIFEST).read_text())["files"]
    assert json.loads((rebuilt.root / build.MANIFEST).read_text())["files"].keys() == shipped.keys()
    differ = [
        rel for rel in shipped if (rebuilt.root / rel).read_bytes() != (build.SHIPPED_DIR / rel).read_bytes()
    ]
    assert not differ, f"the rebuild differs from the shipped files in {differ}"
