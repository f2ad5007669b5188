"""The embedded scenes dataset and the metadata.jsonl image folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.pipeline.data import DATASETS, DatasetError, DatasetSpec
from benchmark.pipeline.data import scenes as scenes_module
from benchmark.pipeline.data.folder import FolderDataset
from benchmark.pipeline.data.scenes import COLOR_STAGES, DEFAULT_SIZE, EXTENDED_SIZE, ScenesDataset
from benchmark.pipeline.data.splits import SplitSizes, make_splits


def test_scenes_registered_and_default_size() -> None:
    ds = DATASETS.get("scenes")(DatasetSpec("scenes", resolution=8))
    assert len(ds) == DEFAULT_SIZE
    assert len(ds.ids) == DEFAULT_SIZE and len(set(ds.ids)) == DEFAULT_SIZE


def test_scenes_captions_unique() -> None:
    ds = ScenesDataset(resolution=8, size=DEFAULT_SIZE)
    captions = [ds.caption(i) for i in range(len(ds))]
    assert len(set(captions)) == len(captions)
    assert all(c.startswith("a ") and " background" in c for c in captions)


@pytest.mark.parametrize("resolution", [8, 16])
def test_scenes_images_shape_range_and_determinism(resolution: int) -> None:
    a = ScenesDataset(resolution=resolution, size=50)
    first = [np.array(a.image(i)) for i in range(10)]
    scenes_module._render_cached.cache_clear()  # force a second render, not a cache hit
    b = ScenesDataset(resolution=resolution, size=50)
    for i, image in enumerate(first):
        assert image.shape == (resolution, resolution, 3)
        assert image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        np.testing.assert_array_equal(image, b.image(i))
        assert a.caption(i) == b.caption(i)
    assert not np.array_equal(first[0], first[1])
    assert a.describe()["resolution"] == resolution


def test_scenes_owner_domain_is_spotlit_and_the_public_split_mixes_both() -> None:
    ds = ScenesDataset(resolution=16, size=400)
    owner = list(ds.owner_pool)
    assert owner == list(range(1, 400, 2))
    splits = make_splits(len(ds), SplitSizes(200, 20, 20, 40, 20), public_seed=0, seed=0, owner_pool=ds.owner_pool)
    owner_sets = splits.members + splits.nonmembers + splits.auxiliary + splits.utility
    assert set(owner_sets) <= set(owner)
    assert 0.35 < np.mean([i in set(owner) for i in splits.public]) < 0.65

    # The spotlight darkens the corners relative to the centre; flat lighting does not, on average.
    def corner_over_centre(indices: list[int]) -> float:
        images = np.stack([ds.image(i) for i in indices])
        return float(images[:, [0, 0, -1, -1], [0, -1, 0, -1]].mean() / images[:, 6:10, 6:10].mean())

    assert corner_over_centre(owner[:100]) < 0.75 * corner_over_centre([i - 1 for i in owner[:100]])
    # The caption does not say which lighting an image has.
    assert not any("light" in ds.caption(i) for i in range(len(ds)))


# Today's default pool, recorded before the palette grew: committed records and cached models
# (keyed by `describe()`) were made from exactly these items.
PINNED_DEFAULT_ITEMS = {
    0: (
        "a large black square at the top right on a yellow background",
        "f172547b2ade503c02692de5b170fa090f512b188e1edf39a5dc542ab3ebfc49",
    ),
    1: (
        "a small blue diamond at the bottom on a black background",
        "05471ccd1ddfa304011cd60a507435447619263b0d9b448c1c89e72f2250357e",
    ),
    4031: (
        "a small blue square at the right on a white background",
        "f1e42750f9de5bcb4ca4e0dde713521afaa947ec3af6cec80fb3eef3740fe979",
    ),
}


def _image_sha256(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_scenes_default_pool_is_pinned() -> None:
    """Bit-identical items and description: a change here silently invalidates records and caches."""
    ds = DATASETS.get("scenes")(DatasetSpec("scenes", resolution=16))
    for index, (caption, image_sha256) in PINNED_DEFAULT_ITEMS.items():
        assert ds.ids[index] == f"scene-{index:05d}"
        assert ds.caption(index) == caption
        assert _image_sha256(ds.image(index)) == image_sha256
    captions = "\n".join(ds.caption(i) for i in range(len(ds)))
    assert hashlib.sha256(captions.encode()).hexdigest() == (
        "6806d5ba638e9ffa480ac7145be6f742eda670ab628455c9a967375affdc061e"
    )
    assert ds.describe() == {
        "name": "scenes",
        "version": "3",
        "size": 4032,
        "resolution": 16,
        "generator_seed": 0,
        "domains": {"public": "flat and spotlight lighting", "owner": "spotlight lighting (odd indices)"},
    }


def test_scenes_extended_pool_appends_after_the_default() -> None:
    default = ScenesDataset(resolution=16, size=DEFAULT_SIZE)
    extended = ScenesDataset(resolution=16, size=EXTENDED_SIZE)
    assert extended.ids[:DEFAULT_SIZE] == default.ids
    for index in (*PINNED_DEFAULT_ITEMS, 2, 1000, 4030):
        assert extended.caption(index) == default.caption(index)
        np.testing.assert_array_equal(extended.image(index), default.image(index))
    captions = [extended.caption(i) for i in range(EXTENDED_SIZE)]
    assert captions[:DEFAULT_SIZE] == [default.caption(i) for i in range(DEFAULT_SIZE)]
    assert len(set(captions)) == EXTENDED_SIZE
    added = COLOR_STAGES[1]
    words = [set(c.split()) for c in captions]
    assert not any(w & set(added) for w in words[:DEFAULT_SIZE])
    assert all(w & set(added) for w in words[DEFAULT_SIZE:])
    # Both lightings still alternate, so the owner's domain stays the odd indices.
    assert list(extended.owner_pool) == list(range(1, EXTENDED_SIZE, 2))
    assert extended.describe()["size"] == EXTENDED_SIZE
    with pytest.raises(DatasetError, match=f"{EXTENDED_SIZE} distinct captions"):
        ScenesDataset(resolution=8, size=EXTENDED_SIZE + 1)


def test_scenes_size_and_resolution_limits() -> None:
    with pytest.raises(DatasetError, match="distinct captions"):
        ScenesDataset(resolution=8, size=10**6)
    with pytest.raises(DatasetError, match="resolution >= 8"):
        ScenesDataset(resolution=4, size=10)


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> None:
    Image.new("RGB", size, color).save(path)


def _folder(root: Path, rows: list[object] | None = None, *, raw_lines: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _png(root / "a.png", (255, 0, 0))
    _png(root / "b.png", (0, 255, 0), (12, 20))
    _png(root / "c.png", (0, 0, 255), (16, 16))
    if rows is None:
        rows = [
            {"file_name": "a.png", "text": "a red picture"},
            {"file_name": "b.png", "text": "  a green picture  "},
            {"file_name": "c.png", "text": "a blue picture"},
        ]
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_folder_dataset_loads(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    ds = DATASETS.get("folder")(DatasetSpec("folder", resolution=8, path=root))
    assert len(ds) == 3
    assert list(ds.ids) == ["a.png", "b.png", "c.png"]
    assert [ds.caption(i) for i in range(3)] == ["a red picture", "a green picture", "a blue picture"]
    for i, channel in enumerate((0, 1, 2)):
        image = ds.image(i)
        assert image.shape == (8, 8, 3) and image.dtype == np.float32
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image[..., channel].mean() == pytest.approx(1.0)
        assert np.delete(image, channel, axis=-1).max() == pytest.approx(0.0)
    described = ds.describe()
    assert described["size"] == 3 and described["path"] == str(root.resolve())
    assert len(described["metadata_sha256"]) == 16


def test_folder_dataset_size_limit_and_blank_lines(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "data",
        raw_lines=[
            json.dumps({"file_name": "a.png", "text": "one"}),
            "",
            json.dumps({"file_name": "b.png", "text": "two"}),
            json.dumps({"file_name": "c.png", "text": "three"}),
        ],
    )
    ds = FolderDataset(root, resolution=8, size=2)
    assert list(ds.ids) == ["a.png", "b.png"]


def _error(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        FolderDataset(root, resolution=8)
    return str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    message = _error(tmp_path / "nowhere")
    assert "does not exist" in message and "--dataset-path" in message
    assert "nowhere" in message


def test_folder_spec_without_path() -> None:
    with pytest.raises(DatasetError, match="--dataset-path"):
        DATASETS.get("folder")(DatasetSpec("folder", resolution=8))


def test_missing_metadata(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "metadata.jsonl").unlink()
    message = _error(root)
    assert "no metadata.jsonl" in message
    assert "file_name" in message and "text" in message  # says what a line looks like


def test_invalid_json_line_names_line_number(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "data",
        raw_lines=[
            json.dumps({"file_name": "a.png", "text": "one"}),
            json.dumps({"file_name": "b.png", "text": "two"}),
            '{"file_name": "c.png", "text": ',
        ],
    )
    message = _error(root)
    assert "metadata.jsonl:3" in message
    assert "not valid JSON" in message


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['["a.png", "caption"]'], "metadata.jsonl:1: expected a JSON object"),
        ([""], "lists no images"),
    ],
    ids=["line-not-an-object", "empty-metadata"],
)
def test_metadata_that_lists_no_usable_image(tmp_path: Path, lines: list[str], message: str) -> None:
    assert message in _error(_folder(tmp_path / "data", raw_lines=lines))


def test_missing_image_file(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "data",
        [{"file_name": "a.png", "text": "one"}, {"file_name": "missing.png", "text": "two"}],
    )
    message = _error(root)
    assert "metadata.jsonl:2" in message
    assert "'missing.png' not found" in message


def test_unreadable_image(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    (root / "b.png").write_bytes(b"this is not a png at all" * 10)
    message = _error(root)
    assert "metadata.jsonl:2" in message
    assert "'b.png' is unreadable" in message


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_caption(tmp_path: Path, text: str | None) -> None:
    row: dict[str, object] = {"file_name": "b.png"}
    if text is not None:
        row["text"] = text
    root = _folder(tmp_path / "data", [{"file_name": "a.png", "text": "one"}, row])
    message = _error(root)
    assert "metadata.jsonl:2" in message
    assert "empty caption" in message


def test_missing_file_name(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", [{"text": "no file"}])
    assert "missing 'file_name'" in _error(root)


def test_path_outside_folder_rejected(tmp_path: Path) -> None:
    _png(tmp_path / "outside.png", (1, 2, 3))
    root = _folder(tmp_path / "data", [{"file_name": "../outside.png", "text": "escape"}])
    assert "outside the dataset folder" in _error(root)


def test_duplicate_file_names_rejected(tmp_path: Path) -> None:
    root = _folder(
        tmp_path / "data",
        [
            {"file_name": "a.png", "text": "one"},
            {"file_name": "b.png", "text": "two"},
            {"file_name": "a.png", "text": "x"},
        ],
    )
    assert "metadata.jsonl:3" in _error(root)
