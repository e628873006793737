"""Sweeps on a cluster (components/katib.py): the Katib Experiment that Kubeflow's OptimizerClient creates for the
DDIL knobs, checked against the Katib v0.19.0 API (tests/fakes/crd_schemas/katib-v0.19.0-experiment.json) and its trial
TrainJob against the Trainer CRDs, through the real SDK (kubeflow==0.5.0) and kubernetes client. The Kubernetes API
is a stub (tests/fakes/kube_training_stub.py) standing in for an API server with Katib and the Trainer installed: it
validates what is created and stores it; nothing runs the trials."""
from __future__ import annotations

import copy
import inspect
import re
import sys

import pytest

from components import katib
from tests.fakes import crd_validate
from tests.fakes.kube_training_stub import KubeApiStub

PATHS = ("/data/sweep/config.yaml", "/data/sweep/latents", "/data/sweep/rollouts", "/data/sweep/trials")


def _submit(stub, **kwargs):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.optimizer import OptimizerClient

    client = OptimizerClient(KubernetesBackendConfig(namespace="ddil", client_configuration=stub.configuration()))
    template = katib.trial_template(*PATHS, image="registry.example.com/ddil/ddil:0.1.0", **kwargs)
    return katib.submit(client, template, num_trials=8, parallel_trials=2)


@pytest.fixture(scope="module")
def experiment():
    with KubeApiStub(script=[[]]) as stub:
        name = _submit(stub, num_nodes=2, gpus_per_node=4)
        assert not stub.rejected
        return copy.deepcopy(stub.objects[("experiments", "ddil", name)])


def test_the_experiment_is_valid_on_katib_and_its_trial_is_a_valid_trainjob(experiment):
    crd_validate.validate(experiment, "v0.19.0")
    spec = experiment["spec"]
    assert (spec["maxTrialCount"], spec["parallelTrialCount"]) == (8, 2)
    assert spec["objective"] == {"objectiveMetricName": "watch_kid", "type": "minimize",
                                 "additionalMetricNames": ["watch_drift"]}
    assert "metricsCollectorSpec" not in spec  # Katib's default: StdOut with its default filter (next test)
    template = spec["trialTemplate"]
    assert template["primaryContainerName"] == "node"  # the runtime's trainer container (trainingruntime.yaml)
    trial = copy.deepcopy(template["trialSpec"])
    trial["metadata"] = {"name": experiment["metadata"]["name"] + "-x7k2p9q4", "namespace": "ddil"}  # as Katib names it
    for version in crd_validate.versions("TrainJob"):
        crd_validate.validate(trial, version)
    assert trial["spec"]["runtimeRef"] == {"kind": "TrainingRuntime", "name": katib.RUNTIME}
    assert trial["spec"]["trainer"]["numNodes"] == 2


def test_the_validation_rejects_what_katib_would(experiment):
    bad = copy.deepcopy(experiment)
    bad["spec"]["objective"]["objectiveMetricNames"] = "watch_kid"  # a typo of objectiveMetricName
    assert any("objectiveMetricNames" in p for p in crd_validate.errors(bad, "v0.19.0"))
    bad = copy.deepcopy(experiment)
    bad["spec"]["trialTemplate"]["trialParameters"][0]["reference"] = "prior"
    assert any("references no parameter" in p for p in crd_validate.errors(bad, "v0.19.0"))
    bad = copy.deepcopy(experiment)
    bad["spec"]["parallelTrialCount"] = "2"
    assert any(p.startswith("spec.parallelTrialCount") for p in crd_validate.errors(bad, "v0.19.0"))


def test_the_stub_refuses_an_invalid_experiment_and_the_sdk_says_so():
    from kubeflow.optimizer import Search

    with KubeApiStub(script=[[]]) as stub:
        from kubeflow.common.types import KubernetesBackendConfig
        from kubeflow.optimizer import OptimizerClient

        client = OptimizerClient(KubernetesBackendConfig(namespace="ddil", client_configuration=stub.configuration()))
        bad = Search.uniform(0.05, 0.5)
        bad.feasible_space.max = None  # a double without a max: Katib's webhook refuses it
        with pytest.raises(RuntimeError, match="Failed to create"):
            katib.submit(client, katib.trial_template(*PATHS, image="x:1"), space={"refresh_fraction": bad})
        assert stub.rejected and "feasibleSpace" in stub.rejected[0]["message"]


