"""deploy/k8s/: the scaled layout's manifests, checked without a cluster.

Every manifest is read into the `kubernetes` client's own models and written back: a key the
model does not know (a misspelt field) is dropped on the way and reported, a missing required
field fails the model. Then the manifests are checked against each other, against the rule file
they carry and against deploy/Dockerfile and node/web/metrics.py. Each check returns a list of
problems; the shipped files give none, and a mutated copy of each shows the check can fail.

Where kubectl is installed, `kubectl kustomize` (offline) renders the folder as `kubectl
apply -k` would, and the rendered objects go through the same models. What this cannot show (no
cluster here): that an API server admits them (admission, quotas, storage classes), that the
image runs, that prometheus-adapter serves the metric.

Why this module is long: the manifests are checked against each other, the rule file, the
Dockerfile and the metrics module, so the checkers and their mutated copies share one file.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from node.config import validate_rules_text

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
EXAMPLES = K8S / "examples"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
METRICS_SOURCE = REPO / "node" / "web" / "metrics.py"

# kind -> (apiVersion it must use, the client's model); anything else is a problem.
MODELS: dict[str, tuple[str, str]] = {
    "Namespace": ("v1", "V1Namespace"),
    "ConfigMap": ("v1", "V1ConfigMap"),
    "Secret": ("v1", "V1Secret"),
    "Service": ("v1", "V1Service"),
    "PersistentVolumeClaim": ("v1", "V1PersistentVolumeClaim"),
    "Deployment": ("apps/v1", "V1Deployment"),
    "Job": ("batch/v1", "V1Job"),
    "PodDisruptionBudget": ("policy/v1", "V1PodDisruptionBudget"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "V2HorizontalPodAutoscaler"),
}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "labels"}
ROLES = ("receiver", "worker", "sender")
RULES_KEY = "rules.yaml"
DATABASE_SECRET = "neuronode-database"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    """Every document of a YAML file (empty ones skipped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    """The manifests kustomization.yaml should list: every YAML file beside it."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def shipped() -> list[Doc]:
    return [d for p in manifest_files() for d in load(p)]


# --- the client's models --------------------------------------------------------------------


def differences(given: Any, kept: Any, path: str) -> list[str]:
    """Where the model's serialisation differs from the input: dropped keys, changed values."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [f"{path}: an object came back as {kept!r}"]
        out: list[str] = []
        for k, v in given.items():
            if k in kept:
                out += differences(v, kept[k], f"{path}.{k}")
            else:
                out.append(f"{path}.{k}: not a field of the model (dropped)")
        return out + [f"{path}.{k}: added by the model" for k in kept.keys() - given.keys()]
    if isinstance(given, list):
        if not isinstance(kept, list) or len(kept) != len(given):
            return [f"{path}: a list of {len(given)} came back as {kept!r}"]
        return [
            p
            for i, (g, k) in enumerate(zip(given, kept, strict=True))
            for p in differences(g, k, f"{path}[{i}]")
        ]
    if given != kept or type(given) is not type(kept):
        return [f"{path}: {given!r} came back as {kept!r}"]
    return []


def model_problems(doc: Doc) -> list[str]:
    """Deserialise into the client's model for its kind and back; report what did not survive."""
    kind = doc.get("kind")
    name = f"{kind}/{doc.get('metadata', {}).get('name')}"
    if kind not in MODELS:
        return [f"{name}: no model for kind {kind!r}"]
    api_version, model = MODELS[str(kind)]
    if doc.get("apiVersion") != api_version:
        return [f"{name}: apiVersion {doc.get('apiVersion')!r}, expected {api_version}"]
    client = ApiClient()
    try:
        obj = client.deserialize(json.dumps(doc), model, "application/json")
    except (ValueError, TypeError) as exc:
        return [f"{name}: {model} refused it: {exc}"]
    back = client.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]
    return [f"{name}: {p}" for p in differences(doc, back, "")]


# --- pods and containers --------------------------------------------------------------------


def workloads(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(kind/name, pod template) of every Deployment and Job."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]


def dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n]*--uid (\d+)", DOCKERFILE.read_text())
    assert match, "deploy/Dockerfile creates no user with --uid"
    return int(match.group(1))


