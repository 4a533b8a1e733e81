"""The input gate on real data: in-distribution refusal, shifted radiographs, and negatives.

Fits the gate exactly as export does (training split, threshold on validation), then reports:
  - refusal on validation and on the internal test split (targets: <= 1% each);
  - refusal on the test split under each acquisition shift of ``monitoring/shifts.py`` at the
    robustness severities, and contrast at 1.0 as the demo loop sends it (target: <= 5%);
  - refusal per negative kind from ``cxr_platform.data.negatives``, the transformed kinds made
    from every test radiograph unless --transformed says fewer (target: >= 95% overall, no
    kind below 80%); a kind with fewer than 20 distinct sources gets a Clopper-Pearson 95%
    interval and no target.

    .venv/bin/python benchmarks/input_gate.py [DATA_DIR] [--transformed N]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from cxr_platform.data.negatives import UNSOURCED_KINDS, negative_suite
from cxr_platform.data.pipeline import prepare
from cxr_platform.data.preprocessing import PreprocessingConfig, to_square_uint8
from cxr_platform.data.shifts import apply_shift
from cxr_platform.model_version.input_gate import InputGate, fit_input_gate
from cxr_platform.models.robustness import ROBUSTNESS_SHIFTS
from cxr_platform.settings import load_settings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kaggle-chest-xray-224"
LOOP_SHIFT = ("contrast", 1.0)  # what `cxr demo` sends through the service


def refusal(gate: InputGate, originals: list[np.ndarray], config: PreprocessingConfig) -> float:
    squares = np.stack([to_square_uint8(original, config) for original in originals])
    verdicts = gate.judge_many(originals, squares)
    return sum(not v.accepted for v in verdicts) / len(verdicts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=SHARED_DATA)
    parser.add_argument(
        "--transformed", type=int, default=0, help="test radiographs to transform (0: all)"
    )
    parser.add_argument("--home", type=Path, default=Path("/tmp/cxr-input-gate-benchmark"))
    args = parser.parse_args()

    settings = load_settings(home=args.home, data_dir=args.data_dir)
    _, cache = prepare(settings.data, progress=False)
    config = PreprocessingConfig.from_dict(cache.preprocessing)
    train, val, test = (cache.images(split, mmap=False) for split in ("train", "val", "test"))
    started = time.perf_counter()
    gate = fit_input_gate(train, val)
    fit_seconds = time.perf_counter() - started
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, commit {commit}; "
        f"{args.data_dir.name}: {len(train)} train / {len(val)} val / {len(test)} test images "
        f"at {config.image_size}px; fitted in {fit_seconds:.1f} s; threshold {gate.threshold:.3f}"
    )
    as_float = [image.astype(np.float32) / 255.0 for image in test]
    print(f"validation refused: {gate.fitted_on['val_refusal_rate']:.2%} (target <= 1%)")
    print(f"internal test refused: {refusal(gate, as_float, config):.2%} (target <= 1%)")

    rng = np.random.default_rng(0)
    shifts = [*ROBUSTNESS_SHIFTS.items(), LOOP_SHIFT]
    for shift, severity in shifts:
        shifted = [apply_shift(image, shift, severity=severity, rng=rng) for image in as_float]
        print(
            f"test under {shift} {severity:g}: {refusal(gate, shifted, config):.2%} refused "
            "(target <= 5%)"
        )
    # Full severity, for information: stronger than any loop or robustness run uses.
    for shift in ROBUSTNESS_SHIFTS:
        shifted = [apply_shift(image, shift, severity=1.0, rng=rng) for image in as_float]
        print(f"test under {shift} 1 (no target): {refusal(gate, shifted, config):.2%} refused")

    # Its own generator: which radiographs are transformed does not depend on the shifts above.
    pick = np.random.default_rng(1)
    n_chosen = len(test) if args.transformed <= 0 else min(args.transformed, len(test))
    chosen = test[np.sort(pick.choice(len(test), n_chosen, replace=False))]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    sources: dict[str, set[str]] = defaultdict(set)
    for negative in negative_suite(chosen):
        square = to_square_uint8(negative.pixels, config)
        verdict = gate.judge(negative.pixels, square)
        by_kind[negative.kind].append(not verdict.accepted)
        sources[negative.kind].add(negative.source.split("#")[0])
    total = sum(len(v) for v in by_kind.values())
    refused = sum(sum(v) for v in by_kind.values())
    print(f"\nnegatives: {refused}/{total} refused = {refused / total:.1%} (target >= 95%)")
    print("| kind | images | distinct sources | refused | 95% CI (Clopper-Pearson) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for kind, outcomes in sorted(by_kind.items()):
        k, n = sum(outcomes), len(outcomes)
        interval = ""
        if len(sources[kind]) < 20:
            ci = binomtest(k, n).proportion_ci(method="exact")
            interval = f"{ci.low:.1%}-{ci.high:.1%} (no target: < 20 sources)"
        print(f"| {kind} | {n} | {len(sources[kind])} | {k / n:.1%} | {interval} |")
    print(f"\nnot sourced here: {', '.join(UNSOURCED_KINDS)}")


if __name__ == "__main__":
    main()
