#!/usr/bin/env python3
"""Offline checks of deploy/ that need no container engine or cluster.

Called by scripts/check-deploy.sh, optionally with the output of
`kubectl kustomize deploy/k8s` as the argument. Checks:
  * every YAML file parses;
  * the Kubernetes manifests, with the ConfigMap that kustomization.yaml
    generates from lienthong.toml, validate strictly against the Kubernetes
    schemas bundled with kubernetes-validate;
  * the manifests agree with each other and with the broker TOML: selectors
    match the pods, the TOML's certificate paths and data_dir are mounted
    (data_dir writable under the read-only root), probes run `lienthong health`
    with the CA the broker uses, the pod is non-root with a read-only root;
    metrics reachable from other pods require client certificates
    (telemetry.metrics_client_ca, from a Secret);
  * compose.yaml agrees with broker.toml and the collector config: certificates
    and data_dir mounted, the OTLP endpoint and the scrape targets name real
    services, every pipeline component is defined; spans go to the collector
    over TLS only (an https endpoint, its CA mounted; the collector's receiver
    serves TLS with files its container mounts, on the port the brokers use);
  * each compose container mounts only its own keys: every volume certs-init
    writes keys into (one per container, named by its environment) is mounted
    by certs-init and the services it is for, nothing else, read-only; the
    brokers' OTLP client files and the collector's TLS files are on their
    own volumes;
  * the systemd unit provides what lienthong.toml expects (credentials for
    the certificate paths, the state directory as data_dir) and keeps its
    hardening options;
  * the Dockerfile copies only paths that exist, runs as a non-root user, and
    checks health with `lienthong health`.
Exits non-zero naming each problem.
"""

import os
import re
import sys
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# A version every kubernetes-validate release of recent years bundles; the
# newest bundled one is used when it is gone.
K8S_VERSION = "1.33.0"

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


def parse_toml(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore
    return tomllib.loads(text)


def load_toml(path):
    return parse_toml(Path(path).read_text())


def load_yaml_all(path):
    import yaml

    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def under(path, mount):
    """Whether file `path` lies at or under directory/file `mount`."""
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p == m or m in p.parents


# --- Kubernetes ---------------------------------------------------------------


def kubernetes_docs():
    """The resources of the kustomization plus its generated ConfigMaps."""
    k8s = DEPLOY / "k8s"
    kustomization = load_yaml_all(k8s / "kustomization.yaml")[0]
    listed = set(kustomization.get("resources", []))
    present = {p.name for p in k8s.glob("*.yaml")} - {"kustomization.yaml"}
    for missing in sorted(present - listed):
        problem(f"deploy/k8s/{missing}", "not listed in kustomization.yaml resources")
    docs = []
    for name in sorted(listed):
        if not (k8s / name).is_file():
            problem("deploy/k8s/kustomization.yaml", f"lists {name}, which does not exist")
            continue
        for doc in load_yaml_all(k8s / name):
            docs.append((f"deploy/k8s/{name}", doc))
    for gen in kustomization.get("configMapGenerator", []):
        data = {}
        for file in gen.get("files", []):
            key, _, src = file.partition("=")
            src = src or key
            if not (k8s / src).is_file():
                problem("deploy/k8s/kustomization.yaml", f"configMapGenerator file {src} does not exist")
                continue
            data[key] = (k8s / src).read_text()
        cm = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "namespace": kustomization.get("namespace", "default")},
            "data": data,
        }
        docs.append(("deploy/k8s/kustomization.yaml", cm))
    return docs


