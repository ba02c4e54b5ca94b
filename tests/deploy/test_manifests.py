"""The deploy files parse and reference only things that exist: Dockerfile stages, build-context
paths, `csmf serve` options (parsed by the real CLI), HTTP routes (of the real app), CSMF_*
settings (fields of service.settings.Settings, values validated by it), ports, services, config
and dashboard files, Kubernetes object names and labels; and every Kubernetes object against its
kind's schema (kubernetes-validate ships them). No Docker engine, cluster, kubectl or network."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet
from typer.main import get_command

from service.cli import serve
from service.main import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "csmf.json"
IMAGE_REPO = "csmf-retrieval"  # the image built from this repo's Dockerfile
ALLOWED_NON_CSMF_ENV = {"TMPDIR", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PATH"}


# --------------------------------------------------------------------------- helpers


def settings_env_names() -> set[str]:
    return {f"CSMF_{name.upper()}" for name in Settings.model_fields}


def assert_valid_settings(env: dict[str, str], monkeypatch, where: str) -> None:
    """Every CSMF_* name is a Settings field and Settings accepts the values."""
    csmf = {k: v for k, v in env.items() if k.startswith("CSMF_")}
    unknown = set(csmf) - settings_env_names()
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of service.settings.Settings"
    assert not set(env) - set(csmf) - ALLOWED_NON_CSMF_ENV, f"{where}: unexpected env {env}"
    with monkeypatch.context() as m:
        for k in list(os.environ):
            if k.startswith("CSMF_"):
                m.delenv(k)
        m.setenv("CSMF_BUNDLE", "/bundle")
        for k, v in csmf.items():
            if v is not None:
                m.setenv(k, str(v))
        Settings()  # raises on a bad value


def serve_args(args: list[str]) -> dict:
    """Parse `csmf serve` arguments with the real command: unknown options or bad values fail."""
    app = typer.Typer()
    app.command()(serve)
    cmd = get_command(app)
    return cmd.make_context("csmf serve", list(args)).params


def app_routes() -> set[str]:
    return set(create_app(Settings(bundle=Path("/bundle"))).openapi()["paths"])


def makefile_default(var: str) -> str:
    m = re.search(rf"^{var}\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M)
    assert m, f"Makefile has no `{var} ?=` default"
    return m.group(1)


def env_default(value: str) -> str:
    """${VAR:-default} → default (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def image_is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in {"", "latest"}


# --------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    result, current = {}, None
    for instr, rest in dockerfile():
        if instr == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            current = m.group(2) or m.group(1)
            result[current] = [(instr, rest)]
        elif current is not None:
            result[current].append((instr, rest))
    return result


def stage_chain(name: str) -> list[tuple[str, str]]:
    """A stage's instructions including those inherited from the stages it is built FROM."""
    all_stages = stages()
    base = all_stages[name][0][1].split()[0]
    inherited = stage_chain(base) if base in all_stages else []
    return inherited + all_stages[name]


def last(instructions, instr: str) -> str:
    found = [rest for i, rest in instructions if i == instr]
    assert found, f"no {instr} instruction"
    return found[-1]


def dockerignore_allows(path: str) -> bool:
    """Docker's .dockerignore semantics, enough for this file: the last matching rule wins, a
    rule matching a directory covers what is inside, `**/` matches at any depth."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if rule and not rule.startswith("#") and _rule_matches(rule.lstrip("!").rstrip("/"), path):
            allowed = rule.startswith("!")
    return allowed


def _rule_matches(pattern: str, path: str) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        return any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:]) for p in prefixes)
    return any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)


def exposed_port() -> int:
    return int(last(stage_chain("runtime"), "EXPOSE").split("/")[0])


def test_dockerfile_stages_user_entrypoint_and_healthcheck():
    runtime = stage_chain("runtime")
    assert {"build", "runtime-base", "baked", "runtime"} <= set(stages())
    assert list(stages())[-1] == "runtime", "the default target must be the mounted-bundle image"

    user = last(runtime, "USER").split(":")[0]
    assert user not in {"0", "root"}, "the service must not run as root"

    assert json.loads(last(runtime, "ENTRYPOINT")) == ["csmf", "serve"]
    params = serve_args(json.loads(last(runtime, "CMD")))
    assert params["port"] == exposed_port() and params["host"] == "0.0.0.0"
    assert str(params["bundle"]) == "/bundle"

    health = last(runtime, "HEALTHCHECK")
    check = json.loads(health[health.index("CMD") + 3 :])
    assert check[0] == "python"  # the slim image has no curl
    url = urlparse(re.search(r"http://[^'\"]+", check[-1]).group(0))
    assert (url.port, url.path) == (exposed_port(), "/healthz")
    assert {"/healthz", "/readyz", "/metrics"} <= app_routes()


def test_dockerfile_serves_without_torch_and_training_keeps_the_pinned_one():
    build = " ".join(f"{i} {r}" for i, r in stages()["build"])
    assert "torch==" not in build and "import csmf, service.main, sys" in build
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("torch") for d in project["dependencies"])
    (torch_req,) = project["optional-dependencies"]["train"]
    pinned = makefile_default("TORCH").split("==")[1]  # torch==2.13.0 must satisfy the range
    assert SpecifierSet(torch_req.removeprefix("torch")).contains(pinned)
    assert "csmf-retrieval[train]" in project["optional-dependencies"]["test"]
    python = re.search(r"ARG PYTHON_VERSION=(\d+)\.(\d+)", (ROOT / "Dockerfile").read_text())
    assert (int(python.group(1)), int(python.group(2))) >= (3, 11)  # pyproject requires-python


def test_dockerfile_copies_only_existing_paths_the_context_sends():
    for stage, instructions in stages().items():
        for instr, rest in instructions:
            if instr not in {"COPY", "ADD"}:
                continue
            args = shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            paths = [a for a in args if not a.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            for src in paths[:-1]:
                assert (ROOT / src).exists(), f"{stage}: COPY {src}: no such path"
                assert dockerignore_allows(src), f"{stage}: COPY {src}: excluded by .dockerignore"
    for never in ("bundles/ml-100k/index.faiss", "data/ml-100k/events.parquet", ".venv/bin/python",
                  ".git/config", "csmf/__pycache__/cli.cpython-311.pyc", "runs/x/checkpoint.pt"):  # fmt: skip
        assert not dockerignore_allows(never), f"{never} would be sent to the Docker daemon"


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(host path relative to deploy/ or a volume name, container path)."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((env_default(v["source"]), v["target"]))
        else:
            src, dst = v.split(":")[:2]
            out.append((env_default(src), dst))
    return out


def _host_path(src: str) -> Path | None:
    return (DEPLOY / src).resolve() if src.startswith((".", "/")) else None


def test_compose_services_images_and_bind_mounts(compose):
    services = compose["services"]
    assert set(services) == {
        "csmf", "redis", "prometheus", "grafana", "milvus", "milvus-etcd", "milvus-minio",
        "csmf-daily", "pushgateway",
    }  # fmt: skip
    csmf = services["csmf"]
    assert (DEPLOY / csmf["build"]["context"] / csmf["build"]["dockerfile"]).resolve() == (
        ROOT / "Dockerfile"
    )
    assert csmf["build"]["target"] in stages()
    assert csmf["image"].split(":")[0] == IMAGE_REPO
    assert csmf["deploy"]["replicas"] == 2
    for name, svc in services.items():
        assert image_is_pinned(svc["image"]), f"{name}: pin an image tag, got {svc['image']!r}"
    named_volumes = set(compose.get("volumes", {}))
    for name, svc in services.items():
        for src, _ in _mounts(svc):
            host = _host_path(src)
            if host is None:
                assert src in named_volumes, f"{name}: volume {src!r} is not declared"
            elif src == "../bundles":  # `make demo` writes its bundle there; not committed
                assert host == (ROOT / makefile_default("BUNDLE")).parent.resolve(), src
            else:
                assert host.exists(), f"{name}: bind mount source {host} does not exist"


def test_compose_csmf_command_env_ports_and_redis(compose, monkeypatch):
    services = compose["services"]
    csmf = services["csmf"]
    params = serve_args([env_default(a) for a in csmf["command"]])
    assert params["port"] == exposed_port() and params["host"] == "0.0.0.0"
    assert params["workers"] >= 1
    # the default bundle is the Makefile's, inside the mounted bundles folder
    mounts = {dst: src for src, dst in _mounts(csmf)}
    assert params["bundle"].parent.as_posix() in mounts
    assert params["bundle"].name == Path(makefile_default("BUNDLE")).name
    for mapping in csmf["ports"]:
        assert mapping.rsplit(":", 1)[1] == str(params["port"])

    env = csmf["environment"]
    assert env.get("CSMF_ADMIN_TOKEN") is None, "the admin token must come from the shell"
    assert_valid_settings(env, monkeypatch, "compose csmf.environment")
    redis = urlparse(env["CSMF_REDIS_URL"])
    assert redis.hostname in services and services[redis.hostname]["image"].startswith("redis:")
    assert redis.port == 6379
    assert csmf["depends_on"][redis.hostname]["condition"] == "service_healthy"
    assert "healthcheck" in services[redis.hostname]


def daily_args(args: list[str]) -> dict:
    """Parse `csmf daily` arguments with the real command."""
    from daily.cli import daily

    app = typer.Typer()
    app.command()(daily)
    return get_command(app).make_context("csmf daily", list(args)).params


def test_compose_daily_update_reaches_the_replicas_the_events_and_the_gateway(compose):
    services = compose["services"]
    job, csmf = services["csmf-daily"], services["csmf"]
    assert job["profiles"] == ["daily"] and "profiles" not in services["pushgateway"]
    assert job["build"]["target"] == "train" and "train" in stages()
    assert job["image"].split(":")[0] == IMAGE_REPO
    # the loop hands its arguments to `csmf daily` ("$@"), one fresh process per update
    entry = job["entrypoint"]
    assert entry[:2] == ["/bin/sh", "-c"] and 'csmf daily "$$@"' in entry[2]
    params = daily_args([env_default(a) for a in job["command"]])
    # the replicas see the state at the same path: it lives in the bundles folder they mount
    job_mounts = {dst: src for src, dst in _mounts(job)}
    csmf_mounts = {dst: src for src, dst in _mounts(csmf)}
    state_root = "/" + params["state"].parts[1]
    assert job_mounts[state_root] == csmf_mounts[state_root]
    assert params["replica_state"] is None
    # the events it reads are the replicas' event log (CSMF_EVENT_LOG_DIR), on a shared volume
    assert str(params["data"]) == csmf["environment"]["CSMF_EVENT_LOG_DIR"]
    assert job_mounts[str(params["data"])] == csmf_mounts[str(params["data"])]
    assert job_mounts[str(params["data"])] in compose["volumes"]
    host, port = params["replicas_dns"].split(":")
    assert host == "csmf" and int(port) == serve_args(
        [env_default(a) for a in csmf["command"]])["port"]  # fmt: skip
    assert job["environment"].get("CSMF_ADMIN_TOKEN") is None, "the token comes from the shell"
    gateway = urlparse(job["environment"]["CSMF_PUSHGATEWAY"])
    assert gateway.hostname in services and gateway.port == 9091
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [pg] = [j for j in config["scrape_configs"] if j["job_name"] == "pushgateway"]
    assert pg["honor_labels"] is True
    assert pg["static_configs"][0]["targets"] == [f"{gateway.hostname}:{gateway.port}"]
    pinned = re.search(r"ARG TORCH=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert pinned == makefile_default("TORCH"), "the training image's torch is the Makefile's"


def test_compose_milvus_standalone_is_opt_in_and_reachable_by_the_service(compose):
    services = compose["services"]
    milvus = services["milvus"]
    # opt-in: `docker compose up` alone starts no Milvus (FAISS bundles need none)
    for name in ("milvus", "milvus-etcd", "milvus-minio"):
        assert services[name]["profiles"] == ["milvus"], name
    assert "profiles" not in services["csmf"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.")
    assert milvus["command"] == ["milvus", "run", "standalone"]
    env = milvus["environment"]
    for key, port in (("ETCD_ENDPOINTS", 2379), ("MINIO_ADDRESS", 9000)):
        host, p = env[key].split(":")
        assert host in services and int(p) == port and host in milvus["depends_on"]
    uri = urlparse(env_default(services["csmf"]["environment"]["CSMF_INDEX_URI"]))
    assert uri.hostname == "milvus" and uri.port == 19530
    assert "127.0.0.1:19530:19530" in milvus["ports"]


def test_compose_prometheus_scrapes_the_service_and_loads_the_rules(compose):
    services = compose["services"]
    prom = services["prometheus"]
    mounts = {dst: _host_path(src) for src, dst in _mounts(prom)}
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    host_config = mounts[str(config_path.parent)] / config_path.name
    assert host_config == DEPLOY / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(host_config.read_text())
    for rule_file in config["rule_files"]:
        assert (host_config.parent / rule_file).exists()
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    sd = jobs["csmf"]["dns_sd_configs"][0]
    assert sd["names"] == ["csmf"] and "csmf" in services
    assert sd["port"] == serve_args([env_default(a) for a in services["csmf"]["command"]])["port"]
    assert jobs["csmf"].get("metrics_path", "/metrics") in app_routes()


def test_compose_grafana_provisions_datasource_and_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = {dst: _host_path(src) for src, dst in _mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    [ds] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlparse(ds["url"])
    assert url.hostname == "prometheus" and url.hostname in compose["services"]
    assert url.port == 9090  # prometheus' default --web.listen-address, not overridden:
    assert not any("listen-address" in a for a in compose["services"]["prometheus"]["command"])
    [provider] = yaml.safe_load((provisioning / "dashboards" / "csmf.yml").read_text())["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert dashboards_dir == DASHBOARD.parent
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert mounts[str(home.parent)] / home.name == DASHBOARD

    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    uids = {p["datasource"]["uid"] for p in panels}
    uids |= {t["datasource"]["uid"] for p in panels for t in p["targets"]}
    uids |= {v["datasource"]["uid"] for v in dash["templating"]["list"] if "datasource" in v}
    assert uids == {ds["uid"]}, "every query must use the provisioned datasource"


def test_dashboard_layout():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["type"] == "row" or (p["targets"] and p.get("description")), p["title"]
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("route", "scenario", "stage", "error", "weights", "index", "version", "reload"):
        assert topic in titles, f"no panel about {topic}"


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict]:
    """{(kind, name): object} of every manifest, the example secret included."""
    objs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objs, f"duplicate {key}"
            objs[key] = doc
    return objs


def _pod(k8s) -> dict:
    return k8s[("Deployment", "csmf")]["spec"]["template"]


def _container(k8s) -> dict:
    [c] = _pod(k8s)["spec"]["containers"]
    return c


# The Kubernetes releases the manifests must be valid for: the oldest with every API they use
# (autoscaling/v2 HPA, policy/v1 PDB) among the schemas kubernetes-validate ships, and its newest.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())


def kustomize(folder: Path) -> list[dict]:
    """What `kubectl kustomize` renders for this kustomization: its resources with the common
    labels on each object's metadata (``includeSelectors: false``, no templates) and the image
    tags replaced. Refuses any kustomize feature it does not implement."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "labels", "resources", "images"}
    assert set(kust) <= known, f"kustomize features not rendered here: {set(kust) - known}"
    labels = {}
    for entry in kust.get("labels", []):
        assert not entry.get("includeSelectors") and not entry.get("includeTemplates"), entry
        labels |= entry["pairs"]
    tags = {i["name"]: i["newTag"] for i in kust.get("images", [])}
    out = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((folder / name).read_text()):
            doc["metadata"]["labels"] = {**doc["metadata"].get("labels", {}), **labels}
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                repo = c["image"].rsplit(":", 1)[0]
                if repo in tags:
                    c["image"] = f"{repo}:{tags[repo]}"
            out.append(doc)
    return out


def validate_manifests(docs: list[dict]) -> None:
    """Each object against the OpenAPI schema of its kind, strictly (an unknown or misspelt field
    fails), for every release in KUBERNETES_VERSIONS: the schemas ship with kubernetes-validate,
    so no cluster, kubectl or network is needed. An unknown kind or apiVersion fails too."""
    errors = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{what} (Kubernetes {version}): {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{what}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest_and_renders():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {f for f in files if f.endswith(".example.yaml")}
    assert set(kust["resources"]) == files - examples
    assert [i["name"] for i in kust["images"]] == [IMAGE_REPO]
    rendered = kustomize(K8S)
    assert len(rendered) == sum(
        len(list(yaml.safe_load_all((K8S / f).read_text()))) for f in kust["resources"]
    )
    [deploy] = [d for d in rendered if d["kind"] == "Deployment"]
    image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{IMAGE_REPO}:{kust['images'][0]['newTag']}"
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # where kubectl exists, the rendering above must equal its own
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(rendered, key=key)


def test_manifests_are_valid_kubernetes_objects():
    examples = [
        doc for p in sorted(K8S.glob("*.example.yaml")) for doc in yaml.safe_load_all(p.read_text())
    ]
    validate_manifests(kustomize(K8S) + examples)


@pytest.mark.parametrize(
    "breakage",
    [
        ("a misspelt field", lambda c: c.update(imagePullPolicyy="Always")),
        ("a port that is not a number", lambda c: c["ports"][0].update(containerPort="http")),
        ("an env var without a name", lambda c: c.update(env=[{"value": "1"}])),
    ],
    ids=lambda b: b[0],
)
def test_manifest_validation_fails_on_a_broken_manifest(breakage, tmp_path):
    """A deliberately broken copy of deploy/k8s is refused, naming the object and the field."""
    broken = tmp_path / "k8s"
    shutil.copytree(K8S, broken)
    path = broken / "deployment.yaml"
    doc = yaml.safe_load(path.read_text())
    breakage[1](doc["spec"]["template"]["spec"]["containers"][0])
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError, match="Deployment/csmf"):
        validate_manifests(kustomize(broken))


def test_manifest_validation_fails_on_an_unknown_api_version():
    [hpa] = [d for d in kustomize(K8S) if d["kind"] == "HorizontalPodAutoscaler"]
    with pytest.raises(AssertionError, match="HorizontalPodAutoscaler/csmf"):
        validate_manifests([{**hpa, "apiVersion": "autoscaling/v9"}])


def test_k8s_deployment_probes_ports_and_security(k8s):
    c = _container(k8s)
    assert c["image"].split(":")[0] == IMAGE_REPO
    params = serve_args(c["args"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == params["port"] == exposed_port()
    assert params["host"] == "0.0.0.0"
    routes = app_routes()
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for name, probe in probes.items():
        assert probe["path"] in routes and probe["port"] in ports, name
    pod = _pod(k8s)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(params["port"])
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes

    sec = pod["spec"]["securityContext"]
    uid = last(stage_chain("runtime"), "USER").split(":")[0]
    assert sec["runAsNonRoot"] and str(sec["runAsUser"]) == uid
    assert c["securityContext"]["readOnlyRootFilesystem"]
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert set(mounts.values()) <= volumes and "/tmp" in mounts  # csmf serve's runtime files
    assert c["resources"]["requests"]["cpu"], "the HPA's utilisation target needs a CPU request"


def test_k8s_settings_come_from_configmap_and_secret(k8s, monkeypatch):
    c = _container(k8s)
    refs = {("ConfigMap" if "configMapRef" in e else "Secret"): e for e in c["envFrom"]}
    cm = k8s[("ConfigMap", refs["ConfigMap"]["configMapRef"]["name"])]
    secret = k8s[("Secret", refs["Secret"]["secretRef"]["name"])]
    assert refs["Secret"]["secretRef"].get("optional") is True  # created out of band
    env = {
        **cm["data"],
        **secret["stringData"],
        **{e["name"]: e.get("value") for e in c.get("env", [])},
    }
    assert_valid_settings(env, monkeypatch, "k8s ConfigMap/Secret/env")
    assert set(secret["stringData"]) == {"CSMF_ADMIN_TOKEN"}
    assert "CSMF_ADMIN_TOKEN" not in cm["data"], "the token belongs in the Secret"

    redis = urlparse(cm["data"]["CSMF_REDIS_URL"])
    svc = k8s[("Service", redis.hostname)]
    assert redis.port in {p["port"] for p in svc["spec"]["ports"]}
    sts = k8s[("StatefulSet", redis.hostname)]
    assert sts["spec"]["serviceName"] == redis.hostname
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert image_is_pinned(sts["spec"]["template"]["spec"]["containers"][0]["image"])


def test_k8s_service_hpa_and_pdb_select_the_deployment(k8s):
    deploy = k8s[("Deployment", "csmf")]
    labels = _pod(k8s)["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s[("Service", "csmf")]
    assert svc["spec"]["selector"].items() <= labels.items()
    port_names = {p["name"] for p in _container(k8s)["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    hpa = k8s[("HorizontalPodAutoscaler", "csmf")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "csmf")
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = k8s[("PodDisruptionBudget", "csmf")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
