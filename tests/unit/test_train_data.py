"""Training data: CSV labels, patient-disjoint splits, slice sets, augmentation, a tiny run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.bundles import bundle as bundles
from node.lab.train import data, recipes, trainer
from node.lab.train.command import train_bundle
from node.records import SequenceLabel, SeriesVolume
from tests.unit.test_bundles import make_volume

torch.set_num_threads(1)


def _item(i: int, label: str | None, seq: str = "T1C", group: str | None = None) -> data.SeriesItem:
    return data.SeriesItem(
        group=group or f"g{i}",
        study_uid=f"1.{i}",
        series_uid=f"1.{i}.1",
        sequence=SequenceLabel(seq),
        label=label,
        paths=(Path(f"/x/{i}.dcm"),),
    )


def _phantom(item: data.SeriesItem) -> np.ndarray:
    """Positive studies ('gbm') carry a bright spot in the upper left; all have a 'brain'."""
    rng = np.random.default_rng(int(item.study_uid.split(".")[1]))
    vol = rng.normal(10, 2, (6, 48, 48)).astype(np.float32)
    vol[:, 8:40, 8:40] += 300
    if item.label == "gbm":
        vol[:, 10:20, 10:20] += 900
    return vol


def test_read_csv_labels(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("StudyInstanceUID,label,extra\n1.2,gbm,x\n1.3,,y\n1.4,pcnsl,z\n")
    assert data.read_csv_labels(csv, ("StudyInstanceUID",)) == {"1.2": "gbm", "1.4": "pcnsl"}
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,label\n1,gbm\n")
    with pytest.raises(data.DataError, match="StudyInstanceUID"):
        data.read_csv_labels(bad, ("StudyInstanceUID",))


def test_split_is_patient_disjoint_and_stratified() -> None:
    items = [_item(i, "gbm" if i % 2 else "pcnsl", group=f"p{i // 2}") for i in range(40)]
    items += [_item(100 + i, "gbm", group=f"p{i}") for i in range(3)]  # same patients again
    train, val = data.split_groups(
        items, val_fraction=0.25, seed=1, label_of=lambda it: it.label or ""
    )
    assert len(train) + len(val) == len(items)
    assert not {i.group for i in train} & {i.group for i in val}
    assert val and train
    again = data.split_groups(items, val_fraction=0.25, seed=1, label_of=lambda it: it.label or "")
    assert [i.series_uid for i in again[1]] == [i.series_uid for i in val]
    with pytest.raises(ValueError):
        data.split_groups(items, val_fraction=1.0, seed=1, label_of=lambda it: "")


def test_select_items_by_sequence_and_label() -> None:
    recipe = recipes.get_recipe("gbm_pcnsl")
    items = [_item(1, "gbm"), _item(2, None), _item(3, "pcnsl", "FLAIR"), _item(4, "pcnsl")]
    assert [i.study_uid for i in data.select_items(items, recipe)] == ["1.1", "1.4"]
    with pytest.raises(data.DataError, match="not one of"):
        data.select_items([_item(5, "lgg")], recipe)
    seq = recipes.get_recipe("sequence")
    assert len(data.select_items(items, seq)) == 4
    assert data.class_index(items[2], seq) == list(SequenceLabel).index(SequenceLabel.FLAIR)


def test_build_slice_set_matches_inference_preprocessing() -> None:
    recipe = recipes.get_recipe("gbm_pcnsl")
    items = [_item(1, "gbm"), _item(2, "pcnsl")]
    s = data.build_slice_set(items, recipe, load=_phantom)
    assert s.x.shape == (12, 1, 128, 128) and s.x.dtype == torch.float16
    assert s.y.tolist() == [1] * 6 + [0] * 6
    assert s.series.tolist() == [0] * 6 + [1] * 6
    assert s.series_labels == (1, 0)
    vol = _phantom(items[0])
    idx = bundles.select_slices(vol, recipe.slice_mode, recipe.slice_n)
    ref = bundles.preprocess(vol, idx, size=(128, 128), channels=1, low=0.5, high=99.5)
    assert torch.allclose(s.x[:6].float(), ref, atol=1e-3)
    assert torch.equal(s.target.argmax(1), s.y)  # no lesion info: hard targets


def test_slice_targets_uniform_away_from_known_lesions() -> None:
    it = dataclasses.replace(_item(1, "gbm"), lesions=((5, 10.0),), lesions_known=True)
    # radius 10 mm, 5 mm slices: sections >= 3 mm radius one slice either side of the centre
    t = data.slice_targets(it, [1, 4, 5, 6, 9], 2, 1, 5.0)
    assert t.tolist() == [[0.5, 0.5], [0, 1], [0, 1], [0, 1], [0.5, 0.5]]
    control = dataclasses.replace(_item(2, "pcnsl"), lesions=(), lesions_known=True)
    assert data.slice_targets(control, [1, 9], 2, 0, 5.0).tolist() == [[1, 0], [1, 0]]
    unknown = dataclasses.replace(it, lesions_known=False)
    assert data.slice_targets(unknown, [1], 2, 1, 5.0).tolist() == [[0, 1]]


def test_augment_batch_is_seeded_and_bounded() -> None:
    x = torch.rand(4, 1, 32, 32)
    aug = recipes.get_recipe("tubers").augment
    a = trainer.augment_batch(x, aug, torch.Generator().manual_seed(3))
    b = trainer.augment_batch(x, aug, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    none = recipes.Augment(hflip=False)
    assert torch.equal(trainer.augment_batch(x, none, torch.Generator()), x)


def test_published_recipe_needs_a_weights_file(tmp_path: Path) -> None:
    r = recipes.get_recipe("gbm_pcnsl", "published")
    assert r.network_name == "EfficientNetBN" and r.size == (380, 380)
    assert r.network_args["model_name"] == "efficientnet-b4"
    assert r.network_args["pretrained"] is False
    assert recipes.get_recipe("tubers", "published").augment.rotate_deg == 30
    assert recipes.get_recipe("sequence", "published").network_name == "ResNet"
    from node.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="not found"):
        net = bundles.build_network("ResNet", recipes.get_recipe("tubers_flair").network_args)
        trainer.load_pretrained(net, tmp_path / "missing.pt")
    src = bundles.build_network("ResNet", recipes.get_recipe("tubers_flair").network_args)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = bundles.build_network("ResNet", recipes.get_recipe("tubers_flair").network_args)
    assert trainer.load_pretrained(dst, tmp_path / "w.pt") == len(src.state_dict())
    with pytest.raises(ValueError, match="unknown task"):
        recipes.get_recipe("spleen")


@pytest.mark.slow
def test_tiny_training_run_writes_a_loadable_bundle(tmp_path: Path) -> None:
    items = [_item(i, "gbm" if i % 2 else "pcnsl") for i in range(16)]
    out = train_bundle(
        recipes.get_recipe("gbm_pcnsl"),
        items,
        tmp_path / "b",
        seed=0,
        epochs=3,
        data_description="unit phantoms",
        progress=lambda _l: None,
        load=_phantom,
    )
    b = bundles.load_bundle(out)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["training"]["epochs"] == 3
    assert meta["training"]["split"]["n_val_patients"] >= 2
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["postprocessing"]["temperature"] > 0  # the one place it is written
    assert "temperature" not in meta
    assert "NOT FOR CLINICAL USE" in (out / "docs" / "README.md").read_text()
    assert b.metadata.name == "gbm_pcnsl_t1c"
    from node.lab.train.evaluate import evaluate_task, record_evaluation

    def volume(it: data.SeriesItem) -> SeriesVolume:
        pix = _phantom(it)
        return dataclasses.replace(make_volume(n=pix.shape[0], rows=48, cols=48), pixels=pix)

    report = evaluate_task(b, items, out=tmp_path / "eval", load=volume)
    assert report["n_patients"] == 16 and len(report["auc_ci"]) == 2
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000
    record_evaluation(out, report, "unit phantoms", tmp_path / "eval")
    card = (out / "docs" / "README.md").read_text()
    assert f"{report['auc']:.3f}" in card and "![roc.png](roc.png)" in card
    bundles.load_bundle(out)  # metadata rewrite keeps the weights' checksum valid
    assert "pretrained" not in meta["training"]
    weights = out / "models" / "model.pt"
    tuned = train_bundle(
        recipes.get_recipe("gbm_pcnsl"),
        items,
        tmp_path / "tuned",
        seed=0,
        epochs=1,
        pretrained=weights,
        progress=lambda _l: None,
        load=_phantom,
    )
    tuned_meta = json.loads((tuned / "configs" / "metadata.json").read_text())
    assert tuned_meta["training"]["pretrained"] == {
        "file": "model.pt",
        "sha256": bundles.sha256_file(weights),
    }


def test_fold_groups_partition_patients_and_stratify() -> None:
    items = [_item(i, "gbm" if i % 3 else "pcnsl", group=f"p{i // 2}") for i in range(60)]
    folds = data.fold_groups(items, folds=5, seed=3, label_of=lambda it: it.label or "")
    assert len(folds) == 5
    everyone = {it.group for it in items}
    assert set().union(*folds) == everyone
    assert sum(len(f) for f in folds) == len(everyone)  # disjoint
    assert max(len(f) for f in folds) - min(len(f) for f in folds) <= 1
    first = {it.group: it.label for it in reversed(items)}
    for f in folds:
        assert {first[g] for g in f} == {"gbm", "pcnsl"}  # both labels in every fold
    again = data.fold_groups(items, folds=5, seed=3, label_of=lambda it: it.label or "")
    assert again == folds
    assert data.fold_groups(items, folds=5, seed=4, label_of=lambda it: it.label or "") != folds
    with pytest.raises(ValueError, match="2 folds"):
        data.fold_groups(items, folds=1, seed=0, label_of=lambda it: "")
    with pytest.raises(data.DataError, match="cannot fill"):
        data.fold_groups(items[:4], folds=5, seed=0, label_of=lambda it: "")


@pytest.mark.slow
def test_cross_validation_holds_out_each_patient_once(tmp_path: Path) -> None:
    from node.lab.train.command import cross_validate

    items = [_item(i, "gbm" if i % 2 else "pcnsl") for i in range(24)]

    def volume(it: data.SeriesItem) -> SeriesVolume:
        pix = _phantom(it)
        return dataclasses.replace(make_volume(n=pix.shape[0], rows=48, cols=48), pixels=pix)

    result = cross_validate(
        recipes.get_recipe("gbm_pcnsl"),
        items,
        tmp_path / "cv",
        folds=3,
        epochs=2,
        progress=lambda _l: None,
        load=_phantom,
        volume_load=volume,
    )
    assert result["n_patients"] == 24  # every patient scored exactly once, out of fold
    assert [f["n_patients"] for f in result["per_fold"]] == [8, 8, 8]
    assert result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["folds"] == 3
    for k in (1, 2, 3):
        meta = json.loads((tmp_path / "cv" / f"fold_{k}" / "configs" / "metadata.json").read_text())
        assert (
            meta["training"]["split"]["n_train_patients"]
            + meta["training"]["split"]["n_val_patients"]
            == 16
        )  # the fold's 8 held-out patients never train
    assert (tmp_path / "cv" / "roc.png").stat().st_size > 1000


def test_label_map_parses_and_refuses_bad_text() -> None:
    assert data.parse_label_map("GBM=gbm, PCNSL=pcnsl") == {"GBM": "gbm", "PCNSL": "pcnsl"}
    assert data.parse_label_map(None) == {}
    for bad in ("GBM", "GBM=", "=gbm", "GBM=gbm,GBM=pcnsl"):
        with pytest.raises(data.DataError, match="label-map"):
            data.parse_label_map(bad)


def test_label_map_turns_a_sites_labels_into_the_tasks(tmp_path: Path) -> None:
    from tests.unit.test_dicomio import write_mr

    (tmp_path / "d").mkdir()
    write_mr(tmp_path / "d" / "a.dcm", study="1.2.3", series="1.2.3.4", position=(0.0, 0.0, 0.0))
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n1.2.3,GBM\n")
    items = data.load_items(tmp_path / "d", "gbm_pcnsl", labels, {"GBM": "gbm", "PCNSL": "pcnsl"})
    assert [it.label for it in items] == ["gbm"]
    with pytest.raises(data.DataError, match="not in --label-map"):
        data.load_items(tmp_path / "d", "gbm_pcnsl", labels, {"PCNSL": "pcnsl"})


def test_sequence_slice_set_is_cut_in_the_acquired_plane() -> None:
    from node.dicom.canonical import canonical_axial
    from tests.unit.test_bundles import sagittal_volume

    volume = sagittal_volume()
    items = [_item(1, None, "T2")]
    recipe = recipes.get_recipe("sequence", "planes")
    assert recipe.slice_plane == "acquired"
    s = data.build_slice_set(items, recipe, load=lambda _it: volume)
    idx = bundles.select_slices(volume.pixels, "central_window", recipe.slice_n)
    ref = bundles.preprocess(volume.pixels, idx, size=(128, 128), channels=1, low=0.5, high=99.5)
    assert s.x.shape[0] == len(idx) and torch.allclose(s.x.float(), ref, atol=1e-3)
    axial = dataclasses.replace(recipe, slice_plane="canonical_axial")
    canon = canonical_axial(volume).pixels
    s_axial = data.build_slice_set(items, axial, load=lambda _it: volume)
    idx_axial = bundles.select_slices(canon, "central_window", recipe.slice_n)
    ref_axial = bundles.preprocess(
        canon, idx_axial, size=(128, 128), channels=1, low=0.5, high=99.5
    )
    assert torch.allclose(s_axial.x.float(), ref_axial, atol=1e-3)
    assert not torch.allclose(s_axial.x.float()[:1], s.x.float()[:1], atol=1e-2)


def test_epoch_draws_at_most_its_slice_budget_afresh_each_epoch() -> None:
    recipe = recipes.get_recipe("sequence", "planes")
    n = 50
    train = data.SliceSet(
        x=torch.zeros(n, 1, 4, 4, dtype=torch.float16),
        y=torch.zeros(n, dtype=torch.int64),
        target=torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.int64), 7).float(),
        series=torch.arange(n),
        series_labels=(0,) * n,
        series_groups=tuple(f"g{i}" for i in range(n)),
        series_uids=tuple(f"u{i}" for i in range(n)),
    )
    gen = torch.Generator().manual_seed(0)
    first = trainer._epoch_order(train, gen, 20)
    second = trainer._epoch_order(train, gen, 20)
    assert len(first) == len(second) == 20
    assert len(set(first.tolist())) == 20 and set(first.tolist()) != set(second.tolist())
    assert sorted(trainer._epoch_order(train, gen, None).tolist()) == list(range(n))
    assert recipe.epoch_slices is not None and recipe.epoch_slices > 0
