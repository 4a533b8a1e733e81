"""Training launched outside the run's process through Dagster Pipes: `cxr train` (with
``--nproc-per-node`` for DDP) as a local subprocess or as a Kubernetes pod. The launched
`cxr train` reports its epochs as Pipes log lines and its trained model as a Pipes message;
the asset turns that message into its output and metadata, as if it had trained itself."""

import sys
from typing import Any

import dagster as dg

from cxr_platform.defs.training_pipes import TrainingMessage
from cxr_platform.errors import CxrError
from cxr_platform.settings import SECRET_SETTINGS, CxrSettings, env_name, settings_environment

# Where the launched process finds the platform: a local interpreter, or the image's entry point.
LOCAL_CXR = [sys.executable, "-m", "cxr_platform.cli"]
IMAGE_CXR = ["cxr"]


class TrainingLaunchError(CxrError):
    pass


def train_arguments(
    arch: str, *, nproc_per_node: int, epochs: int | None, batch_size: int | None
) -> list[str]:
    """`cxr train`'s arguments; everything else reaches it as CXR_* settings."""
    arguments = ["train", "--arch", arch, "--nproc-per-node", str(nproc_per_node)]
    if epochs is not None:
        arguments += ["--epochs", str(epochs)]
    if batch_size is not None:
        arguments += ["--batch-size", str(batch_size)]
    return arguments


def training_pod_spec(settings: CxrSettings) -> dict[str, Any]:
    """The pod around `cxr train`: one GPU per process unless training runs on CPU, the GPU pool
    the run launcher uses too, the settings ConfigMap and Secret, and the shared home (where the
    checkpoint must outlive the pod)."""
    training, dagster = settings.training, settings.dagster
    resources: dict[str, Any] = {"requests": {"cpu": "4", "memory": "16Gi"}}
    spec: dict[str, Any] = {
        "restart_policy": "Never",
        # The image's user, with the shared home writable to its group.
        "security_context": {"run_as_non_root": True, "run_as_user": 10001, "fs_group": 10001},
        "containers": [
            {
                "env_from": [
                    {"config_map_ref": {"name": "cxr-platform-config"}},
                    {"secret_ref": {"name": "cxr-platform-env"}},
                ],
                "resources": resources,
                "volume_mounts": [{"name": "home", "mount_path": str(training.home)}],
            }
        ],
        "volumes": [
            {
                "name": "home",
                "persistent_volume_claim": {"claim_name": dagster.training_k8s_home_claim},
            }
        ],
    }
    if training.device != "cpu":
        # A quantity, as Kubernetes writes them.
        resources["limits"] = {"nvidia.com/gpu": str(training.training_nproc_per_node)}
        spec["node_selector"] = {"cxr-platform/pool": "gpu"}
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return spec


def pod_environment(settings: CxrSettings) -> dict[str, str]:
    """The run's settings for the pod, secrets left to the Secret the pod reads: a value
    written here would show in the pod's manifest."""
    secret = {env_name(name) for name in SECRET_SETTINGS}
    return {k: v for k, v in settings_environment(settings).items() if k not in secret}


def launch_training(
    context: dg.AssetExecutionContext, settings: CxrSettings, arguments: list[str]
) -> TrainingMessage:
    """Run `cxr train` where the settings say; the model it trained and the recipe it used."""
    launcher = settings.dagster.training_launcher
    if launcher == "subprocess":
        invocation = dg.PipesSubprocessClient().run(
            context=context,
            command=[*LOCAL_CXR, *arguments],
            env=settings_environment(settings),
        )
    elif launcher == "kubernetes":
        from dagster_k8s import PipesK8sClient  # the `server` extra

        invocation = PipesK8sClient().run(
            context=context,
            image=settings.dagster.training_k8s_image,
            command=[*IMAGE_CXR, *arguments],
            namespace=settings.dagster.training_k8s_namespace,
            env=pod_environment(settings),
            base_pod_spec=training_pod_spec(settings),
        )
    else:
        raise TrainingLaunchError(f"training_launcher {launcher!r} launches nothing")
    message = TrainingMessage.from_messages(invocation.get_custom_messages())
    if message is None:
        raise TrainingLaunchError("`cxr train` finished without reporting a trained model")
    return message
