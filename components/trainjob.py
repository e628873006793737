"""launch-trainjob: the multi-node distill step, as a Kubeflow Trainer v2 TrainJob or a Training Operator v1
PyTorchJob created from the pipeline.

The task itself needs no GPU. It stages the latent cache, the rollout shards and the resolved config on the shared
`ddil-data` volume (mounted at /data here and in every training pod), creates the job, follows it (status, rank 0's
log copied into the task log), deletes it at the end whatever happened, fails when the job failed, and returns the
student the job wrote as its Model artifact. A TrainJob is followed, logged and deleted with the Kubeflow SDK's
TrainerClient (kubeflow==0.5.0); a PyTorchJob, which that SDK does not handle, with the kubernetes watch API. Both
are created by `create_job` (why: its docstring).

Every node runs `accelerate launch ... -m ddil_core.cli distill ...` (the same command as k8s/training/*.yaml).
The task's pod needs the service account `ddil-pipeline` (k8s/base/rbac.yaml) to create and watch the jobs.

The functions below are plain and self-contained (imports inside) because they are pasted into the component's
source (kfp additional_funcs); the tests run them against a stub of the Kubernetes API
(tests/fakes/kube_training_stub.py).
"""

from typing import List

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.common import DDIL_IMAGE, copy_folder, ddil_component, stage_config

def distill_job_name(run_id: str) -> str:
    """A stable, valid Kubernetes name per pipeline run: a retried task finds (and resumes) its own job folder."""
    import hashlib

    return "ddil-distill-" + hashlib.sha256(str(run_id).encode()).hexdigest()[:10]


def distill_job_args(config_path: str, latents: str, rollouts: str, out: str, metrics_port: int = 9100,
                     run_id: str = "") -> list:
    """The `ddil` command line every node runs (after `accelerate launch ... -m ddil_core.cli`)."""
    args = ["distill", f"--config={config_path}", f"--latents={latents}", f"--rollouts={rollouts}", f"--out={out}"]
    if metrics_port:
        args.append(f"--set=telemetry.metrics_port={int(metrics_port)}")  # rank 0 serves /metrics (PodMonitor)
    if run_id:
        args.append(f"--set=telemetry.run_id='{run_id}'")  # the pipeline run's id: one Pushgateway group per run
    return args


def accelerate_launch_script(operator: str) -> str:
    """The node entry point of k8s/training/{trainjob,pytorchjob}.yaml: `accelerate launch` over all nodes with the
    rendezvous variables of the operator (v2: the Trainer's PET_*, v1: the PyTorchJob's RANK/MASTER_*)."""
    names = {
        "v2": ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"),
        "v1": ("DDIL_NNODES", "DDIL_NPROC_PER_NODE", "RANK", "MASTER_ADDR", "MASTER_PORT"),
    }
    if operator not in names:
        raise ValueError(f"training_operator = {operator!r} must be 'v2' (Trainer TrainJob) or 'v1' (PyTorchJob)")
    nnodes, nproc, rank, addr, port = names[operator]
    return (
        "set -eu\n"
        f'nnodes="${{{nnodes}:?}}"\n'
        f'nproc="${{{nproc}:?}}"\n'
        "world=$((nnodes * nproc))\n"
        'multi=""\n'
        'if [ "$world" -gt 1 ]; then multi="--multi_gpu"; fi\n'
        "exec accelerate launch $multi \\\n"
        f'  --num_machines "$nnodes" --num_processes "$world" --machine_rank "${{{rank}:?}}" \\\n'
        f'  --main_process_ip "${{{addr}:?}}" --main_process_port "${{{port}:?}}" \\\n'
        "  --rdzv_backend static --same_network --max_restarts 0 \\\n"
        '  -m ddil_core.cli "$@"\n'
    )


