"""Shared fixtures: a small RAFT-layout dataset, and configs composed by real Hydra."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import peftlab  # noqa: F401  (registers the config resolvers)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data" / "twitter_complaints"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMPLAINTS = [
    "@{b} my order never arrived and nobody answers",
    "@{b} worst service ever, still waiting on a refund",
    "@{b} your app keeps crashing, fix it",
    "@{b} charged twice and no reply from support",
]
PRAISE = [
    "@{b} thanks for the quick delivery!",
    "loving the new menu at @{b} today",
    "@{b} do you ship to Canada?",
    "great match last night, well played @{b}",
]
BRANDS = ["acme", "shopco", "fastair", "netflux", "burgerhut", "telco"]


def write_raft(
    folder: Path, n_train: int = 16, n_test: int = 24, n_unlabeled: int = 4, seed: int = 0
) -> Path:
    """RAFT-layout train.csv / test.csv with made-up tweets (label 1 complaint, 2 no complaint, 0 unlabeled)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    serial = iter(range(10**6))

    def rows(n, labelled=True):
        out = []
        for i in range(n):
            label = 1 if i % 2 == 0 else 2
            k = next(serial)
            text = rng.choice(COMPLAINTS if label == 1 else PRAISE).format(b=rng.choice(BRANDS)) + f" #{k}"
            out.append([text, str(100000 + k), label if labelled else 0])
        return out

    for name, table in (("train", rows(n_train)), ("test", rows(n_test) + rows(n_unlabeled, labelled=False))):
        with open(folder / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["Tweet text", "ID", "Label"])
            writer.writerows(table)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_raft(tmp_path_factory.mktemp("data") / "twitter_complaints")


@pytest.fixture(scope="session", autouse=True)
def weights_cache(tmp_path_factory):
    """Random-weight models are materialized into a cache; keep the tests' own."""
    os.environ["PEFTLAB_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


def make_cfg(out_dir: Path, *overrides: str, data_dir: Path | None = None, epochs: int = 2):
    """A run config composed from conf/ exactly as run.py composes it, writing into out_dir."""
    base = [f"paths.output_dir={out_dir}", f"train.epochs={epochs}"]
    if data_dir is not None:
        base.append(f"dataset.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*base, *overrides])


class ModelLoaded(AssertionError):
    """A model was loaded where a test expects the run to stop before (bad input, or its data checks only)."""


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a model raises ModelLoaded: a run gets as far as its data and config checks go, no further."""
    from peftlab import modeling

    def refuse(*args, **kwargs):
        raise ModelLoaded("a model was loaded before the bad input was reported")

    monkeypatch.setattr(modeling, "build_model", refuse)
    monkeypatch.setattr(modeling, "random_weights", refuse)
