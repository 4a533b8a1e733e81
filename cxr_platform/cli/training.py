"""Training commands: ``cxr train``, ``cxr ensemble`` and ``cxr evaluate``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cxr_platform.cli.group import (
    DATA_OPTION,
    LazyChoice,
    architecture_names,
    cli,
    fail_cleanly,
    settings_for,
)
from cxr_platform.errors import CxrError
from cxr_platform.sections import PRETRAINED_MODES, TEST_TIME_AUGMENTATIONS, TRAINING_PROFILES
from cxr_platform.terminal import interactive


@cli.command()
@DATA_OPTION
@click.option(
    "--arch",
    type=LazyChoice(architecture_names),
    default="resnet18",
    show_default=True,
)
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(TRAINING_PROFILES),
    default=None,
    help="Recipe defaults (default: demo on the synthetic set, full on real data).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Total epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--pretrained", type=click.Choice(PRETRAINED_MODES), default=None)
@click.option(
    "--weights",
    "weights_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Local ImageNet weights file (torchvision state dict).",
)
@click.option("--device", default=None, help="cuda, cuda:1, cpu (default: auto).")
@click.option(
    "--compile/--no-compile",
    "torch_compile",
    default=None,
    help="torch.compile the training passes (default: CXR_TORCH_COMPILE, off).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest last.pt of this arch.")
@click.option(
    "--nproc-per-node",
    "training_nproc_per_node",
    type=click.IntRange(min=1),
    default=None,
    help="Processes on this machine, with DistributedDataParallel (torchrun's launcher): one "
    "per GPU, or CPU processes sharing the cores. The batch size stays the global batch "
    "(default: CXR_TRAINING_NPROC_PER_NODE, 1).",
)
@click.pass_context
@fail_cleanly
def train(
    ctx: click.Context,
    data_dir: Path | None,
    arch: str,
    profile_name: str | None,
    epochs: int | None,
    batch_size: int | None,
    pretrained: str | None,
    weights_path: str | None,
    device: str | None,
    torch_compile: bool | None,
    resume: bool,
    training_nproc_per_node: int | None,
) -> None:
    """Train one model on the patient split of the data and track it in MLflow."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.defs.training_pipes import TrainingMessage, pipes_session
    from cxr_platform.models import pipeline as model_pipeline

    settings = settings_for(
        ctx,
        data_dir=data_dir,
        device=device,
        torch_compile=torch_compile,
        training_nproc_per_node=training_nproc_per_node,
    )
    training = settings.training
    nproc_per_node = training.training_nproc_per_node
    progress = interactive()
    manifest, cache = pipeline.prepare(settings.data, progress=progress)
    profile_used = profile_name or training.profile
    config = model_pipeline.train_config_for(
        training,
        arch,
        profile=profile_used,
        epochs=epochs,
        batch_size=batch_size,
        pretrained=pretrained,
        weights_path=weights_path,
    )
    processes = f" in {nproc_per_node} processes" if nproc_per_node > 1 else ""
    click.echo(
        f"Training {arch} ({profile_used} profile: {config.frozen_epochs} frozen + "
        f"{config.finetune_epochs} fine-tune epochs) on {len(cache.index('train'))} images"
        f"{processes}"
    )
    with pipes_session() as pipes:
        trained = model_pipeline.train_here(
            training,
            cache,
            config,
            profile=profile_used,
            manifest_hash=manifest_hash(manifest),
            dagster_run_id=pipes.run_id if pipes else None,
            progress=progress,
            resume=resume,
            on_epoch=pipes.log.info if pipes else None,
        )
        if pipes:
            pipes.report_custom_message(TrainingMessage(trained, config).to_message())
    click.echo(
        f"best validation AUC {trained.best_val_auc:.4f} at epoch {trained.best_epoch} "
        f"({trained.epochs_run} epochs, {trained.wall_seconds:.0f} s on {trained.device}, "
        f"pretrained={str(trained.pretrained).lower()}; schedule {trained.schedule})\n"
        f"checkpoint {trained.checkpoint}\nMLflow run {trained.mlflow_run_id} "
        f"({training.tracking_uri})\nnext: cxr evaluate"
    )


@cli.command()
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the test metrics as JSON here.",
)
@click.pass_context
@fail_cleanly
def evaluate(ctx: click.Context, json_path: Path | None) -> None:
    """Evaluate the most recently trained model on the test split.

    The threshold and calibration are fitted on validation first; test only measures."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.models import pipeline as model_pipeline
    from cxr_platform.models.reporting import report_markdown

    trained = model_pipeline.latest_trained(settings_for(ctx).training)
    settings = settings_for(ctx, data_dir=trained.data_dir)
    manifest, cache = pipeline.prepare(settings.data, progress=interactive())
    if trained.manifest_hash and manifest_hash(manifest) != trained.manifest_hash:
        raise CxrError(
            "the patient split differs from the one this model was trained on "
            "(data or split settings changed); retrain before evaluating"
        )
    report, files = model_pipeline.evaluate_trained(settings.training, cache, trained)
    click.echo(report_markdown(report))
    click.echo(f"report: {files['markdown'].parent}")
    if json_path:
        json_path.write_text(json.dumps(report.headline("test"), indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@cli.command()
@click.argument("run_ids", nargs=-1, required=True)
@click.option(
    "--tta",
    "test_time_augmentation",
    type=click.Choice(TEST_TIME_AUGMENTATIONS),
    default=None,
    help="Test-time augmentation inside the version's graph: flip scores each image and its "
    "mirror image (twice the inference cost). Default: CXR_ENSEMBLE_TTA, none.",
)
@click.option(
    "--name", "model_name", default="ensemble", show_default=True, help="The version's model name."
)
@click.pass_context
@fail_cleanly
def ensemble(
    ctx: click.Context,
    run_ids: tuple[str, ...],
    test_time_augmentation: str | None,
    model_name: str,
) -> None:
    """Combine trained and evaluated runs (their MLflow run ids) into one ensemble model.

    Each member's logit goes through its own calibration and the version averages them; the
    first run is the one Grad-CAM explains with. Then `cxr evaluate` and `cxr export`, as after
    training."""
    from cxr_platform.data import pipeline
    from cxr_platform.data.splits import manifest_hash
    from cxr_platform.models.ensemble import build_ensemble, trained_run

    settings = settings_for(ctx)
    members = [trained_run(settings.training, run_id) for run_id in run_ids]
    settings = settings_for(ctx, data_dir=members[0].trained.data_dir)
    manifest, cache = pipeline.prepare(settings.data, progress=interactive())
    if any(
        m.trained.manifest_hash and m.trained.manifest_hash != manifest_hash(manifest)
        for m in members
    ):
        raise CxrError(
            "the patient split differs from the one the members were trained on "
            "(data or split settings changed)"
        )
    trained = build_ensemble(
        settings.training,
        cache,
        members,
        model_name=model_name,
        test_time_augmentation=test_time_augmentation or settings.training.ensemble_tta,
    )
    for figures in trained.members:
        click.echo(
            f"member {figures['model_name']} ({figures['mlflow_run_id']}): validation AUC "
            f"{figures['best_val_auc']:.4f}, test AUC {figures['test_auc']:.4f}"
        )
    click.echo(
        f"{trained.arch}: validation AUC {trained.best_val_auc:.4f}\n"
        f"checkpoint {trained.checkpoint}\nMLflow run {trained.mlflow_run_id}\n"
        "next: cxr evaluate"
    )