def trainjob_manifest(name: str, namespace: str, image: str, num_nodes: int, gpus_per_node: int,
                      gpu_resource: str, args: list, runtime: str = "ddil-torch-distributed") -> dict:
    """A Kubeflow Trainer v2 TrainJob on the namespaced runtime of k8s/training/trainingruntime.yaml (which holds
    the pod settings: GPU node pool, volumes, credentials, /dev/shm, metrics port)."""
    if int(num_nodes) < 1:
        raise ValueError(f"num_nodes = {num_nodes} must be at least 1")
    gpus = int(gpus_per_node)
    labels = {"app.kubernetes.io/name": "ddil", "app.kubernetes.io/component": "distill",
              "app.kubernetes.io/part-of": "ddil"}
    trainer = {
        "image": image,
        "numNodes": int(num_nodes),
        "numProcPerNode": max(1, gpus),
        "command": ["sh", "-c", accelerate_launch_script("v2"), "ddil-distill"],
        "args": [str(a) for a in args],
    }
    if gpus > 0:
        trainer["resourcesPerNode"] = {"requests": {gpu_resource: gpus}, "limits": {gpu_resource: gpus}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": runtime, "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime"},
            "trainer": trainer,
        },
    }


def pytorchjob_manifest(name: str, namespace: str, image: str, num_nodes: int, gpus_per_node: int,
                        gpu_resource: str, args: list) -> dict:
    """A Training Operator v1 PyTorchJob (Master + num_nodes - 1 Workers, one pod template), as
    k8s/training/pytorchjob.yaml: exit codes 1-127 are final (`ddil` exits 2 on bad input), 128-255 restart."""
    import copy

    if int(num_nodes) < 1:
        raise ValueError(f"num_nodes = {num_nodes} must be at least 1")
    gpus = int(gpus_per_node)
    nproc = max(1, gpus)
    labels = {"app.kubernetes.io/name": "ddil", "app.kubernetes.io/component": "distill",
              "app.kubernetes.io/part-of": "ddil"}
    container = {
        "name": "pytorch",  # the operator requires this name
        "image": image,
        "command": ["sh", "-c", accelerate_launch_script("v1"), "ddil-distill"],
        "args": [str(a) for a in args],
        "env": [{"name": "DDIL_NNODES", "value": str(int(num_nodes))},
                {"name": "DDIL_NPROC_PER_NODE", "value": str(nproc)}],
        "envFrom": [{"configMapRef": {"name": "ddil-settings"}},
                    {"secretRef": {"name": "ddil-s3-credentials", "optional": True}},
                    {"secretRef": {"name": "ddil-hf-token", "optional": True}}],
        "ports": [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "hf-cache", "mountPath": "/cache/huggingface"},
                         {"name": "ddil-data", "mountPath": "/data"},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if gpus > 0:
        container["resources"] = {"requests": {gpu_resource: gpus}, "limits": {gpu_resource: gpus}}
    pod = {
        "metadata": {"labels": dict(labels)},
        "spec": {
            "serviceAccountName": "ddil-worker",
            "terminationGracePeriodSeconds": 300,
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": [{"name": "hf-cache", "persistentVolumeClaim": {"claimName": "hf-cache"}},
                        {"name": "ddil-data", "persistentVolumeClaim": {"claimName": "ddil-data"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}],
        },
    }
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": pod}}
    if int(num_nodes) > 1:
        replicas["Worker"] = {"replicas": int(num_nodes) - 1, "restartPolicy": "ExitCode",
                              "template": copy.deepcopy(pod)}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nprocPerNode": str(nproc), "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 3},
                 "pytorchReplicaSpecs": replicas},
    }


def job_resource(kind: str) -> tuple:
    """(group, version, plural) of a job kind for the CustomObjectsApi."""
    table = {"TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
             "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs")}
    if kind not in table:
        raise ValueError(f"unknown job kind {kind!r}")
    return table[kind]


