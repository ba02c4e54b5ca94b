"""deploy/k8s-daily: the daily update's overlay renders (deploy/k8s + its resources + the
Deployment patch, merged as kustomize's strategic merge does), every object is valid for its
Kubernetes schema, and the pieces fit: the CronJob's `csmf daily` arguments parse with the real
CLI, its state and data volumes are the claims the replicas mount at the paths it names, its
--replicas-dns is a headless Service selecting the replicas on their port, its token is the
admin Secret's, its Pushgateway is the Service in front of the gateway, and the patched replicas
serve bundles/current of that state and log events into that data folder."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from .test_manifests import K8S, daily_args, kustomize, serve_args, validate_manifests

DAILY = K8S.parent / "k8s-daily"
MERGE_KEYS = {"containers": "name", "env": "name", "volumeMounts": "mountPath", "volumes": "name"}


def strategic_merge(base, patch, key: str | None = None):
    """kustomize's strategic merge for what the patch uses: maps merge recursively, the lists in
    MERGE_KEYS merge element-wise by their key (elements new to the list come first, as
    kustomize puts them), any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        by = MERGE_KEYS[key]
        patched = {item[by]: item for item in patch}
        merged = [strategic_merge(b, patched[b[by]]) if b[by] in patched else copy.deepcopy(b)
                  for b in base]  # fmt: skip
        known = {b[by] for b in base}
        return [copy.deepcopy(i) for i in patch if i[by] not in known] + merged
    return copy.deepcopy(patch)


def render(folder: Path = DAILY) -> list[dict]:
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kust) <= {"apiVersion", "kind", "resources", "patches"}, set(kust)
    out: list[dict] = []
    for name in kust["resources"]:
        path = (folder / name).resolve()
        out += kustomize(path) if path.is_dir() else list(yaml.safe_load_all(path.read_text()))
    for p in kust.get("patches", []):
        patch = yaml.safe_load((folder / p["path"]).read_text())
        [i] = [i for i, d in enumerate(out) if (d["kind"], d["metadata"]["name"]) ==
               (patch["kind"], patch["metadata"]["name"])]  # fmt: skip
        out[i] = strategic_merge(out[i], patch)
    return out


@pytest.fixture(scope="module")
def objs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render()}


def test_overlay_renders_and_every_object_is_valid(objs):
    rendered = render()
    assert len(objs) == len(rendered), "duplicate objects"
    validate_manifests(rendered)
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # where kubectl exists, the rendering above must equal its own
        out = subprocess.run(
            [kubectl, "kustomize", str(DAILY)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(rendered, key=key)


def _mounts(pod_spec: dict, container: dict) -> dict[str, str]:
    """mountPath → claim name of the container's PVC mounts."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod_spec["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    return {m["mountPath"]: claims[m["name"]] for m in container["volumeMounts"]
            if m["name"] in claims}  # fmt: skip


def test_the_job_the_replicas_and_the_gateway_fit_together(objs):
    cron = objs[("CronJob", "csmf-daily")]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [job] = job_pod["containers"]
    assert job["image"].split(":") == ["csmf-retrieval", "train"]
    assert job["args"][0] == "daily"
    params = daily_args(job["args"][1:])

    deploy = objs[("Deployment", "csmf")]
    pod = deploy["spec"]["template"]
    [svc_c] = pod["spec"]["containers"]
    serve = serve_args(svc_c["args"])
    job_claims, svc_claims = _mounts(job_pod, job), _mounts(pod["spec"], svc_c)

    # state: the same claim at the same path, so --replica-state is not needed
    state = str(params["state"])
    assert params["replica_state"] is None
    assert job_claims[state] == svc_claims[state]
    assert str(serve["bundle"]) == f"{state}/bundles/current"
    assert next(m for m in svc_c["volumeMounts"] if m["mountPath"] == state)["readOnly"]
    # events: the replicas' event log is the job's data folder
    env = {e["name"]: e for e in svc_c["env"]}
    data = str(params["data"])
    assert env["CSMF_EVENT_LOG_DIR"]["value"] == data
    assert job_claims[data] == svc_claims[data]
    for claim in (job_claims[state], job_claims[data]):
        assert objs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]

    # replicas: a headless Service selecting the Deployment's pods on the serving port
    host, port = params["replicas_dns"].split(":")
    headless = objs[("Service", host)]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [p] = headless["spec"]["ports"]
    ports = {q["name"]: q["containerPort"] for q in svc_c["ports"]}
    assert int(port) == p["port"] == ports[p["targetPort"]] == serve["port"]

    # the admin token is the Secret the replicas read
    job_env = {e["name"]: e for e in job["env"]}
    ref = job_env["CSMF_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret_refs = [e["secretRef"]["name"] for e in svc_c["envFrom"] if "secretRef" in e]
    assert ref["name"] in secret_refs and ref["key"] == "CSMF_ADMIN_TOKEN"

    # the gateway
    url = urlparse(job_env["CSMF_PUSHGATEWAY"]["value"])
    gw_svc = objs[("Service", url.hostname)]
    gw = objs[("Deployment", url.hostname)]
    assert (
        gw_svc["spec"]["selector"].items() <= gw["spec"]["template"]["metadata"]["labels"].items()
    )
    [gw_c] = gw["spec"]["template"]["spec"]["containers"]
    assert url.port == gw_svc["spec"]["ports"][0]["port"] == gw_c["ports"][0]["containerPort"]
    persistence = next(a for a in gw_c["args"] if a.startswith("--persistence.file="))
    store = str(Path(persistence.split("=", 1)[1]).parent)
    assert store in {m["mountPath"] for m in gw_c["volumeMounts"]}


def test_the_patch_merges_and_keeps_what_it_does_not_name():
    base = {"containers": [{"name": "c", "args": ["a"], "env": [{"name": "X", "value": "1"}],
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [{"name": "tmp", "emptyDir": {}}]}  # fmt: skip
    patch = {"containers": [{"name": "c", "args": ["b"], "env": [{"name": "Y", "value": "2"}],
                             "volumeMounts": [{"name": "m", "mountPath": "/m"}]}],
             "volumes": [{"name": "m", "emptyDir": {}}]}  # fmt: skip
    got = strategic_merge(base, patch)
    [c] = got["containers"]
    assert c["args"] == ["b"]
    assert [e["name"] for e in c["env"]] == ["Y", "X"]
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/m", "/tmp"]
    assert [v["name"] for v in got["volumes"]] == ["m", "tmp"]


def test_the_first_update_job_trains_the_seed_into_the_same_state(objs):
    [first] = yaml.safe_load_all((DAILY / "first-update.example.yaml").read_text())
    validate_manifests([first])
    pod = first["spec"]["template"]["spec"]
    [c] = pod["containers"]
    params = daily_args(c["args"][1:])
    assert params["train_config"] is not None, "day one trains from scratch: it needs --config"
    config = Path(__file__).resolve().parents[2] / params["train_config"]
    assert config.exists(), f"{params['train_config']} is not a config the image copies"
    cron = objs[("CronJob", "csmf-daily")]
    job_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [job] = job_pod["containers"]
    cron_params = daily_args(job["args"][1:])
    assert params["state"] == cron_params["state"]
    assert _mounts(pod, c)[str(params["state"])] == _mounts(job_pod, job)[str(params["state"])]
    data_root = "/" + params["data"].parts[1]
    assert _mounts(pod, c)[data_root] == _mounts(job_pod, job)[str(cron_params["data"])]
    assert c["image"] == job["image"]
