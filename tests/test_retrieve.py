"""Text-to-image retrieval (python -m runtime.retrieve): images ranked by log p(query | image),
exactly the scores `Captioner.score` gives one image at a time, with encoder outputs cached by
package and file content so that repeated queries only run the decoder."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from helpers import without_torch
from runtime.retrieve import MemoryCache, search

# In the bundled model's own phrasing: trained on its sentences alone, it scores free-form text far
# lower ("a cup of coffee" gives the coffee -72.7, "a photo of a cat" chelsea -14.3; README).
QUERIES = ["a photo of an egyptian cat", "a photo of espresso", "a photo of a moped"]


@pytest.fixture
def folder(tmp_path, photo_paths):
    for path in photo_paths.values():
        shutil.copy(path, tmp_path / path.name)
    return tmp_path


def test_ranking_is_score_per_image_and_finds_the_photo(captioner, folder, tmp_path_factory):
    images = sorted(str(p) for p in folder.iterdir())
    ranked, errors = search(captioner, MemoryCache(captioner, tmp_path_factory.mktemp("cache")), images, QUERIES)
    assert errors == []
    for query, results in ranked.items():
        assert sorted(i for i, _ in results) == images
        scores = [s for _, s in results]
        assert scores == sorted(scores, reverse=True)
        for image, score in results:
            np.testing.assert_allclose(score, captioner.score(image, [query])[0], rtol=1e-6)
    # The trained model finds what the photos show.
    assert [ranked[q][0][0].rsplit("/", 1)[1] for q in QUERIES] == ["chelsea.jpg", "coffee.jpg", "motorcycle.jpg"]


def test_repeated_queries_do_not_encode_again(captioner, folder, tmp_path_factory, monkeypatch):
    cache_dir, images = tmp_path_factory.mktemp("cache"), sorted(str(p) for p in folder.iterdir())
    first = MemoryCache(captioner, cache_dir)
    want, _ = search(captioner, first, images, QUERIES[:1])
    assert first.encoded == len(images)
    again = MemoryCache(captioner, cache_dir)
    monkeypatch.setattr(captioner.graphs, "encode", None)  # the vision graph must not run at all
    assert search(captioner, again, images, QUERIES[:1])[0] == want and again.encoded == 0
    monkeypatch.undo()
    # Keyed by content: a renamed copy is a hit, an edited file is encoded again.
    shutil.copy(folder / "chelsea.jpg", folder / "renamed.jpg")
    Image.open(folder / "coffee.jpg").rotate(90).save(folder / "coffee.jpg")
    third = MemoryCache(captioner, cache_dir)
    search(captioner, third, [str(folder / "renamed.jpg"), str(folder / "coffee.jpg")], QUERIES[:1])
    assert third.encoded == 1


def test_a_damaged_cache_entry_is_encoded_again(captioner, folder, tmp_path_factory):
    cache_dir, image = tmp_path_factory.mktemp("cache"), str(folder / "chelsea.jpg")
    want, _ = search(captioner, MemoryCache(captioner, cache_dir), [image], QUERIES[:1])
    for entry in cache_dir.rglob("*.npz"):
        entry.write_bytes(b"damaged")
    cache = MemoryCache(captioner, cache_dir)
    assert search(captioner, cache, [image], QUERIES[:1])[0] == want and cache.encoded == 1


def test_cli_ranks_and_reports_bad_images_without_torch(folder, tmp_path):
    (folder / "broken.jpg").write_bytes(b"not an image")
    r = without_torch("runtime.retrieve", folder, "--query", QUERIES[0], "--query", QUERIES[1], "--top", "2",
                      "--json", "--cache", tmp_path / "cache")
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: {folder / 'broken.jpg'}: not an image in a supported format " \
                               "(JPEG, PNG, GIF, BMP, WEBP, TIFF, PPM)"
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [line["query"] for line in lines] == QUERIES[:2]
    assert [line["results"][0]["image"] for line in lines] == [str(folder / "chelsea.jpg"), str(folder / "coffee.jpg")]
    assert all(len(line["results"]) == 2 for line in lines)


@pytest.mark.parametrize("args, message", [
    (["--query", ""], "error: text '' is 0 tokens; this model scores 1 to 39"),
    (["--query", "cat " * 60], "error: text 'cat cat"),
    (["--query", "a cat", "--top", "0"], "error: --top must be at least 1"),
])
def test_usage_errors(folder, tmp_path, args, message):
    r = without_torch("runtime.retrieve", folder, *args, "--cache", tmp_path / "cache")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith(message)
    assert not (tmp_path / "cache").exists()  # refused before any image


def test_a_folder_without_images_is_a_usage_error(tmp_path):
    r = without_torch("runtime.retrieve", tmp_path, "--query", "a cat")
    assert r.returncode == 2 and r.stderr.strip() == f"error: no images in {tmp_path}"
