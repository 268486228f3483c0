"""federation.scenario: new-sites keeps every client at a site distillation never saw; seen-sites is unchanged."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_sites, make_kaggle_folder

from edgemri.core.config import Config, ConfigError
from edgemri.core.data.dataset import ArraySplit, load_dataset
from edgemri.core.data.images import CLASS_NAMES, IMAGE_SIZE, DataError
from edgemri.core.data.partition import partition
from edgemri.core.data.splits import pick_source_sites, scenario_split, server_client_split, sited_training
from edgemri.core.errors import EdgemriError
from edgemri.core.registries import parse_config
from edgemri.core.training.distill import Distiller, resume_settings

# Small tiers, so a 16-image site holds one phone and one hospital.
TIERS = {"hospital": {"min_examples": 4, "test_fraction": 0.25}, "phone": {"per_site": 1, "min_examples": 2,
                                                                          "max_examples": 4}}


def _config(scenario: str = "new-sites", seed: int = 0, **federation: Any) -> Config:
    return parse_config({"seed": seed, "data": {"split_seed": 3},
                         "federation": {"scenario": scenario, "tiers": TIERS, **federation}})


def _split(sites: list[str], n: int | None = None) -> ArraySplit:
    """A hand-built Training split: ``n`` blank images (default: one per site given), cycling labels."""
    n = len(sites) if n is None else n
    return ArraySplit(torch.zeros(n, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), torch.arange(n) % 4,
                      [f"f{i}.jpg" for i in range(n)], sites)


def _digest(indices: torch.Tensor) -> str:
    return hashlib.sha256(",".join(map(str, indices.tolist())).encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 training images per site over four sites."""
    root = make_kaggle_folder(tmp_path_factory.mktemp("four-sites") / "data", {"Training": 16, "Testing": 2})
    return add_sites(root, ("site-1", "site-2", "site-3", "site-4"))


def test_new_sites_server_and_clients_are_at_disjoint_sites(four_sites: Path, tmp_path: Path) -> None:
    config = _config()
    train = load_dataset(four_sites).train
    source = set(pick_source_sites(train, None, config.data.split_seed))
    assert len(source) == 2  # half of four
    server, clients = scenario_split(train, config)
    assert {train.sites[i] for i in server.tolist()} == source
    assert not source & {train.sites[i] for i in clients.tolist()}
    assert sorted(server.tolist() + clients.tolist()) == list(range(len(train)))  # disjoint, nothing dropped
    # Distillation (training and validation) sees only source sites.
    distiller = Distiller(config, load_dataset(four_sites), 0, tmp_path / "seed-0", resume=False, progress=False)
    assert set(distiller.train_split.sites + distiller.val_split.sites) <= source
    distilled = set(distiller.train_split.files + distiller.val_split.files)
    # Every client is at a client site, holds no distillation file, and together they hold all of those sites.
    manifests = partition(train, four_sites, config)
    assert manifests and not source & {m.site for m in manifests}
    held = [f.path for m in manifests for f in m.files]
    assert not distilled & set(held)
    assert sorted(held) == sorted(train.files[i] for i in clients.tolist())


def test_source_sites_follow_the_split_seed_alone(four_sites: Path) -> None:
    train = load_dataset(four_sites).train
    by_run_seed = [{m.site for m in partition(train, four_sites, _config(seed=seed))} for seed in (0, 5)]
    assert by_run_seed[0] == by_run_seed[1]
    sites = [f"s{k % 4}" for k in range(8)]
    choices = {pick_source_sites(_split(sites), None, split_seed) for split_seed in range(10)}
    assert len(choices) > 1 and all(len(c) == 2 for c in choices)
    assert pick_source_sites(_split(sites), None, 4) == pick_source_sites(_split(sites[::-1]), None, 4)  # sorted


@pytest.mark.parametrize(("n_sites", "count", "expected"), [(2, None, 1), (4, 3, 3), (5, None, 2), (6, None, 3)])
def test_source_site_count(n_sites: int, count: int | None, expected: int) -> None:
    assert len(pick_source_sites(_split([f"s{k % n_sites}" for k in range(2 * n_sites)]), count, 0)) == expected


@pytest.mark.parametrize(
    ("sites", "count", "message"),
    [
        ([], None, "needs a scanner site for every Training image (the data folder's metadata.csv, columns 'file' "
                   "and 'site'); this data has no site metadata; use federation.scenario seen-sites"),
        (["a", "b", "", "a"], None, "Training image f2.jpg has none"),
        (["a", "a", "a", "a"], None, "needs at least 2 sites in Training (source sites for the server, the others for "
                                   "the clients); this data has 1 (a)"),
        (["a", "b", "c", "d"], 4, "federation.source_sites is 4 but Training has 4 sites (a, b, c, d); "
                                  "allowed: 1 to 3"),
    ],
)
def test_new_sites_refuses_data_it_cannot_split(sites: list[str], count: int | None, message: str) -> None:
    with pytest.raises(DataError) as err:
        server_client_split(_split(sites, n=4), 0.5, 0, scenario="new-sites", source_sites=count)
    assert isinstance(err.value, EdgemriError) and message in str(err.value) and "\n" not in str(err.value)