def job_state(job: dict) -> tuple:
    """('Succeeded' | 'Failed' | 'Running', message) from a TrainJob (Complete/Failed conditions) or a PyTorchJob
    (Succeeded/Failed conditions)."""
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    for cond in conditions:
        if str(cond.get("status")) != "True":
            continue
        text = ": ".join(str(x) for x in (cond.get("reason"), cond.get("message")) if x)
        if cond.get("type") == "Failed":
            return "Failed", text or "Failed"
        if cond.get("type") in ("Complete", "Succeeded"):
            return "Succeeded", text or cond.get("type")
    latest = conditions[-1] if conditions else {}
    return "Running", str(latest.get("type") or "Pending")


def create_job(custom_api, manifest: dict, log=print, sleep=None, clock=None) -> None:
    """Create the job; one left by an earlier attempt of the same task (same name: the run's) is deleted first.

    Neither TrainerClient nor the Training Operator's API replaces an existing job, and TrainerClient.train()
    cannot create this TrainJob: its CustomTrainerContainer has no numProcPerNode, without which the Trainer sets
    PET_NPROC_PER_NODE=auto on GPU nodes (the launch script needs the number). So the launcher creates its own
    manifest (tests validate it against the Trainer CRDs) with the SDK's API client."""
    import time

    sleep, clock = sleep or time.sleep, clock or time.monotonic
    group, version, plural = job_resource(manifest["kind"])
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        custom_api.create_namespaced_custom_object(group, version, namespace, plural, manifest)
        return
    except Exception as exc:  # noqa: BLE001 - kubernetes.client.ApiException
        if getattr(exc, "status", None) != 409:
            raise
    log(f"{manifest['kind']} {namespace}/{name} exists (an earlier attempt): replacing it")
    custom_api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                               propagation_policy="Foreground")
    deadline = clock() + 300
    while True:
        try:
            custom_api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "status", None) == 404:
                break
            raise
        if clock() > deadline:
            raise TimeoutError(f"{manifest['kind']} {namespace}/{name} of an earlier attempt is still being deleted")
        sleep(2)
    custom_api.create_namespaced_custom_object(group, version, namespace, plural, manifest)


def follow_logs(pods, stream, stop, log, wait: float) -> None:
    """Copy rank 0's log into the task log while the job runs: `pods()` names rank 0's current pod (None while
    pending), `stream(pod)` yields its lines until it ends. Each pod is followed once (a restarted job's new pod is
    followed next); errors only cost log lines."""
    followed = set()
    while not stop.is_set():
        try:
            pod = pods()
            if pod and pod not in followed:
                followed.add(pod)
                for line in stream(pod):
                    log(f"[{pod}] {line}")
                    if stop.is_set():
                        return
        except Exception as exc:  # noqa: BLE001 - logs are best effort
            log(f"(logs not available yet: {type(exc).__name__})")
        stop.wait(wait)


def run_trainjob(trainer, manifest: dict, poll_seconds: float = 30.0, timeout_seconds: float = 7 * 24 * 3600.0,
                 log=print) -> None:
    """A TrainJob through the Kubeflow SDK's TrainerClient (`trainer`): created (create_job), followed
    (wait_for_job_status: Complete, or RuntimeError when Failed, TimeoutError after timeout_seconds), rank 0's
    log streamed (get_job_logs follow), and deleted at the end whatever happened (delete_job)."""
    import threading

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    group, version, plural = job_resource("TrainJob")
    api = trainer.backend.custom_api  # the SDK's own client, for what the SDK cannot do (create_job)

    def rank0_pod():
        steps = {step.name: step for step in trainer.get_job(name).steps}
        step = steps.get("node-0")
        return step.pod_name if step is not None and step.status not in (None, "Pending") else None

    stop = threading.Event()
    created = False
    try:
        create_job(api, manifest, log)
        created = True
        log(f"created TrainJob {namespace}/{name}")
        follower = threading.Thread(target=follow_logs, daemon=True, args=(
            rank0_pod, lambda pod: trainer.get_job_logs(name, follow=True), stop, log, poll_seconds))
        follower.start()
        poll = max(1, int(poll_seconds))
        try:
            trainer.wait_for_job_status(name, status={"Complete"}, timeout=max(poll + 1, int(timeout_seconds)),
                                        polling_interval=poll)
        except RuntimeError:  # the SDK says "is Failed": say why, from the job's conditions
            state, message = job_state(api.get_namespaced_custom_object(group, version, namespace, plural, name))
            if state == "Failed":
                raise RuntimeError(f"TrainJob {namespace}/{name} failed: {message}") from None
            raise
        log(f"TrainJob {name} succeeded")
    finally:
        stop.set()
        if created:
            try:
                trainer.delete_job(name)
                log(f"deleted TrainJob {namespace}/{name}")
            except Exception as exc:  # noqa: BLE001 - never hide the job's own outcome
                log(f"could not delete TrainJob {namespace}/{name}: {exc}")


