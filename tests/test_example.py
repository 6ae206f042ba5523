"""examples/hello-world is the seed example, changed only where the image is named."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEED_COPY = ROOT / "tests" / "testdata" / "manifests"
SHARED = ROOT.parent / "shared" / "seed-example"  # the design folder beside the checkout
EXAMPLE = ROOT / "examples" / "hello-world"
IMAGE = "shoal-example/hello-world:latest"


def test_example_manifests_match_the_tests_copy_of_the_seed() -> None:
    seed = (SEED_COPY / "seed-deployment.yaml").read_text()
    assert (EXAMPLE / "deployment.yaml").read_text() == seed.replace("shoal-hello:1.0", IMAGE)
    assert (EXAMPLE / "service.yaml").read_text() == (SEED_COPY / "seed-service.yaml").read_text()


@pytest.mark.skipif(not SHARED.exists(), reason="the seed folder (../shared) is not beside this checkout")
def test_example_is_the_seed_with_only_the_image_changed() -> None:
    assert (EXAMPLE / "deployment.yaml").read_text() == (SHARED / "deployment.yaml").read_text().replace(
        "<your-docker-image>", IMAGE
    )
    assert (EXAMPLE / "service.yaml").read_text() == (SHARED / "service.yaml").read_text()
    assert (EXAMPLE / "hello.go").read_text() == (SHARED / "hello.go").read_text()