def validate_kubernetes(docs):
    import kubernetes_validate

    versions = kubernetes_validate.utils.all_versions()
    version = K8S_VERSION if K8S_VERSION in versions else versions[-1]
    for where, doc in docs:
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problem(where, f"{name} is invalid for Kubernetes {version}: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problem(where, e.message)
    print(f"kubernetes: {len(docs)} resources valid against the Kubernetes {version} schemas (strict)", end="")
    print(f" [{docs[0][0]}]" if docs and not docs[0][0].startswith("deploy/") else "")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_kubernetes_consistency(docs):
    by_kind = {}
    for where, doc in docs:
        by_kind.setdefault(doc["kind"], []).append((where, doc))
    deployments = by_kind.get("Deployment", [])
    if not deployments:
        problem("deploy/k8s", "no Deployment")
        return
    where, dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if not matches(spec["selector"]["matchLabels"], labels):
        problem(where, "the Deployment's selector does not match its pod labels")
    if spec.get("replicas", 1) < 2:
        problem(where, "the broker Deployment should run several replicas")
    for kind, sel in (
        ("Service", lambda d: d["spec"].get("selector")),
        ("PodDisruptionBudget", lambda d: d["spec"]["selector"]["matchLabels"]),
        ("NetworkPolicy", lambda d: d["spec"]["podSelector"]["matchLabels"]),
    ):
        if not by_kind.get(kind):
            problem("deploy/k8s", f"no {kind}")
        for w, d in by_kind.get(kind, []):
            if not matches(sel(d), labels):
                problem(w, f"{kind} {d['metadata']['name']} does not select the broker pods")

    psc = pod.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        problem(where, "the pod must set runAsNonRoot")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    config_maps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    broker = next((c for c in pod["containers"] if c["name"] == "broker"), None)
    if broker is None:
        problem(where, "no container named broker")
        return
    sc = broker.get("securityContext", {})
    if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation", True):
        problem(where, "the broker container needs readOnlyRootFilesystem and no privilege escalation")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problem(where, "the broker container must drop all capabilities")
    res = broker.get("resources", {})
    if not res.get("requests") or not res.get("limits"):
        problem(where, "the broker container needs resource requests and limits")

    args = broker.get("args", []) + broker.get("command", [])
    config_path = args[args.index("--config") + 1] if "--config" in args else None
    mounts = broker.get("volumeMounts", [])

    def mount_of(path):
        best = None
        for m in mounts:
            target = m["mountPath"]
            if under(path, target) and (best is None or len(target) > len(best["mountPath"])):
                best = m
        return best

    toml_text = None
    m = mount_of(config_path) if config_path else None
    if m is None:
        problem(where, f"the --config file {config_path} is not mounted")
    else:
        vol = volumes.get(m["name"], {})
        cm_name = vol.get("configMap", {}).get("name")
        key = m.get("subPath") or PurePosixPath(config_path).name
        if cm_name not in config_maps or key not in config_maps[cm_name].get("data", {}):
            problem(where, f"{config_path} is not backed by a ConfigMap key holding the broker TOML")
        else:
            toml_text = config_maps[cm_name]["data"][key]
    if toml_text is None:
        return
    cfg = parse_toml(toml_text)
    files = [(f"tls.{key}", cfg.get("tls", {}).get(key)) for key in ("ca", "cert", "key")]
    # The collector's CA and client certificate, when set, come from a Secret too.
    files += [
        (f"telemetry.{key}", cfg["telemetry"][key])
        for key in ("otlp_ca", "otlp_cert", "otlp_key")
        if cfg.get("telemetry", {}).get(key)
    ]
    # And the CA of the scrapers' client certificates.
    telemetry = cfg.get("telemetry", {})
    if telemetry.get("metrics_client_ca"):
        files.append(("telemetry.metrics_client_ca", telemetry["metrics_client_ca"]))
    # So does the CA of PostgreSQL's certificate (sslrootcert in database_url).
    root = re.search(r"[?&]sslrootcert=([^&]+)", cfg.get("database_url", ""))
    if root:
        files.append(("database_url sslrootcert", root.group(1)))
    elif cfg.get("database_url", "").startswith("postgres"):
        problem(where, "database_url must name the CA of PostgreSQL's certificate (sslrootcert)")
    for key, path in files:
        m = mount_of(path) if path else None
        if m is None:
            problem(where, f"{key} = {path} is not on any volume mount")
            continue
        secret = volumes.get(m["name"], {}).get("secret")
        items = [i["path"] for i in (secret or {}).get("items", [])]
        rel = str(PurePosixPath(path).relative_to(m["mountPath"]))
        if secret is None or (items and rel not in items):
            problem(where, f"{key} = {path} is not provided by a Secret volume item")
    data_dir = cfg.get("data_dir")
    m = mount_of(data_dir) if data_dir else None
    if m is None or m.get("readOnly"):
        problem(where, f"data_dir {data_dir} must be on a writable volume (the root filesystem is read-only)")
    elif "emptyDir" not in volumes.get(m["name"], {}) and "persistentVolumeClaim" not in volumes.get(m["name"], {}):
        problem(where, f"data_dir {data_dir} must be an emptyDir or a PersistentVolumeClaim")
    ca = cfg.get("tls", {}).get("ca")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = broker.get(probe, {}).get("exec", {}).get("command", [])
        if cmd[:2] != ["lienthong", "health"]:
            problem(where, f"{probe} must exec `lienthong health`")
        elif "--ca" not in cmd or cmd[cmd.index("--ca") + 1] != ca:
            problem(where, f"{probe} must pass --ca {ca} (the broker's tls.ca)")
    listen_port = int(cfg.get("listen", ":7443").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in broker.get("ports", [])}
    if ports.get("grpc") != listen_port:
        problem(where, f"containerPort grpc must be the broker's listen port {listen_port}")
    metrics = telemetry.get("metrics_listen", "")
    if metrics:
        metrics_port = int(metrics.rsplit(":", 1)[-1])
        if ports.get("metrics") != metrics_port:
            problem(where, f"containerPort metrics must be the broker's metrics_listen port {metrics_port}")
        # Metrics name which agencies ask for which record types, how often:
        # reachable from other pods, only scrapers with a certificate read them.
        if metrics_off_host(metrics) and not telemetry.get("metrics_client_ca"):
            problem(
                "deploy/k8s/lienthong.toml",
                f"telemetry.metrics_listen {metrics} serves /metrics in plain HTTP to the network: "
                "set telemetry.metrics_client_ca (the scrapers' CA, from a Secret)",
            )


def metrics_off_host(listen):
    """Whether a `telemetry.metrics_listen` value is reachable from other hosts
    (a bare port means loopback, as the broker reads it)."""
    text = listen.strip().lstrip(":")
    if text.isdigit():
        return False
    host = text.rsplit(":", 1)[0].strip("[]")
    return not (host.startswith("127.") or host in ("::1", "localhost"))


# --- compose ------------------------------------------------------------------


def check_compose():
    compose_dir = DEPLOY / "compose"
    where = "deploy/compose/compose.yaml"
    doc = load_yaml_all(compose_dir / "compose.yaml")[0]
    services = doc.get("services", {})
    brokers = {n: s for n, s in services.items() if "serve" in (s.get("command") or [])}
    if len(brokers) < 2:
        problem(where, "the federation should run at least two broker replicas")
    for name, svc in services.items():
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = compose_dir / build.get("context", ".")
            if not (ctx / build.get("dockerfile", "Dockerfile")).is_file():
                problem(where, f"service {name} builds from a Dockerfile that does not exist")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith(".") and not (compose_dir / src).exists():
                problem(where, f"service {name} mounts {src}, which does not exist")
    collector = load_yaml_all(compose_dir / "otel-collector.yaml")[0]
    for kind in ("receivers", "processors", "exporters"):
        defined = set(collector.get(kind, {}) or {})
        for pname, pipeline in collector.get("service", {}).get("pipelines", {}).items():
            for comp in pipeline.get(kind, []):
                if comp not in defined:
                    problem("deploy/compose/otel-collector.yaml", f"pipeline {pname} uses undefined {comp}")
    scrape_targets = set()
    for sc in collector.get("receivers", {}).get("prometheus", {}).get("config", {}).get("scrape_configs", []):
        for static in sc.get("static_configs", []):
            scrape_targets.update(static.get("targets", []))
    configs = {}
    for name, svc in brokers.items():
        cmd = svc["command"]
        config_path = cmd[cmd.index("--config") + 1]
        targets = {}
        for vol in svc.get("volumes", []):
            src, target = vol.split(":")[:2]
            targets[target] = src
        src = targets.get(config_path)
        if src is None or not (compose_dir / src).is_file():
            problem(where, f"{name}: the --config file {config_path} is not mounted from a file here")
            continue
        cfg = load_toml(compose_dir / src)
        configs[name] = cfg
        for key in ("ca", "cert", "key"):
            path = cfg.get("tls", {}).get(key, "")
            if not any(under(path, t) for t in targets):
                problem(where, f"{name}: tls.{key} = {path} is not on any volume")
        data_dir = cfg.get("data_dir", "")
        if data_dir not in targets:
            problem(where, f"{name}: data_dir {data_dir} must be its own volume")
        telemetry = cfg.get("telemetry", {})
        otlp = telemetry.get("otlp_endpoint", "")
        host = re.sub(r"^\w+://", "", otlp).split(":")[0]
        toml_where = os.path.normpath(f"deploy/compose/{src}")
        if otlp and host not in services:
            problem(toml_where, f"telemetry.otlp_endpoint host {host} is no compose service")
        if otlp:
            check_compose_otlp(toml_where, name, telemetry, targets, services.get(host), collector)
        metrics = cfg.get("telemetry", {}).get("metrics_listen", "")
        if metrics and f"{name}:{metrics.rsplit(':', 1)[1]}" not in scrape_targets:
            problem("deploy/compose/otel-collector.yaml", f"does not scrape {name}'s metrics")
        db_host = re.sub(r"^\w+://([^@/]*@)?", "", cfg.get("database_url", "")).split(":")[0].split("/")[0]
        if db_host not in services:
            problem(os.path.normpath(f"deploy/compose/{src}"), f"database_url host {db_host} is no compose service")
        # Another host: the broker refuses it without verified TLS.
        if not re.search(r"[?&]sslmode=verify-(full|ca)\b", cfg.get("database_url", "")):
            problem(os.path.normpath(f"deploy/compose/{src}"), "database_url must verify the database's TLS (sslmode=verify-full)")
    print(f"compose: {len(services)} services, {len(brokers)} brokers consistent with their config and the collector")
    check_compose_secrets(services, brokers, configs, collector)


def collector_grpc(collector):
    """The collector's OTLP/gRPC receiver: (its tls settings, {} when none; its endpoint)."""
    receivers = collector.get("receivers", {}) or {}
    grpc = ((receivers.get("otlp", {}) or {}).get("protocols", {}) or {}).get("grpc", {}) or {}
    return grpc.get("tls", {}) or {}, grpc.get("endpoint", "")


def check_compose_otlp(where, name, telemetry, targets, collector_svc, collector):
    """Spans name which member read which record type and why: a broker sends
    them to the collector over verified TLS only, and the collector serves it."""
    otlp = telemetry["otlp_endpoint"]
    if not otlp.startswith("https://"):
        problem(where, f"telemetry.otlp_endpoint {otlp} sends spans in clear: use https:// with telemetry.otlp_ca")
    if not telemetry.get("otlp_ca"):
        problem(where, "telemetry.otlp_ca must name the CA of the collector's certificate")
    if bool(telemetry.get("otlp_cert")) != bool(telemetry.get("otlp_key")):
        problem(where, "telemetry.otlp_cert and telemetry.otlp_key go together")
    for key in ("otlp_ca", "otlp_cert", "otlp_key"):
        path = telemetry.get(key)
        if path and not any(under(path, t) for t in targets):
            problem("deploy/compose/compose.yaml", f"{name}: telemetry.{key} = {path} is not on any volume")
    if collector_svc is None:
        return
    collector_where = "deploy/compose/otel-collector.yaml"
    tls, endpoint = collector_grpc(collector)
    port = re.sub(r"^\w+://", "", otlp).split("/")[0].rsplit(":", 1)[-1]
    if endpoint.rsplit(":", 1)[-1] != port:
        problem(collector_where, f"the OTLP/gRPC receiver listens on {endpoint}, not on {name}'s port {port}")
    if not tls.get("cert_file") or not tls.get("key_file"):
        problem(collector_where, "the OTLP/gRPC receiver must serve TLS (receivers.otlp.protocols.grpc.tls: cert_file, key_file)")
    # Mutual TLS on both sides or neither: a client certificate nobody asks
    # for, or one asked for and never shown (no span would arrive).
    if telemetry.get("otlp_cert") and not tls.get("client_ca_file"):
        problem(collector_where, f"{name} shows a client certificate the collector does not require (tls.client_ca_file)")
    if tls.get("client_ca_file") and not telemetry.get("otlp_cert"):
        problem(where, "the collector requires a client certificate: set telemetry.otlp_cert and telemetry.otlp_key")
    mounted = [v.split(":")[1] for v in collector_svc.get("volumes", [])]
    for key in ("cert_file", "key_file", "client_ca_file"):
        path = tls.get(key)
        if path and not any(under(path, t) for t in mounted):
            problem(collector_where, f"tls.{key} = {path} is not on any volume of the collector's container")


def named_mounts(svc):
    """{container path: named volume} of a compose service (bind mounts left out)."""
    out = {}
    for vol in svc.get("volumes", []):
        src, target = vol.split(":")[:2]
        if not src.startswith((".", "/")):
            out[target] = src
    return out


def volume_at(svc, path):
    """The named volume a container path of `svc` lies on, if any."""
    best = None
    for target, src in named_mounts(svc).items():
        if under(path, target) and (best is None or len(target) > len(best[0])):
            best = (target, src)
    return best[1] if best else None


def check_compose_secrets(services, brokers, configs, collector):
    """Each container mounts its own keys and nobody else's.

    certs-init (init-certs.sh) writes every key, one directory per container,
    named by its environment; each such volume may be mounted by certs-init
    and the services it is for, nothing else.
    """
    where = "deploy/compose/compose.yaml"
    data_dirs = {n: cfg.get("data_dir", "") for n, cfg in configs.items()}
    tls_paths = {n: cfg.get("tls", {}) for n, cfg in configs.items()}
    init = services.get("certs-init")
    if init is None:
        problem(where, "no certs-init service")
        return
    env = init.get("environment", {}) or {}
    script = " ".join(init.get("entrypoint", []) or [])
    if "init-certs.sh" not in script:
        problem(where, "certs-init must run init-certs.sh")

    def running(predicate):
        return {n for n, s in services.items() if n != "certs-init" and predicate(s)}

    def words(s, key):
        v = s.get(key) or []
        return v.split() if isinstance(v, str) else v

    def register(kind):
        return running(lambda s: words(s, "command")[:2] == ["demo-provider", kind])

    setup = running(lambda s: any("setup-federation.sh" in w for w in words(s, "entrypoint")))
    postgres = running(lambda s: str(s.get("image", "")).startswith("postgres"))
    collectors = running(lambda s: "opentelemetry-collector" in str(s.get("image", "")))
    owners = {
        # The CA key: certs-init alone.
        "CA_PRIVATE_DIR": set(),
        "BROKER_TLS_DIR": set(brokers),
        "CIVIL_STATUS_TLS_DIR": register("civil-status"),
        "JUDICIAL_RECORDS_TLS_DIR": register("judicial-records"),
        "CLIENTS_DIR": setup,
        "DATABASE_TLS_DIR": postgres,
        "COLLECTOR_TLS_DIR": collectors,
    }
    secret_volumes = {}  # volume -> (what, its services, read-only there)
    for var, svcs in owners.items():
        path = env.get(var)
        vol = volume_at(init, path) if path else None
        if vol is None:
            problem(where, f"certs-init: {var} must name a directory on a volume of its own")
            continue
        if vol in secret_volumes:
            problem(where, f"certs-init: {var} shares volume {vol} with {secret_volumes[vol][0]}")
        secret_volumes[vol] = (var, svcs, True)
    for path in str(env.get("BROKER_DATA_DIRS", "")).split():
        vol = volume_at(init, path)
        mine = {
            n for n, s in brokers.items()
            if vol is not None and volume_at(s, data_dirs.get(n, "")) == vol
        }
        if vol is None or len(mine) != 1:
            problem(where, f"certs-init: BROKER_DATA_DIRS {path} must be one broker's data_dir volume")
            continue
        secret_volumes[vol] = (f"BROKER_DATA_DIRS {path}", mine, False)
    for vol in set(named_mounts(init).values()) - set(secret_volumes):
        problem(where, f"certs-init writes into volume {vol}, which is not one container's own directory")
    for vol, (what, svcs, read_only) in sorted(secret_volumes.items()):
        if not svcs and what != "CA_PRIVATE_DIR":
            problem(where, f"certs-init: no service uses {what} (volume {vol})")
        for name, svc in services.items():
            if name == "certs-init":
                continue
            mounts = [v for v in svc.get("volumes", []) if v.split(":")[0] == vol]
            if mounts and name not in svcs:
                problem(where, f"{name} mounts {vol} ({what}): keys that are not its own")
            if not mounts and name in svcs:
                problem(where, f"{name} does not mount {vol} ({what}), its own keys")
            if read_only and any(not v.endswith(":ro") for v in mounts):
                problem(where, f"{name} must mount {vol} read-only")
    # And each process reads its keys from its own volume.
    for name, svc in brokers.items():
        for key in ("ca", "cert", "key"):
            path = tls_paths.get(name, {}).get(key, "")
            if volume_at(svc, path) != volume_at(init, env.get("BROKER_TLS_DIR", "")):
                problem(where, f"{name}: tls.{key} = {path} is not on the brokers' own volume")
        # The collector's CA and the client certificate shown to it: certs-init's too.
        telemetry = configs.get(name, {}).get("telemetry", {})
        for key in ("otlp_ca", "otlp_cert", "otlp_key"):
            path = telemetry.get(key)
            if path and volume_at(svc, path) != volume_at(init, env.get("BROKER_TLS_DIR", "")):
                problem(where, f"{name}: telemetry.{key} = {path} is not on the brokers' own volume")
    tls, _ = collector_grpc(collector)
    for name in collectors:
        for key in ("cert_file", "key_file", "client_ca_file"):
            path = tls.get(key)
            if path and volume_at(services[name], path) != volume_at(init, env.get("COLLECTOR_TLS_DIR", "")):
                problem(where, f"{name}: otel-collector.yaml's tls.{key} = {path} is not on its own volume (COLLECTOR_TLS_DIR)")
    for var, kind in (("CIVIL_STATUS_TLS_DIR", "civil-status"), ("JUDICIAL_RECORDS_TLS_DIR", "judicial-records")):
        for name in register(kind):
            svc = services[name]
            tls_dir = next((w.split("=", 1)[1] for w in words(svc, "command") if w.startswith("--tls-dir=")), "")
            if volume_at(svc, tls_dir) != volume_at(init, env.get(var, "")):
                problem(where, f"{name}: --tls-dir {tls_dir} is not on its own volume ({var})")
    for name in setup:
        certs = (services[name].get("environment") or {}).get("LIENTHONG_CERTS", "")
        if volume_at(services[name], certs) != volume_at(init, env.get("CLIENTS_DIR", "")):
            problem(where, f"{name}: LIENTHONG_CERTS {certs} is not the clients volume (CLIENTS_DIR)")
    print(f"compose: {len(secret_volumes)} key volumes, each mounted by certs-init and its own containers only")


# --- systemd ------------------------------------------------------------------


def check_systemd():
    where = "deploy/systemd/lienthong.service"
    settings = {}
    for line in (DEPLOY / "systemd" / "lienthong.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    cfg = load_toml(DEPLOY / "systemd" / "lienthong.toml")
    exec_start = settings.get("ExecStart", [""])[-1].split()
    if "--config" not in exec_start:
        problem(where, "ExecStart must pass --config")
    credentials = {v.split(":", 1)[0] for v in settings.get("LoadCredential", [])}
    for key in ("ca", "cert", "key"):
        path = PurePosixPath(cfg.get("tls", {}).get(key, ""))
        if path.parent == PurePosixPath("/run/credentials/lienthong.service") and path.name not in credentials:
            problem(where, f"lienthong.toml tls.{key} = {path} but no LoadCredential={path.name}:...")
    state_dirs = [f"/var/lib/{d}" for v in settings.get("StateDirectory", []) for d in v.split()]
    if cfg.get("data_dir") not in state_dirs:
        problem(where, f"data_dir {cfg.get('data_dir')} is not the unit's StateDirectory (the only writable path)")
    for required in ("ProtectSystem", "NoNewPrivileges", "ProtectHome", "PrivateTmp", "CapabilityBoundingSet",
                     "RestrictAddressFamilies", "SystemCallFilter"):
        if required not in settings:
            problem(where, f"hardening option {required}= is missing")
    if settings.get("ProtectSystem", [""])[-1] != "strict":
        problem(where, "ProtectSystem must be strict")
    if not (settings.get("DynamicUser", ["no"])[-1] == "yes" or settings.get("User")):
        problem(where, "the service must run as a dedicated user (User= or DynamicUser=yes)")
    print("systemd: unit and lienthong.toml agree (credentials, state directory), hardening options present")


# --- Dockerfile ---------------------------------------------------------------


def check_dockerfile():
    where = "deploy/docker/Dockerfile"
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    final_stage = False
    user = None
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM":
            final_stage = True
            user = None
        if op == "COPY" and not any(w.startswith("--from") for w in words):
            for src in [w for w in words[1:-1] if not w.startswith("--")]:
                if src != "." and not (ROOT / src).exists():
                    problem(where, f"COPY source {src} does not exist in the build context")
        if op == "USER":
            user = words[1]
    if not final_stage or user is None or user.split(":")[0] in ("root", "0"):
        problem(where, "the runtime stage must switch to a non-root USER")
    if not re.search(r"HEALTHCHECK.*lienthong\",\s*\"health", " ".join(lines)):
        problem(where, "the HEALTHCHECK must run `lienthong health`")
    print("dockerfile: build sources exist, non-root user, health check through `lienthong health`")


def main():
    import yaml  # noqa: F401 (kubernetes-validate brings PyYAML)

    for path in sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml")):
        try:
            load_yaml_all(path)
        except Exception as e:  # noqa: BLE001 (report any parse failure)
            problem(str(path.relative_to(ROOT)), f"not valid YAML: {e}")
    if problems:
        return report()
    docs = kubernetes_docs()
    validate_kubernetes(docs)
    if len(sys.argv) > 1:
        # `kubectl kustomize deploy/k8s` output: what `kubectl apply -k` would send.
        rendered = [(sys.argv[1], d) for d in load_yaml_all(sys.argv[1])]
        validate_kubernetes(rendered)
        check_kubernetes_consistency(rendered)
    check_kubernetes_consistency(docs)
    check_compose()
    check_systemd()
    check_dockerfile()
    return report()


def report():
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