def run_pytorchjob(custom_api, core_api, manifest: dict, poll_seconds: float = 30.0,
                   timeout_seconds: float = 7 * 24 * 3600.0, log=print) -> dict:
    """A Training Operator v1 PyTorchJob (the Kubeflow SDK has no client for it) with the kubernetes watch API:
    created (create_job), its status watched until Succeeded (returned) or Failed (RuntimeError; TimeoutError after
    timeout_seconds), the master's log streamed, deleted at the end whatever happened."""
    import threading
    import time

    from kubernetes import watch

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    group, version, plural = job_resource("PyTorchJob")
    master = f"{name}-master-0"  # the operator's name for the Master replica's pod

    def master_pod():
        pod = core_api.read_namespaced_pod(master, namespace)
        return f"{master}@{pod.metadata.uid}" if pod.status.phase not in (None, "Pending") else None

    def master_log(_):
        return watch.Watch().stream(core_api.read_namespaced_pod_log, name=master, namespace=namespace,
                                    container="pytorch", follow=True)

    stop = threading.Event()
    created = False
    try:
        create_job(custom_api, manifest, log)
        created = True
        log(f"created PyTorchJob {namespace}/{name}")
        threading.Thread(target=follow_logs, daemon=True,
                         args=(master_pod, master_log, stop, log, poll_seconds)).start()
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            window = max(1, int(min(deadline - time.monotonic(), 300)))
            for event in watch.Watch().stream(custom_api.list_namespaced_custom_object, group, version, namespace,
                                              plural, field_selector=f"metadata.name={name}", timeout_seconds=window):
                if event["type"] == "DELETED":
                    raise RuntimeError(f"PyTorchJob {namespace}/{name} disappeared while running")
                state, message = job_state(event["object"])
                if state == "Failed":
                    raise RuntimeError(f"PyTorchJob {namespace}/{name} failed: {message}")
                if state == "Succeeded":
                    log(f"PyTorchJob {name} succeeded: {message}")
                    return event["object"]
        raise TimeoutError(f"PyTorchJob {namespace}/{name} did not finish within {timeout_seconds:g} s")
    finally:
        stop.set()
        if created:
            try:
                custom_api.delete_namespaced_custom_object(group, version, namespace, plural, name,
                                                           propagation_policy="Background")
                log(f"deleted PyTorchJob {namespace}/{name}")
            except Exception as exc:  # noqa: BLE001 - never hide the job's own outcome
                log(f"could not delete PyTorchJob {namespace}/{name}: {exc}")


@ddil_component(stage_config, copy_folder, distill_job_name, distill_job_args, accelerate_launch_script,
                trainjob_manifest, pytorchjob_manifest, job_resource, job_state, create_job, follow_logs,
                run_trainjob, run_pytorchjob)