def test_folder_without_sites_splits_by_appearance_sites_under_new_sites(tiny_data: Path, tmp_path: Path) -> None:
    dataset = load_dataset(tiny_data)
    server, clients = scenario_split(dataset.train, _config("seen-sites"))
    assert len(server) + len(clients) == len(dataset.train)
    server, clients = scenario_split(dataset.train, _config())
    sites = sited_training(dataset.train, _config()).sites
    assert not {sites[i] for i in server.tolist()} & {sites[i] for i in clients.tolist()}
    # Appearance relative to the class: every site keeps every class, so the server's share misses none.
    assert set(dataset.train.labels[server].tolist()) == set(range(len(CLASS_NAMES)))
    for site in set(sites):
        assert {int(dataset.train.labels[i]) for i, s in enumerate(sites) if s == site} == set(range(len(CLASS_NAMES)))
    # Sites that are label groups (as pooled appearance clusters were on the real set) leave the server without a
    # class: distillation refuses that before any training, naming the class.
    label_groups = ["site-a" if label < 2 else "site-b" for label in dataset.train.labels.tolist()]
    grouped = replace(dataset, train=ArraySplit(dataset.train.images, dataset.train.labels, dataset.train.files,
                                                label_groups))
    with pytest.raises(DataError, match="has no (glioma, meningioma|notumor, pituitary) image under "
                                        "federation.scenario 'new-sites'"):
        Distiller(_config(), grouped, 0, tmp_path / "seed-0", resume=False, progress=False)
    partly = ArraySplit(dataset.train.images, dataset.train.labels, dataset.train.files,
                        ["site-a", *[""] * (len(dataset.train) - 1)])
    with pytest.raises(DataError, match="Training image .* has none"):
        scenario_split(partly, _config())


# Today's server_client_split (before scenarios) on sited_data: digests of its (server, clients) indices.
TODAYS_SPLIT = {(0.5, 0): ("30558584e3cfc541", "4749c56a5a4f973e"), (0.3, 7): ("c72f580002a4a9e3", "186795c0d57131ab")}


@pytest.mark.parametrize(("fraction", "split_seed"), list(TODAYS_SPLIT))
def test_seen_sites_split_is_unchanged(sited_data: Path, fraction: float, split_seed: int) -> None:
    train = load_dataset(sited_data).train
    config = parse_config({"data": {"client_fraction": fraction, "split_seed": split_seed}})
    assert config.federation.scenario == "seen-sites"  # still the default
    server, clients = scenario_split(train, config)
    assert (_digest(server), _digest(clients)) == TODAYS_SPLIT[(fraction, split_seed)]
    assert all(a.equal(b) for a, b in zip((server, clients), server_client_split(train, fraction, split_seed),
                                           strict=True))


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"scenario": "unseen-sites"},
         "'federation.scenario' has value 'unseen-sites'; allowed: 'seen-sites', 'new-sites'"),
        ({"scenario": 1}, "'federation.scenario' has value 1; allowed: a string"),
        ({"source_sites": 0}, "'federation.source_sites' has value 0; allowed: an integer in [1, 1000] or null"),
        ({"source_sites": 2.5}, "'federation.source_sites' has value 2.5; allowed: an integer"),
    ],
)
def test_bad_scenario_values_are_refused(federation: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"federation": federation})
    assert message in str(err.value)


def test_distillation_resumes_only_under_its_own_scenario() -> None:
    seen = _config("seen-sites").to_dict()
    before_scenarios = {**seen, "federation": {k: v for k, v in seen["federation"].items()
                                               if k not in ("scenario", "source_sites")}}
    assert resume_settings(before_scenarios) == resume_settings(seen)
    assert resume_settings(_config().to_dict()) != resume_settings(seen)
    assert resume_settings(_config(source_sites=1).to_dict()) != resume_settings(_config().to_dict())
    assert resume_settings(_config("seen-sites", source_sites=1).to_dict()) == resume_settings(seen)  # unused there


def test_a_new_sites_federation_refuses_a_start_model_that_saw_the_client_sites(tmp_path: Path) -> None:
    from edgemri.simulation.federate import check_start_split

    new = parse_config({"federation": {"scenario": "new-sites", "source_sites": 2}})
    check_start_split(new, new.to_dict(), tmp_path / "student.pt")  # distilled the same way: fine
    check_start_split(parse_config({}), {}, tmp_path / "student.pt")  # seen-sites needs no check
    for start_config in ({}, parse_config({}).to_dict(),
                         parse_config({"federation": {"scenario": "new-sites", "source_sites": 1}}).to_dict(),
                         parse_config({"data": {"split_seed": 5}, "federation": {"scenario": "new-sites",
                                                                                  "source_sites": 2}}).to_dict()):
        with pytest.raises(EdgemriError, match="may have seen the client sites"):
            check_start_split(new, start_config, tmp_path / "student.pt")
