"""The check by pixels on real data, run on the code path export ships.

For a trained real-data model (the production version of a home), on the shared Kaggle training
folder split by patient as the platform splits it, and adults' chest radiographs from one or more
collections (default: both shared ones):

  - the features and the check exactly as export makes them (`population_features`, then
    `fit_population_check`: the training sample and an acquisition-shifted copy of each against
    every collection, the threshold on validation and its shifted copy), and the same function
    with one ingredient taken away (no shifted training copies; no shifted validation copy) or
    another penalty C;
  - adults refused, judged only by fits that never saw them: cross-validated by patient (what
    every earlier figure was), and with each whole collection left out in turn (what to expect
    of adults from elsewhere);
  - the paediatric validation and test splits refused (target <= 1% of test), the test split
    under each acquisition shift of the robustness benchmark, and the input gate's negatives;
  - the adults accepted, per collection: by the check fitted without their collection, and by
    the shipped check, listed with what the collection's metadata says of them, and drawn as a
    contact sheet into --pictures (never into the repository: the images are the collections');
  - with ``--segmenter CHECKPOINT`` (a lung segmentation version trained on the same split):
    whether the lung fields' geometry (`models.segmentation.LUNG_GEOMETRY`, from the fields it
    predicts) helps, judged as the shipped check is: texture alone, texture and geometry, and
    geometry alone, each with both held-out estimates and the children refused.

    .venv/bin/python benchmarks/population_check.py --home HOME [--adults DIR ...]
        [--segmenter CHECKPOINT]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from cxr_platform.data.negatives import negative_suite
from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.data.shifts import apply_shift
from cxr_platform.deployment.population import (
    DISCRIMINANT_C,
    PopulationFeatures,
    acquisition_variants,
    fit_sample,
    held_out_refusals,
    metadata_rows,
    model_features,
    out_of_population_collections,
    population_features,
)
from cxr_platform.deployment.registry import registry_for
from cxr_platform.model_version.files import ModelMetadata
from cxr_platform.model_version.input_gate import InputGate, fit_input_gate
from cxr_platform.model_version.population_check import PopulationCheck
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS
from cxr_platform.models.segmentation import lung_field_geometry, predict_lung_logits
from cxr_platform.models.segmentation_pipeline import load_segmenter
from cxr_platform.models.zoo import WithFeatures, build_model
from cxr_platform.settings import load_settings

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
THUMBNAIL = 128


def production_model(home: Path) -> tuple[torch.nn.Module, ModelMetadata]:
    settings = load_settings(home=home)
    registry = registry_for(settings.registry)
    folder = registry.download(registry.get("production").version)
    metadata = ModelMetadata.from_json((folder / "metadata.json").read_text())
    model = build_model(metadata.arch, pretrained="none").model
    model.load_state_dict(torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    return model.eval(), metadata


def figures(check: PopulationCheck) -> dict:
    outside = check.fitted_on["out_of_population"]
    return {
        "cv": outside["cv_refused_rate"],
        "left_out": outside.get("left_out_refused_rate"),
        "by_collection": {
            entry["name"]: entry.get("refused_when_left_out") for entry in outside["collections"]
        },
        "threshold": check.threshold,
    }


def what_metadata_says(rows: list[dict[str, str]], path: Path) -> str:
    """Age, sex, view and finding, from the row that names the file (or whose id it is)."""
    stem = path.name.split(".", 1)[0]
    for row in rows:
        if row.get("filename") == path.name or row.get("patientid") == stem:
            return ", ".join(
                f"{key} {row[key]}" for key in ("age", "sex", "view", "finding") if row.get(key)
            )
    return ""


def contact_sheet(images: list[np.ndarray], captions: list[str], out: Path) -> None:
    columns = min(6, max(1, len(images)))
    rows = -(-len(images) // columns)
    sheet = Image.new("L", (columns * THUMBNAIL, rows * (THUMBNAIL + 14)), 0)
    draw = ImageDraw.Draw(sheet)
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (index % columns) * THUMBNAIL, (index // columns) * (THUMBNAIL + 14)
        sheet.paste(Image.fromarray(pixels).resize((THUMBNAIL, THUMBNAIL)), (x, y))
        draw.text((x + 2, y + THUMBNAIL + 1), caption[:22], fill=255)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def shifted_test(test_images: np.ndarray, preprocessing: PreprocessingConfig) -> dict:
    rng = np.random.default_rng(0)
    originals = [square.astype(np.float32) / 255.0 for square in test_images]
    return {
        f"{shift} {severity}": np.stack(
            [
                to_square_uint8(apply_shift(o, shift, severity=severity, rng=rng), preprocessing)
                for o in originals
            ]
        )
        for shift, severity in ROBUSTNESS_SHIFTS.items()
    }


def geometry_comparison(
    segmenter_path: Path,
    features: PopulationFeatures,
    images: dict[str, np.ndarray],
    judged_texture: dict[str, np.ndarray],
    seed: int,
) -> dict:
    """Texture, texture and lung geometry, geometry alone: each fitted and judged as shipped."""
    segmenter, preprocessing = load_segmenter(segmenter_path)

    def geometry(squares: np.ndarray) -> np.ndarray:
        return lung_field_geometry(predict_lung_logits(segmenter, squares, preprocessing) > 0)

    shapes = {name: geometry(squares) for name, squares in images.items()}
    variants = {
        "texture": lambda texture, shape: texture,
        "texture + geometry": lambda texture, shape: np.c_[texture, shape],
        "geometry": lambda texture, shape: shape,
    }
    out = {}
    for label, combine in variants.items():
        candidate = replace(
            features,
            own=combine(features.own, shapes["own"]),
            val=combine(features.val, shapes["val"]),
            shifted_val=combine(features.shifted_val, shapes["shifted val"]),
            outside=combine(features.outside, shapes["outside"]),
        )
        check = candidate.fit(seed=seed)
        figure = figures(check)
        figure["children"] = {
            name: float(check.refused(combine(texture, shapes[name])).mean())
            for name, texture in judged_texture.items()
            if name.startswith("test")
        }
        out[label] = figure
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True, help="a home with a production model")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "kaggle-chest-xray-224")
    parser.add_argument(
        "--adults",
        type=Path,
        nargs="+",
        default=[SHARED / "adult-cxr-figure1", SHARED / "adult-cxr-ieee8023-subset"],
    )
    parser.add_argument(
        "--pictures", type=Path, default=None, help="default: HOME/benchmarks/population-check"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--segmenter", type=Path, default=None, help="also try the lung fields' geometry"
    )
    args = parser.parse_args()
    pictures = args.pictures or args.home / "benchmarks" / "population-check"

    started = time.perf_counter()
    model, metadata = production_model(args.home)
    settings = load_settings(home=args.home, data_dir=args.data_dir)
    seed = settings.registry.seed
    _, cache = prepare(settings.data, progress=False)
    preprocessing = PreprocessingConfig.from_dict(cache.preprocessing)
    collections = out_of_population_collections(args.adults, preprocessing)
    stages = WithFeatures(model, metadata.arch, flip=metadata.test_time_augmentation == "flip")

    # As export: population_check_for is this pair on a checkpoint's model.
    features = population_features(stages, cache, collections, seed=seed)
    shipped = features.fit(seed=seed)
    ablations: dict[str, PopulationFeatures] = {
        "without the shifted training copies": replace(
            features, own=features.own[: features.shifted_copies], shifted_copies=0
        ),
        "without the shifted validation copy": replace(
            features, shifted_val=features.shifted_val[:0]
        ),
    }
    checks = {"shipped": shipped} | {
        name: chosen.fit(seed=seed) for name, chosen in ablations.items()
    }
    results: dict = {
        "n": {
            "train_sample": features.shifted_copies,
            "val": len(features.val),
            "collections": {c.name: [len(c.images), c.n_patients] for c in collections},
        },
        "checks": {name: figures(check) for name, check in checks.items()},
        "by_c": {
            str(c): figures(shipped if c == DISCRIMINANT_C else features.fit(seed=seed, c=c))
            for c in C_GRID
        },
    }

    test_images = cache.images("test", mmap=False)
    judged = {"val": features.val, "shifted val": features.shifted_val}
    judged["test"] = model_features(stages, test_images, preprocessing)
    for name, images in shifted_test(test_images, preprocessing).items():
        judged[f"test under {name}"] = model_features(stages, images, preprocessing)
    results["children_refused"] = {
        name: {label: float(check.refused(x).mean()) for label, x in judged.items()}
        for name, check in checks.items()
    }
    if args.segmenter is not None:
        fit_on = fit_sample(cache, seed)
        val_images = cache.images("val", mmap=False)
        images = {
            "own": np.concatenate([fit_on, acquisition_variants(fit_on, preprocessing, seed=seed)]),
            "val": val_images,
            "shifted val": acquisition_variants(val_images, preprocessing, seed=seed + 1),
            "outside": np.concatenate([c.images for c in collections]),
            "test": test_images,
            **{
                f"test under {name}": x
                for name, x in shifted_test(test_images, preprocessing).items()
            },
        }
        results["geometry"] = geometry_comparison(args.segmenter, features, images, judged, seed)

    # The production version's own input gate, as it serves.
    gate = InputGate.from_dict(metadata.input_gate) if metadata.input_gate else None
    if gate is None:
        gate = fit_input_gate(cache.images("train", mmap=False), cache.images("val", mmap=False))
    negatives = negative_suite(test_images[:200], seed=0)
    squares = np.stack([to_square_uint8(n.pixels, preprocessing) for n in negatives])
    by_gate = np.array(
        [not v.accepted for v in gate.judge_many([n.pixels for n in negatives], squares)]
    )
    by_check = shipped.refused(model_features(stages, squares, preprocessing))
    results["negatives"] = {
        "n": len(negatives),
        "gate": float(by_gate.mean()),
        "gate_and_check": float((by_gate | by_check).mean()),
    }

    # The adults let through, one collection at a time.
    held = held_out_refusals(
        features.own,
        features.val,
        features.outside,
        features.groups,
        features.collections,
        shifted_val=features.shifted_val,
        seed=seed,
    )
    in_sample = shipped.refused(features.outside)
    accepted: dict[str, list[dict]] = {}
    start = 0
    for collection in collections:
        stop = start + len(collection.images)
        left_out = (
            held.collection_left_out[start:stop]
            if held.collection_left_out is not None
            else held.patient_held_out[start:stop]
        )
        described = metadata_rows(collection.paths[0].parent)
        rows, images, captions = [], [], []
        for index in np.flatnonzero(~left_out | ~in_sample[start:stop]):
            path = collection.paths[index]
            rows.append(
                {
                    "file": path.name,
                    "patient": collection.patients[index],
                    "accepted_when_left_out": bool(not left_out[index]),
                    "accepted_by_shipped": bool(not in_sample[start + index]),
                    "metadata": what_metadata_says(described, path),
                }
            )
            images.append(collection.images[index])
            captions.append(path.name)
        accepted[collection.name] = rows
        if images:
            contact_sheet(images, captions, pictures / f"accepted-{collection.name}.png")
        start = stop
    results["accepted"] = accepted
    results["pictures"] = str(pictures)
    results["seconds"] = round(time.perf_counter() - started, 1)
    report(results, metadata)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def report(results: dict, metadata: ModelMetadata) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    n = results["n"]
    adults = "; ".join(
        f"{name}: {images} images of {patients} patients"
        for name, (images, patients) in n["collections"].items()
    )
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, commit {commit}; model "
        f"{metadata.model_name} ({metadata.arch}); kaggle-chest-xray-224: {n['train_sample']} "
        f"training images (and as many shifted copies), {n['val']} validation; adults: {adults}; "
        f"{results['seconds']} s"
    )
    names = list(next(iter(results["checks"].values()))["by_collection"])
    print(
        "\n| the check (stages, C = 0.1) | adults refused, held out by patient | adults "
        "refused, their collection left out | "
        + " | ".join(f"{name} left out" for name in names)
        + " | val / shifted val refused | test refused | test under the shifts: worst |"
    )
    print("| --- |" + " ---: |" * (6 + len(names) - 1))
    for name, figure in results["checks"].items():
        children = results["children_refused"][name]
        shifts = {k: v for k, v in children.items() if k.startswith("test under")}
        worst = max(shifts, key=shifts.__getitem__)
        print(
            f"| {name} | {_rate(figure['cv'])} | {_rate(figure['left_out'])} | "
            + " | ".join(_rate(figure["by_collection"][c]) for c in names)
            + f" | {children['val']:.2%} / {children['shifted val']:.2%} | "
            f"{children['test']:.2%} | {shifts[worst]:.2%} ({worst[len('test under ') :]}) |"
        )
    print("\nby C (shipped features): held out by patient / collection left out (each)")
    for c, figure in results["by_c"].items():
        each = ", ".join(_rate(figure["by_collection"][name]) for name in names)
        print(f"  C={c}: {_rate(figure['cv'])} / {_rate(figure['left_out'])} ({each})")
    print("\nthe shipped check, the test split under each shift:")
    for label, share in results["children_refused"]["shipped"].items():
        if label.startswith("test under"):
            print(f"  {label}: {share:.2%}")
    negatives = results["negatives"]
    print(
        f"the input gate's negatives ({negatives['n']}): {negatives['gate']:.1%} refused by the "
        f"gate, {negatives['gate_and_check']:.1%} by the gate and the check"
    )
    if "geometry" in results:
        print("\nthe lung fields' geometry (adults: held out by patient / collection left out):")
        for label, figure in results["geometry"].items():
            each = ", ".join(_rate(v) for v in figure["by_collection"].values())
            children = figure["children"]
            worst = max(v for k, v in children.items() if k != "test")
            print(
                f"  {label}: {_rate(figure['cv'])} / {_rate(figure['left_out'])} ({each}); "
                f"children: test {children['test']:.2%}, worst shift {worst:.2%}"
            )
    print(f"\nadults accepted (pictures in {results['pictures']}):")
    for name, rows in results["accepted"].items():
        when_left_out = sum(row["accepted_when_left_out"] for row in rows)
        by_shipped = sum(row["accepted_by_shipped"] for row in rows)
        print(f"  {name}: {when_left_out} with it left out, {by_shipped} by the shipped check")
        for row in rows:
            marks = ("left out" if row["accepted_when_left_out"] else "") + (
                ", shipped" if row["accepted_by_shipped"] else ""
            )
            print(f"    {row['file']} (patient {row['patient']}; {row['metadata']}): {marks}")


if __name__ == "__main__":
    sys.exit(main())