def launch_trainjob(
    recipe: str,
    overrides: List[str],
    latents: Input[Dataset],
    rollouts: Input[List[Dataset]],
    num_nodes: int,
    gpu_type: str,
    gpu_count: int,
    training_operator: str,
    run_id: str,
    student: Output[Model],
    training_log: Output[Artifact],
    image: str = DDIL_IMAGE,
    namespace: str = "",
    shared_root: str = "/data/ddil-runs",
    runtime: str = "ddil-torch-distributed",
    metrics_port: int = 9100,
    poll_seconds: int = 30,
    timeout_seconds: int = 7 * 24 * 3600,
):
    """Distill on `num_nodes` nodes of `gpu_count` GPUs (`gpu_type`: the GPU resource name) with a TrainJob
    (training_operator "v2") or a PyTorchJob ("v1"); inputs and outputs go through the shared ddil-data volume."""
    import json
    import os
    import shutil
    import signal
    import sys

    from ddil_core.config import dump_config

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped task still deletes its job (finally)
    config = stage_config(recipe, overrides, run_id)
    accelerate_launch_script(training_operator)  # validates the operator before anything is staged
    if not namespace:
        path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        namespace = open(path).read().strip() if os.path.exists(path) else "default"
    name = distill_job_name(run_id)
    root = os.path.join(shared_root, name)
    os.makedirs(root, exist_ok=True)
    config_path = os.path.join(root, "config.yaml")
    with open(config_path, "w", encoding="utf-8") as handle:
        handle.write(dump_config(config))
    copy_folder(latents.path, os.path.join(root, "latents"))
    if os.path.isdir(os.path.join(root, "rollouts")):
        shutil.rmtree(os.path.join(root, "rollouts"))
    for index, shard in enumerate(rollouts):
        copy_folder(shard.path, os.path.join(root, "rollouts", f"shard-{index:04d}"))
    out = os.path.join(root, "distill")  # kept between attempts: a retried task resumes from its checkpoints
    args = distill_job_args(config_path, os.path.join(root, "latents"), os.path.join(root, "rollouts"), out,
                            metrics_port, run_id)
    if training_operator == "v2":
        manifest = trainjob_manifest(name, namespace, image, num_nodes, gpu_count, gpu_type, args, runtime)
    else:
        manifest = pytorchjob_manifest(name, namespace, image, num_nodes, gpu_count, gpu_type, args)
    print(json.dumps(manifest, indent=2))

    from kubernetes import client as kube_client
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()  # the pod's service account (ddil-pipeline)
    except kube_config.ConfigException:
        kube_config.load_kube_config()
    configuration = kube_client.Configuration.get_default_copy()
    if training_operator == "v2":
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.trainer import TrainerClient

        trainer = TrainerClient(KubernetesBackendConfig(namespace=namespace, client_configuration=configuration))
        run_trainjob(trainer, manifest, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
    else:
        api = kube_client.ApiClient(configuration)
        run_pytorchjob(kube_client.CustomObjectsApi(api), kube_client.CoreV1Api(api), manifest,
                       poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)

    copy_folder(os.path.join(out, "student"), student.path)
    os.makedirs(training_log.path, exist_ok=True)
    for item in ("train_log.jsonl", "resolved_config.yaml"):
        if os.path.exists(os.path.join(out, item)):
            shutil.copy2(os.path.join(out, item), os.path.join(training_log.path, item))
    info = {}
    if os.path.exists(os.path.join(student.path, "ddil_student.json")):
        with open(os.path.join(student.path, "ddil_student.json"), encoding="utf-8") as handle:
            info = json.load(handle)
    student.metadata.update({"framework": "diffusers", "objective": config.objective.name,
                             "steps": info.get("num_inference_steps", config.objective.student_steps),
                             "guidance_scale": info.get("guidance_scale"), "teacher": config.model.teacher,
                             "steps_trained": info.get("steps_trained"), "num_nodes": num_nodes,
                             "training_job": f"{manifest['kind']}/{name}"})
    shutil.rmtree(root, ignore_errors=True)  # inputs and checkpoints of a finished job