def container_problems(docs: list[Doc], uid: int) -> list[str]:
    """Probes on long-running containers; requests and limits, non-root as the image's user,
    no privilege escalation on every container."""
    out: list[str] = []
    for where, template in workloads(docs):
        spec = template["spec"]
        pod_sc = spec.get("securityContext", {})
        long_running = spec.get("restartPolicy", "Always") == "Always"
        for c in spec.get("initContainers", []) + spec["containers"]:
            at = f"{where} container {c.get('name')}"
            sc = c.get("securityContext", {})
            if long_running and c in spec["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    get = c.get(probe, {}).get("httpGet", {})
                    if get.get("path") != "/healthz" or get.get("port") != "http":
                        out.append(f"{at}: no {probe} on /healthz at the port named http")
            for bound in ("requests", "limits"):
                have = c.get("resources", {}).get(bound, {})
                if not {"cpu", "memory"} <= have.keys():
                    out.append(f"{at}: resources.{bound} lacks cpu or memory")
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                out.append(f"{at}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) != uid:
                out.append(f"{at}: runAsUser is not the Dockerfile's uid {uid}")
            if sc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                out.append(f"{at}: capabilities are not all dropped")
    return out


# --- the database Secret ----------------------------------------------------------------------


def rules_text(docs: list[Doc]) -> str:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and RULES_KEY in d.get("data", {})]
    return str(cm["data"][RULES_KEY])


def mounts_of(template: Doc, volume: str) -> list[str]:
    return [
        m["mountPath"]
        for c in template["spec"]["containers"]
        for m in c.get("volumeMounts", [])
        if m["name"] == volume
    ]


def secret_problems(docs: list[Doc]) -> list[str]:
    """The PostgreSQL URL comes from the Secret as a file the rule file names; no Secret object,
    URL or password is among the manifests applied."""
    out = [
        f"Secret/{d['metadata']['name']}: a Secret is applied"
        for d in docs
        if d["kind"] == "Secret"
    ]
    for d in docs:
        text = json.dumps(d) if d["kind"] != "ConfigMap" else ""
        if re.search(r"postgres(ql)?(\+\w+)?://", text, re.IGNORECASE):
            out.append(f"{d['kind']}/{d['metadata']['name']}: a database URL is written in it")
    database = (yaml.safe_load(rules_text(docs)) or {}).get("database") or {}
    if "url" in database:
        out.append("the rule file writes database.url inline (use database.url_file)")
    url_file = str(database.get("url_file", ""))
    for where, template in workloads(docs):
        volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
        secret = [
            n
            for n, v in volumes.items()
            if v.get("secret", {}).get("secretName") == DATABASE_SECRET
        ]
        if len(secret) != 1:
            out.append(f"{where}: does not mount the Secret {DATABASE_SECRET}")
            continue
        paths = mounts_of(template, secret[0])
        if not paths or not all(url_file.startswith(p.rstrip("/") + "/") for p in paths):
            out.append(
                f"{where}: database.url_file {url_file!r} is not in the Secret's mount {paths}"
            )
        for c in template["spec"]["containers"]:
            for env in c.get("env", []):
                if "value" in env and re.search(r"://|password", str(env["value"]), re.IGNORECASE):
                    out.append(f"{where}: env {env['name']} carries a credential")
    return out


# --- labels, selectors, the autoscaler --------------------------------------------------------


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selector_problems(docs: list[Doc]) -> list[str]:
    """Each Deployment selects its own pods and only them; the Service and the PDB select the
    receivers; every Service targetPort is a named port of those pods."""
    out: list[str] = []
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    templates = {n: d["spec"]["template"] for n, d in deployments.items()}
    for name, d in deployments.items():
        sel = d["spec"]["selector"]["matchLabels"]
        selected = [n for n, t in templates.items() if matches(sel, t["metadata"]["labels"])]
        if selected != [name]:
            out.append(f"Deployment/{name}: its selector picks the pods of {selected}")
        role = d["metadata"]["labels"].get(COMPONENT_LABEL)
        args = d["spec"]["template"]["spec"]["containers"][0].get("args", [])
        if role not in ROLES or args[:3] != ["serve", "--role", role]:
            out.append(f"Deployment/{name}: component {role!r} but args {args[:3]}")
    for d in docs:
        if d["kind"] not in ("Service", "PodDisruptionBudget"):
            continue
        sel = d["spec"]["selector"]
        sel = sel.get("matchLabels", {}) if d["kind"] == "PodDisruptionBudget" else sel
        selected = [n for n, t in templates.items() if matches(sel, t["metadata"]["labels"])]
        where = f"{d['kind']}/{d['metadata']['name']}"
        if selected != ["neuronode-receiver"]:
            out.append(f"{where}: selects {selected}, not the receivers")
        for port in d["spec"].get("ports", []):
            named = {
                p["name"]
                for n in selected
                for c in templates[n]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            if port["targetPort"] not in named:
                out.append(f"{where}: targetPort {port['targetPort']!r} is no port of its pods")
    return out


def hpa_problems(docs: list[Doc], metrics_source: str, adapter: Doc) -> list[str]:
    """The autoscaler scales the worker Deployment on a gauge the node exports, and the
    prometheus-adapter rule serves that gauge under the same name, as a max over pods."""
    out: list[str] = []
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if len(hpas) != 1:
        return [f"{len(hpas)} HorizontalPodAutoscalers, expected 1"]
    spec = hpas[0]["spec"]
    target = spec["scaleTargetRef"]
    workers = [
        d
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get(COMPONENT_LABEL) == "worker"
    ]
    if (target["apiVersion"], target["kind"]) != ("apps/v1", "Deployment") or [
        d["metadata"]["name"] for d in workers
    ] != [target["name"]]:
        out.append(f"the HPA targets {target}, not the worker Deployment")
    if any("replicas" in d["spec"] for d in workers):
        out.append("the worker Deployment sets replicas: every apply would reset the HPA's count")
    names = [m[m["type"].lower()]["metric"]["name"] for m in spec["metrics"]]
    served = [r["name"]["as"] for r in adapter["rules"]["external"]]
    for name in names:
        if not re.search(rf"[\"']{re.escape(name)}[\"']", metrics_source):
            out.append(f"metric {name!r} is not a metric of node/web/metrics.py")
        if name not in served:
            out.append(f"metric {name!r} is not served by the prometheus-adapter rule")
    for rule in adapter["rules"]["external"]:
        if (
            not rule["metricsQuery"].startswith("max(")
            or rule["name"]["as"] not in rule["seriesQuery"]
        ):
            out.append(f"adapter rule {rule['name']['as']}: not a max over the pods' own series")
    return out


def kustomization_problems(kust: Doc, files: list[Path], docs: list[Doc]) -> list[str]:
    """It lists every manifest beside it, nothing else; its image names the containers' image."""
    out = [f"kustomization.yaml: unknown key {k!r}" for k in kust.keys() - KUSTOMIZATION_KEYS]
    if (kust.get("apiVersion"), kust.get("kind")) != (
        "kustomize.config.k8s.io/v1beta1",
        "Kustomization",
    ):
        out.append("kustomization.yaml: not a kustomize.config.k8s.io/v1beta1 Kustomization")
    listed = list(kust.get("resources", []))
    if sorted(listed) != sorted(p.name for p in files) or len(set(listed)) != len(listed):
        out.append(
            f"kustomization.yaml lists {sorted(listed)}, the folder has {[p.name for p in files]}"
        )
    images = {i["name"] for i in kust.get("images", [])}
    used = {c["image"] for _, t in workloads(docs) for c in t["spec"]["containers"]}
    if used != images:
        out.append(
            f"kustomization.yaml sets images {sorted(images)}; the containers use {sorted(used)}"
        )
    return out


def rules_problems(docs: list[Doc], dockerfile: str) -> list[str]:
    """The rule file in the ConfigMap is valid and agrees with the pods and the image."""
    text = rules_text(docs)
    rules, problems = validate_rules_text(text)
    if rules is None:
        return [p.render("configmap-rules.yaml") for p in problems]
    out: list[str] = []
    if rules.node.bind_address != "0.0.0.0" or rules.http.bind_address != "0.0.0.0":
        out.append("the listeners must bind 0.0.0.0: Services and probes reach the pod address")
    copied = re.search(r"^COPY models/ (\S+?)/?$", dockerfile, re.MULTILINE)
    if not copied or str(rules.models_dir) != copied.group(1):
        out.append(f"models_dir {rules.models_dir} is not where the Dockerfile copies models/")
    for where, template in workloads(docs):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            args = c.get("args", [])
            rules_path = args[args.index("--rules") + 1] if "--rules" in args else ""
            cm = [
                n
                for n, v in volumes.items()
                if v.get("configMap", {}).get("name") == "neuronode-rules"
            ]
            mounted = [m for n in cm for m in mounts_of(template, n)]
            if [rules_path] != [f"{m}/{RULES_KEY}" for m in mounted]:
                out.append(f"{where}: --rules {rules_path!r} is not the ConfigMap's file {mounted}")
            if c.get("readinessProbe") is None:
                continue  # the one-shot Job: no listeners, no spool
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if ports.get("http") != rules.http.port or env.get("NEURONODE_HTTP_PORT") != str(
                rules.http.port
            ):
                out.append(
                    f"{where}: the http port and NEURONODE_HTTP_PORT are not {rules.http.port}"
                )
            if "dicom" in ports and ports["dicom"] != rules.node.port:
                out.append(f"{where}: containerPort dicom {ports['dicom']} is not node.port")
            claims = [n for n, v in volumes.items() if "persistentVolumeClaim" in v]
            if [str(rules.storage.spool_dir)] != [
                m for n in claims for m in mounts_of(template, n)
            ]:
                out.append(
                    f"{where}: spool_dir {rules.storage.spool_dir} is not the shared volume's mount"
                )
    pvcs = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    if [p["spec"]["accessModes"] for p in pvcs] != [["ReadWriteMany"]]:
        out.append("the spool is not one ReadWriteMany claim")
    return out


# --- the shipped files ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docs() -> list[Doc]:
    return shipped()


@pytest.fixture(scope="module")
def adapter() -> Doc:
    (doc,) = load(EXAMPLES / "prometheus-adapter-values.yaml")
    return doc


def test_every_manifest_round_trips_through_the_client_models(docs: list[Doc]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 3 and "HorizontalPodAutoscaler" in kinds
    assert [p for d in docs for p in model_problems(d)] == []
    assert model_problems(load(EXAMPLES / "secret-database.yaml")[0]) == []


def test_the_checks_pass_on_the_shipped_files(docs: list[Doc], adapter: Doc) -> None:
    assert container_problems(docs, dockerfile_uid()) == []
    assert secret_problems(docs) == []
    assert selector_problems(docs) == []
    assert hpa_problems(docs, METRICS_SOURCE.read_text(), adapter) == []
    assert kustomization_problems(load(K8S / "kustomization.yaml")[0], manifest_files(), docs) == []
    assert rules_problems(docs, DOCKERFILE.read_text()) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_folder_into_valid_objects() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    rendered = [d for d in yaml.safe_load_all(run.stdout) if d is not None]
    kust = load(K8S / "kustomization.yaml")[0]
    assert len(rendered) == len(shipped())
    assert [p for d in rendered for p in model_problems(d)] == []
    (image,) = kust["images"]
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == kust["namespace"], d["metadata"]
    for _, template in workloads(rendered):
        for c in template["spec"]["containers"]:
            assert c["image"] == f"{image['newName']}:{image['newTag']}"


def test_the_example_secret_holds_a_placeholder_and_is_not_applied() -> None:
    (secret,) = load(EXAMPLES / "secret-database.yaml")
    assert secret["metadata"]["name"] == DATABASE_SECRET
    url = secret["stringData"]["url"]
    assert "CHANGE-ME" in url and url.startswith("postgresql")
    listed = load(K8S / "kustomization.yaml")[0]["resources"]
    assert not any("secret" in r or r.startswith("examples") for r in listed)


# --- each check can fail ----------------------------------------------------------------------


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_a_misspelt_field_is_reported(docs: list[Doc]) -> None:
    d = copy.deepcopy(find(docs, "Deployment", "neuronode-receiver"))
    c = d["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    assert model_problems(d) == [
        "Deployment/neuronode-receiver: .spec.template.spec.containers[0].readinesProbe:"
        " not a field of the model (dropped)"
    ]
    h = copy.deepcopy(find(docs, "HorizontalPodAutoscaler", "neuronode-worker"))
    h["spec"]["metrics"][0]["external"]["metric"]["nmae"] = h["spec"]["metrics"][0]["external"][
        "metric"
    ].pop("name")
    assert any("V2HorizontalPodAutoscaler refused it" in p for p in model_problems(h))
    s = copy.deepcopy(find(docs, "Service", "neuronode-receiver"))
    s["apiVersion"] = "apps/v1"
    assert model_problems(s) == ["Service/neuronode-receiver: apiVersion 'apps/v1', expected v1"]
    r = copy.deepcopy(find(docs, "Deployment", "neuronode-worker"))
    r["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 2
    # The models are typed: a quantity must be a string (the API server would take the number,
    # the manifests quote every quantity), a port a number.
    (problem,) = model_problems(r)
    assert "V1Deployment refused it" in problem and "limits.cpu" in problem


def test_probes_limits_and_non_root_are_required(docs: list[Doc]) -> None:
    uid = dockerfile_uid()
    for path, value, expected in [
        (("livenessProbe",), None, "no livenessProbe"),
        (("resources", "limits"), None, "resources.limits lacks"),
        (("securityContext", "runAsNonRoot"), False, "runAsNonRoot is not true"),
        (("securityContext", "runAsUser"), 0, "runAsUser is not"),
    ]:
        d = copy.deepcopy(docs)
        c = find(d, "Deployment", "neuronode-sender")["spec"]["template"]["spec"]["containers"][0]
        *parents, key = path
        for parent in parents:
            c = c[parent]
        if value is None:
            del c[key]
        else:
            c[key] = value
        problems = container_problems(d, uid)
        assert len(problems) == 1 and expected in problems[0], problems
    job = copy.deepcopy(docs)
    find(job, "Job", "neuronode-db-upgrade")["spec"]["template"]["spec"]["containers"][0].pop(
        "resources"
    )
    assert len(container_problems(job, uid)) == 2  # requests and limits; a Job needs no probes


def test_an_inlined_secret_is_reported(docs: list[Doc]) -> None:
    (example,) = load(EXAMPLES / "secret-database.yaml")
    assert secret_problems([*docs, example]) == [
        "Secret/neuronode-database: a Secret is applied",
        "Secret/neuronode-database: a database URL is written in it",
    ]
    d = copy.deepcopy(docs)
    find(d, "Deployment", "neuronode-worker")["spec"]["template"]["spec"]["containers"][0][
        "env"
    ].append({"name": "DATABASE_URL", "value": "postgresql://neuronode:secret@db/neuronode"})
    assert len(secret_problems(d)) == 2
    d = copy.deepcopy(docs)
    (cm,) = [x for x in d if x["kind"] == "ConfigMap"]
    cm["data"][RULES_KEY] = cm["data"][RULES_KEY].replace(
        "url_file: /etc/neuronode/database/url", "url: x"
    )
    assert "the rule file writes database.url inline (use database.url_file)" in secret_problems(d)


def test_selectors_and_targets_are_checked(docs: list[Doc], adapter: Doc) -> None:
    d = copy.deepcopy(docs)
    find(d, "Service", "neuronode-receiver")["spec"]["selector"][COMPONENT_LABEL] = "recevier"
    assert selector_problems(d) == [
        "Service/neuronode-receiver: selects [], not the receivers",
        "Service/neuronode-receiver: targetPort 'dicom' is no port of its pods",
        "Service/neuronode-receiver: targetPort 'http' is no port of its pods",
    ]
    d = copy.deepcopy(docs)
    find(d, "Deployment", "neuronode-sender")["spec"]["template"]["spec"]["containers"][0]["args"][
        2
    ] = "worker"
    assert selector_problems(d) == [
        "Deployment/neuronode-sender: component 'sender' but args ['serve', '--role', 'worker']"
    ]
    d = copy.deepcopy(docs)
    find(d, "HorizontalPodAutoscaler", "neuronode-worker")["spec"]["scaleTargetRef"]["name"] = (
        "neuronode-receiver"
    )
    assert len(hpa_problems(d, METRICS_SOURCE.read_text(), adapter)) == 1
    d = copy.deepcopy(docs)
    find(d, "HorizontalPodAutoscaler", "neuronode-worker")["spec"]["metrics"][0]["external"][
        "metric"
    ]["name"] = "neuronode_queue_dept"
    assert len(hpa_problems(d, METRICS_SOURCE.read_text(), adapter)) == 2
    summed = copy.deepcopy(adapter)
    rule = summed["rules"]["external"][0]
    rule["metricsQuery"] = rule["metricsQuery"].replace("max(", "sum(")
    assert len(hpa_problems(docs, METRICS_SOURCE.read_text(), summed)) == 1
    renamed = METRICS_SOURCE.read_text().replace('"neuronode_queue_depth"', '"neuronode_backlog"')
    assert len(hpa_problems(docs, renamed, adapter)) == 1


def test_the_kustomization_must_list_every_manifest(docs: list[Doc]) -> None:
    kust = load(K8S / "kustomization.yaml")[0]
    short = copy.deepcopy(kust)
    short["resources"].remove("hpa-worker.yaml")
    assert len(kustomization_problems(short, manifest_files(), docs)) == 1
    typo = copy.deepcopy(kust)
    typo["resource"] = typo.pop("resources")
    assert len(kustomization_problems(typo, manifest_files(), docs)) == 2


def test_the_rule_file_must_agree_with_the_pods(docs: list[Doc]) -> None:
    dockerfile = DOCKERFILE.read_text()
    d = copy.deepcopy(docs)
    (cm,) = [x for x in d if x["kind"] == "ConfigMap"]
    cm["data"][RULES_KEY] = cm["data"][RULES_KEY].replace("port: 11112", "port: 11113")
    assert rules_problems(d, dockerfile) == [
        "Deployment/neuronode-receiver: containerPort dicom 11112 is not node.port"
    ]
    d = copy.deepcopy(docs)
    (cm,) = [x for x in d if x["kind"] == "ConfigMap"]
    cm["data"][RULES_KEY] = cm["data"][RULES_KEY].replace(
        "spool_dir: /var/lib/", "spool_dir: /srv/"
    )
    assert len(rules_problems(d, dockerfile)) == 3  # each of the three roles
    d = copy.deepcopy(docs)
    (cm,) = [x for x in d if x["kind"] == "ConfigMap"]
    cm["data"][RULES_KEY] = cm["data"][RULES_KEY].replace("quiet_period_s: 20", "quiet_period: 20")
    assert any("quiet_period" in p for p in rules_problems(d, dockerfile))
    assert rules_problems(docs, dockerfile.replace("/opt/neuronode/models/", "/models/")) == [
        "models_dir /opt/neuronode/models is not where the Dockerfile copies models/"
    ]


def command_problems(docs: list[Doc]) -> list[str]:
    """Every container's arguments parse with the real `neuronode` command line, so a renamed
    subcommand, role or flag fails here rather than in a crash-looping pod."""
    from node.cli import build_parser

    parser = build_parser()
    out: list[str] = []
    for where, template in workloads(docs):
        for c in template["spec"]["containers"]:
            args = [str(a) for a in c.get("args", [])]
            try:
                parser.parse_args(args)
            except SystemExit:
                out.append(f"{where}: neuronode does not accept {args}")
    return out


def test_every_container_command_parses_with_the_real_cli(
    docs: list[Doc], capsys: pytest.CaptureFixture[str]
) -> None:
    assert command_problems(docs) == []
    broken = json.loads(json.dumps(docs))
    for d in broken:
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("worker"):
            d["spec"]["template"]["spec"]["containers"][0]["args"][2] = "workers"
    problems = command_problems(broken)
    capsys.readouterr()  # argparse's own message for the broken one
    assert len(problems) == 1 and "workers" in problems[0]