def test_the_search_space_covers_the_ddil_knobs_with_valid_priors(experiment):
    from ddil_core.config import load_config

    params = {p["name"]: p for p in experiment["spec"]["parameters"]}
    assert set(params) == {"priors", "buffer_capacity", "refresh_fraction"}
    assert {p["name"] for p in experiment["spec"]["trialTemplate"]["trialParameters"]} == set(params)
    assert set(inspect.signature(katib.ddil_trial).parameters) >= set(params)
    triples = params["priors"]["feasibleSpace"]["list"]
    assert len(triples) >= 4
    for triple in triples:  # every choice passes ddil's own rules (priors sum to 1), with the other knobs' bounds
        forward, teacher, student = triple.split(",")
        for capacity in params["buffer_capacity"]["feasibleSpace"]["list"]:
            load_config(None, [f"ddil.priors.forward={forward}", f"ddil.priors.teacher={teacher}",
                               f"ddil.priors.student={student}", f"ddil.buffer.capacity={capacity}",
                               f"ddil.buffer.refresh_fraction={params['refresh_fraction']['feasibleSpace']['max']}"])
    with pytest.raises(Exception, match="sum to 1"):
        load_config(None, ["ddil.priors.forward=0.5", "ddil.priors.teacher=0.5", "ddil.priors.student=0.5"])


def test_katib_reads_the_objective_from_the_line_distill_prints():
    """The watch prints metric_line({step, drift, kid, ...}, 'watch_') (ddil_core/training/watch.py); Katib's StdOut
    collector applies its default filter to each line and keeps name=value pairs."""
    from ddil_core.telemetry.metric_line import KATIB_DEFAULT_FILTER, metric_line
    from ddil_core.training.watch import WATCHED

    line = metric_line({"step": 200, **{k: 0.5 for k in WATCHED}, "kid": 4.1e-05}, "watch_")
    found = {m[0]: float(m[1]) for m in re.findall(KATIB_DEFAULT_FILTER, line)}
    assert found[katib.OBJECTIVE_METRIC] == pytest.approx(4.1e-05)
    assert all(found[name] == 0.5 for name in katib.ADDITIONAL_METRICS)


def test_a_trial_runs_distill_with_its_parameters_as_katib_substitutes_them(experiment, monkeypatch):
    """The trial's command is the SDK's script around ddil_trial's source; with Katib's substitution of the trial
    parameters, the call runs `ddil distill` with them as overrides, into the trial's own folder."""
    script = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["trainer"]["command"][2]
    source = script.split("<< EOM\n", 1)[1].split("\nEOM\n", 1)[0]
    values = {"priors": "0.5,0.25,0.25", "buffer_capacity": "512", "refresh_fraction": "0.125"}
    for name, value in values.items():
        source = source.replace("${trialParameters.%s}" % name, value)
    assert "${" not in source
    calls = []
    monkeypatch.setattr("subprocess.run", lambda args: calls.append(args) or type("R", (), {"returncode": 0}))
    monkeypatch.setenv("HOSTNAME", "q1w2e3r4t5y6-x7k2p9q4-node-1-0")
    exec(compile(source, "katib.py", "exec"), {"__name__": "__main__"})
    (args,) = calls
    assert args[:4] == [sys.executable, "-m", "ddil_core.cli", "distill"]
    assert f"--out={PATHS[3]}/q1w2e3r4t5y6-x7k2p9q4" in args
    for item in ("ddil.priors.forward=0.5", "ddil.priors.teacher=0.25", "ddil.priors.student=0.25",
                 "ddil.buffer.capacity=512", "ddil.buffer.refresh_fraction=0.125", "training.eval_every=200"):
        assert f"--set={item}" in args


def test_the_trial_function_survives_the_sdks_unquoted_here_document():
    """The SDK writes the function with `read -r -d '' SCRIPT << EOM`: bash would expand a dollar sign or a
    backquote in it and eat backslashes."""
    source = inspect.getsource(katib.ddil_trial)
    assert not set(source) & {"$", "`", "\\"}
