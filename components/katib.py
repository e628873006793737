"""Sweeps on a cluster: the DDIL knobs tuned by Katib through the Kubeflow SDK's OptimizerClient (kubeflow==0.5.0).

`submit()` calls `OptimizerClient.optimize`, which creates a Katib Experiment (kubeflow.org/v1beta1) whose trial
template is a Trainer TrainJob on the namespaced runtime of k8s/training/trainingruntime.yaml (the runtime
`components/trainjob.py` launches distill on). The SDK builds that TrainJob from a `CustomTrainer`: its function is
`ddil_trial` below, pasted into the TrainJob's command and called with the trial's parameters (Katib substitutes
`${trialParameters.<name>}` into the call), under torchrun (the runtime's torch policy), one call per process. It
runs `ddil distill` with the parameters as `--set` overrides; distill prints, every training.eval_every updates,

    ddil-metric watch_step=200 watch_drift=0.0123 watch_kid=0.0041 ...     (ddil_core/telemetry/metric_line.py)

which Katib's default StdOut metrics collector reads (its default filter takes every name=value pair).

Why not the TrainJob of components/trainjob.py itself: `optimize` only substitutes the search space into a
CustomTrainer's function arguments (`trainer.func_args`), so a command-line TrainJob cannot carry the parameters
through the SDK. A CustomTrainer's TrainJob sets no numProcPerNode; torchrun takes the Trainer's
PET_NPROC_PER_NODE=auto (one process per GPU), which the accelerate launch script of components/trainjob.py cannot.

The priors must sum to 1 (ddil_core/config/checks.py), which independent parameters cannot guarantee: they are one
categorical parameter over valid (forward, teacher, student) triples, PRIOR_TRIPLES.
"""

# (forward, teacher, student) priors, each triple summing to 1 (tests/kubeflow/test_katib.py: ddil's rules accept them)
PRIOR_TRIPLES = ("1,0,0", "0.5,0.5,0", "0.5,0.25,0.25", "0.34,0.33,0.33", "0.25,0.25,0.5", "0.2,0.4,0.4")
OBJECTIVE_METRIC = "watch_kid"  # the watch's KID to the teacher (lower is better); Katib keeps its minimum
ADDITIONAL_METRICS = ("watch_drift",)
RUNTIME = "ddil-torch-distributed"


def ddil_trial(config: str, latents: str, rollouts: str, out: str, priors: str = "1,0,0",
               buffer_capacity: str = "256", refresh_fraction: str = "0.25", eval_every: str = "200") -> None:
    """One Katib trial: ddil distill with the trial's knobs. Self-contained: the SDK pastes its source into an
    unquoted bash here-document in the TrainJob's command, so it holds no dollar sign, backquote or backslash
    (tests/kubeflow/test_katib.py). Every argument arrives as text (Katib substitutes it into the call). Each trial
    writes under out/<its TrainJob's name> (the pod's host name up to its JobSet suffix -node-<i>-<j>), so a trial's
    nodes share a folder and trials do not."""
    import os
    import subprocess
    import sys

    forward, teacher, student = (float(x) for x in str(priors).split(","))
    host = os.environ.get("HOSTNAME", "trial")
    trial = host.rsplit("-node-", 1)[0]
    args = [sys.executable, "-m", "ddil_core.cli", "distill", f"--config={config}", f"--latents={latents}",
            f"--rollouts={rollouts}", f"--out={os.path.join(out, trial)}",
            f"--set=ddil.priors.forward={forward}", f"--set=ddil.priors.teacher={teacher}",
            f"--set=ddil.priors.student={student}", f"--set=ddil.buffer.capacity={int(buffer_capacity)}",
            f"--set=ddil.buffer.refresh_fraction={float(refresh_fraction)}",
            f"--set=training.eval_every={int(eval_every)}"]
    print("ddil trial:", " ".join(args[2:]), flush=True)
    code = subprocess.run(args).returncode  # distill's stdout (the ddil-metric lines) goes to the pod's log
    if code:
        sys.exit(code)


def search_space(capacity=(64, 1024), refresh=(0.05, 0.5)) -> dict:
    """The Katib search space of the DDIL knobs (kubeflow.optimizer.Search), keyed by ddil_trial's arguments."""
    from kubeflow.optimizer import Search

    return {"priors": Search.choice(list(PRIOR_TRIPLES)),
            "buffer_capacity": Search.choice([c for c in (64, 128, 256, 512, 1024) if capacity[0] <= c <= capacity[1]]),
            "refresh_fraction": Search.uniform(*refresh)}


def trial_template(config: str, latents: str, rollouts: str, out: str, image: str, num_nodes: int = 1,
                   gpus_per_node: int = 1, eval_every: int = 200, runtime: str = RUNTIME):
    """The trial template: a TrainJob (CustomTrainer running ddil_trial) on the ddil runtime. The paths are on the
    shared ddil-data volume every training pod mounts at /data."""
    from kubeflow.optimizer import TrainJobTemplate
    from kubeflow.trainer import CustomTrainer

    resources = {"gpu": int(gpus_per_node)} if int(gpus_per_node) > 0 else None
    trainer = CustomTrainer(func=ddil_trial, image=image, num_nodes=int(num_nodes), resources_per_node=resources,
                            func_args={"config": config, "latents": latents, "rollouts": rollouts, "out": out,
                                       "eval_every": str(int(eval_every))})
    return TrainJobTemplate(trainer=trainer, runtime=runtime)


def submit(client, template, num_trials: int = 12, parallel_trials: int = 3, max_failed_trials: int = 3,
           space=None) -> str:
    """Create the Experiment with `client` (a kubeflow.optimizer.OptimizerClient); returns its name."""
    from kubeflow.optimizer import Objective, RandomSearch, TrialConfig

    objectives = [Objective(metric=OBJECTIVE_METRIC, direction="minimize")]
    objectives += [Objective(metric=name, direction="minimize") for name in ADDITIONAL_METRICS]
    return client.optimize(template, search_space=space or search_space(), objectives=objectives,
                           algorithm=RandomSearch(),
                           trial_config=TrialConfig(num_trials=num_trials, parallel_trials=parallel_trials,
                                                    max_failed_trials=max_failed_trials))
