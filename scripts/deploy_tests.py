"""Property tests for the deploy artifacts, run by scripts/check-deploy.sh in .venv-deploy.

    python scripts/deploy_tests.py helm DIR[:VALUES] ...   # helm template --output-dir DIR [-f VALUES]
    python scripts/deploy_tests.py ecs                                 # task definition, IAM, CFN
    python scripts/deploy_tests.py systemd                             # unit file directives
    python scripts/deploy_tests.py helm-config DIR TOKEN_FILE           # print the rendered meterd.toml
    python scripts/deploy_tests.py image TAR SBOM ARCH    # an exported image (podman export) and its SBOM
    python scripts/deploy_tests.py dockerfile             # deploy/Dockerfile's arch-dependent paths
    python scripts/deploy_tests.py no-emulator BINARY     # a production binary: no emulator inside

Each group runs as a unittest suite; the exit code is non-zero on any failure.
"""

import json
import pathlib
import re
import sys
import tomllib
import unittest

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
RENDER_DIRS: list[tuple[pathlib.Path, dict]] = []


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def seconds(text: str) -> int:
    """'25s', '1m', '40' -> seconds."""
    m = re.fullmatch(r"(\d+)\s*(s|sec|m|min)?", text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return int(m.group(1)) * (60 if m.group(2) in ("m", "min") else 1)


def container_grace() -> int:
    cfg = tomllib.loads((ROOT / "deploy/container/meterd.toml").read_text().replace("@PRODUCT_CODE@", "x"))
    return seconds(cfg["server"]["grace_period"])


# ---------------------------------------------------------------- helm


def load_render(d: pathlib.Path) -> dict:
    objs = {}
    for f in sorted(d.rglob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                objs[(doc["kind"], doc["metadata"]["name"])] = doc
    return objs


def only(objs: dict, kind: str) -> dict:
    found = [o for (k, _), o in objs.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class HelmRender(unittest.TestCase):
    def each(self):
        for d, values in RENDER_DIRS:
            with self.subTest(render=d.name):
                yield load_render(d), values

    def pod(self, objs):
        return only(objs, "Deployment")["spec"]["template"]["spec"]

    def sidecar(self, objs):
        inits = [c for c in self.pod(objs).get("initContainers", []) if c["name"] == "meterd"]
        self.assertEqual(len(inits), 1, "meterd must be an init container")
        return inits[0]

    def config(self, objs):
        cm = only(objs, "ConfigMap")
        return tomllib.loads(cm["data"]["meterd.toml"])

    def test_native_sidecar(self):
        for objs, _ in self.each():
            self.assertEqual(self.sidecar(objs).get("restartPolicy"), "Always")
            for c in self.pod(objs)["containers"]:
                self.assertNotEqual(c["name"], "meterd", "meterd must not be a regular container")

    def test_probes(self):
        # meterd listens only inside the pod, so the kubelet probes it with exec.
        for objs, _ in self.each():
            sc = self.sidecar(objs)
            self.assertEqual(sc["startupProbe"]["exec"]["command"], ["meterd", "health"])
            self.assertEqual(sc["readinessProbe"]["exec"]["command"], ["meterd", "health"])
            self.assertEqual(sc["livenessProbe"]["exec"]["command"], ["meterd", "status"])
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                self.assertNotIn("httpGet", sc[kind])
            self.assertNotIn("ports", sc, "nothing outside the pod connects to meterd")

    def test_irsa(self):
        for objs, values in self.each():
            sa = only(objs, "ServiceAccount")
            self.assertEqual(sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
                             values["serviceAccount"]["roleArn"])
            self.assertEqual(self.pod(objs)["serviceAccountName"], sa["metadata"]["name"])

    def test_security_context(self):
        for objs, _ in self.each():
            pod = self.pod(objs)
            psc = pod["securityContext"]
            self.assertTrue(psc["runAsNonRoot"])
            self.assertEqual(psc["seccompProfile"]["type"], "RuntimeDefault")
            for c in pod["containers"] + pod["initContainers"]:
                sc = c["securityContext"]
                self.assertTrue(sc["runAsNonRoot"], c["name"])
                self.assertTrue(sc["readOnlyRootFilesystem"], c["name"])
                self.assertFalse(sc["allowPrivilegeEscalation"], c["name"])
                self.assertEqual(sc["capabilities"]["drop"], ["ALL"], c["name"])
                self.assertNotIn("add", sc["capabilities"], c["name"])
                self.assertEqual(sc["seccompProfile"]["type"], "RuntimeDefault", c["name"])
                self.assertIn("limits", c["resources"], c["name"])
                self.assertIn("requests", c["resources"], c["name"])

    def test_grace_period(self):
        for objs, _ in self.each():
            grace = seconds(self.config(objs)["server"]["grace_period"])
            self.assertGreater(self.pod(objs)["terminationGracePeriodSeconds"], grace)

    def test_config_from_values(self):
        chart = yaml.safe_load((ROOT / "helm/meterd/Chart.yaml").read_text())
        allowed = chart["annotations"]["meterd.io/allowed-product-codes"].split(",")
        for objs, values in self.each():
            cfg = self.config(objs)
            m = values["meterd"]
            self.assertIn(cfg["product_code"], [a.strip() for a in allowed])
            self.assertEqual(cfg["metering"]["dimensions"], m["dimensions"])
            self.assertEqual(cfg["metering"]["tag_keys"], m["tagKeys"])
            self.assertEqual(cfg["platform"], m["platform"])
            self.assertEqual(cfg["pricing"], m["pricing"])
            self.assertEqual(cfg["state"]["dir"], "/var/lib/meterd")
            if "sending" in m:
                self.assertEqual(seconds(cfg["sending"]["spread"]), m["sending"]["spreadSeconds"])
                self.assertEqual(cfg["sending"]["max_calls_per_second"], m["sending"]["maxCallsPerSecond"])
            # Only the keys meterd's config knows (unknown keys are errors).
            self.assertLessEqual(set(cfg), {"product_code", "pricing", "platform", "metering",
                                            "registration", "server", "state", "aws", "sending"})

    def test_state_volume(self):
        for objs, values in self.each():
            vols = {v["name"]: v for v in self.pod(objs)["volumes"]}
            mounts = {m["name"]: m["mountPath"] for m in self.sidecar(objs)["volumeMounts"]}
            self.assertEqual(mounts["meterd-state"], "/var/lib/meterd")
            if values["meterd"]["state"]["persistence"]["enabled"]:
                claim = vols["meterd-state"]["persistentVolumeClaim"]["claimName"]
                self.assertIn(("PersistentVolumeClaim", claim), objs)
            else:
                self.assertIn("emptyDir", vols["meterd-state"])

    def test_app_reaches_meterd(self):
        for objs, values in self.each():
            m = values["meterd"]
            server = self.config(objs)["server"]
            pod = self.pod(objs)
            vols = {v["name"]: v for v in pod["volumes"]}
            sidecar_mounts = {x["mountPath"]: x["name"] for x in self.sidecar(objs)["volumeMounts"]}
            secret = m["auth"]["existingSecret"]
            for c in pod["containers"]:
                env = {e["name"]: e for e in c.get("env", [])}
                if m["transport"] == "tcp":
                    self.assertRegex(server["listen"], r"^127\.0\.0\.1:\d+$", "TCP stays on loopback")
                    self.assertEqual(server["unix_socket"], "")
                    self.assertEqual(env["METERD_URL"]["value"], f"http://{server['listen']}")
                    self.assertTrue(secret, "TCP needs a token")
                else:
                    sock = server["unix_socket"]
                    self.assertEqual(server["listen"], "", "no TCP listener with the Unix socket")
                    self.assertEqual(env["METERD_SOCKET"]["value"], sock)
                    sock_dir = sock.rsplit("/", 1)[0]
                    # The socket's directory: one emptyDir, mounted by meterd and the app.
                    name = sidecar_mounts[sock_dir]
                    self.assertIn("emptyDir", vols[name])
                    app_mounts = {x["mountPath"]: x["name"] for x in c.get("volumeMounts", [])}
                    self.assertEqual(app_mounts.get(sock_dir), name, f"{c['name']} must mount {sock_dir}")
                    # Mode 0660: the app reaches it through the group the pod's fsGroup gives.
                    self.assertTrue(pod["securityContext"].get("fsGroup"), "the socket's group is the fsGroup")
                if secret:
                    ref = env["METERD_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                    self.assertEqual((ref["name"], ref["key"]), (secret, "token"))
                    self.assertEqual(vols["meterd-token"]["secret"]["secretName"], secret)
                    token_dir = next(p for p, n in sidecar_mounts.items() if n == "meterd-token")
                    self.assertEqual(server["auth_token_file"], f"{token_dir}/token")
                else:
                    self.assertNotIn("METERD_AUTH_TOKEN", env)
                    self.assertEqual(server["auth_token_file"], "")

    def test_no_generated_secret(self):
        # The chart never makes a token (that needed lookup and randAlphaNum): it is the user's.
        for objs, _ in self.each():
            self.assertEqual([n for (k, n) in objs if k == "Secret"], [])


# ---------------------------------------------------------------- ecs


def ecs_taskdef() -> dict:
    return json.loads((ROOT / "ecs-task-def/task-definition.json").read_text())


def cfn_template() -> dict:
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(ROOT / "ecs-task-def/cloudformation.yaml"))


def cfn_to_api(node, params):
    """CloudFormation TaskDefinition properties -> RegisterTaskDefinition parameters."""
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            ref = node["Ref"]
            if ref in params:
                return params[ref]
            return {"AWS::Region": "us-east-1", "AWS::StackName": "meterd-example"}.get(ref, f"ref-{ref}")
        if len(node) == 1 and next(iter(node)).startswith("Fn::"):
            return "arn:aws:iam::111122223333:role/from-cfn"
        return {k[0].lower() + k[1:] if k[0].isupper() else k: cfn_to_api(v, params) for k, v in node.items()}
    if isinstance(node, list):
        return [cfn_to_api(v, params) for v in node]
    return node


def validate_register(params: dict) -> str:
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(params, shape)
    return report.generate_report() if report.has_errors() else ""


class EcsTaskDefinition(unittest.TestCase):
    def test_botocore_shape(self):
        self.assertEqual(validate_register(ecs_taskdef()), "")

    def test_cfn_task_definition_shape(self):
        tmpl = cfn_template()
        params = {k: v.get("Default") for k, v in tmpl["Parameters"].items()}
        props = tmpl["Resources"]["TaskDefinition"]["Properties"]
        for arch in tmpl["Parameters"]["CpuArchitecture"]["AllowedValues"]:
            with self.subTest(arch=arch):
                params.update(MeterdImage="meterd:test", AppImage="app:test", CpuArchitecture=arch)
                api = cfn_to_api(props, params)
                self.assertEqual(validate_register(api), "")
                self.assertEqual(api["runtimePlatform"]["cpuArchitecture"], arch)

    def test_cpu_architecture(self):
        # One image for both (a manifest list): the architecture is the task's choice.
        param = cfn_template()["Parameters"]["CpuArchitecture"]
        self.assertEqual(sorted(param["AllowedValues"]), ["ARM64", "X86_64"])
        self.assertIn(ecs_taskdef()["runtimePlatform"]["cpuArchitecture"], param["AllowedValues"])
        self.assertEqual(ecs_taskdef()["runtimePlatform"]["cpuArchitecture"], param["Default"])

    def check_sidecar_shape(self, td: dict, grace: int):
        self.assertEqual(td["networkMode"], "awsvpc")
        self.assertTrue(td["taskRoleArn"])
        c = {x["name"]: x for x in td["containerDefinitions"]}
        self.assertEqual(set(c), {"meterd", "app"})
        meterd, app = c["meterd"], c["app"]
        self.assertTrue(meterd["essential"])
        self.assertTrue(app["essential"])
        self.assertEqual(meterd["healthCheck"]["command"], ["CMD", "meterd", "health"])
        self.assertIn({"containerName": "meterd", "condition": "HEALTHY"}, app["dependsOn"])
        self.assertGreaterEqual(int(meterd["stopTimeout"]), grace + 5)
        self.assertTrue(meterd["readonlyRootFilesystem"])
        self.assertEqual(meterd["linuxParameters"]["capabilities"]["drop"], ["ALL"])
        mounts = {m["containerPath"] for m in meterd["mountPoints"]}
        self.assertIn("/var/lib/meterd", mounts)
        for x in (meterd, app):
            self.assertEqual(x["logConfiguration"]["logDriver"], "awslogs")
        env = {e["name"]: e["value"] for e in app["environment"]}
        self.assertEqual(env["METERD_URL"], "http://127.0.0.1:8377")

    def test_task_definition_properties(self):
        self.check_sidecar_shape(ecs_taskdef(), container_grace())

    def test_cfn_matches_task_definition(self):
        tmpl = cfn_template()
        params = {k: v.get("Default") for k, v in tmpl["Parameters"].items()}
        api = cfn_to_api(tmpl["Resources"]["TaskDefinition"]["Properties"], params)
        self.check_sidecar_shape(api, container_grace())
        td = ecs_taskdef()
        for key in ("networkMode", "requiresCompatibilities", "cpu", "memory", "volumes"):
            self.assertEqual(api[key], td[key], key)
        for a, b in zip(api["containerDefinitions"], td["containerDefinitions"]):
            for key in ("name", "essential", "healthCheck", "dependsOn", "stopTimeout",
                        "mountPoints", "environment", "user", "readonlyRootFilesystem"):
                self.assertEqual(a.get(key), b.get(key), f"{a['name']}.{key}")

    def test_iam_policy(self):
        policy = json.loads((ROOT / "ecs-task-def/iam-policy.json").read_text())
        actions = {a for s in policy["Statement"] if s["Effect"] == "Allow" for a in s["Action"]}
        self.assertEqual(actions, {"aws-marketplace:RegisterUsage", "aws-marketplace:MeterUsage"})
        role = cfn_template()["Resources"]["TaskRole"]["Properties"]
        inline = role["Policies"][0]["PolicyDocument"]
        self.assertEqual(json.loads(json.dumps(inline)), policy, "CFN inline policy drifted from iam-policy.json")
        trust = role["AssumeRolePolicyDocument"]["Statement"][0]
        self.assertEqual(trust["Principal"]["Service"], "ecs-tasks.amazonaws.com")

    def test_trust_policies(self):
        ecs = json.loads((ROOT / "ecs-task-def/task-role-trust-policy.json").read_text())["Statement"][0]
        self.assertEqual((ecs["Principal"]["Service"], ecs["Action"]), ("ecs-tasks.amazonaws.com", "sts:AssumeRole"))
        ec2 = json.loads((ROOT / "deploy/ec2/instance-role-trust-policy.json").read_text())["Statement"][0]
        self.assertEqual((ec2["Principal"]["Service"], ec2["Action"]), ("ec2.amazonaws.com", "sts:AssumeRole"))
        eks = json.loads((ROOT / "deploy/eks/irsa-trust-policy.json").read_text())["Statement"][0]
        self.assertEqual(eks["Action"], "sts:AssumeRoleWithWebIdentity")
        self.assertIn(":oidc-provider/", eks["Principal"]["Federated"])
        cond = eks["Condition"]["StringEquals"]
        self.assertEqual(cond["OIDC_PROVIDER:aud"], "sts.amazonaws.com")
        self.assertRegex(cond["OIDC_PROVIDER:sub"], r"^system:serviceaccount:[^:]+:[^:]+$")


# ---------------------------------------------------------------- image

IMAGE: dict = {}  # tar, sbom, arch
# meterd's own files: its binary and configuration, its user, and the CA bundle that
# ca-certificates generates (update-ca-certificates) from the certificates it ships.
OWN_FILES = {
    "usr/local/bin/meterd": None,
    "etc/meterd/meterd.toml": None,
    "etc/passwd": None,
    "etc/group": None,
    "etc/nsswitch.conf": None,
    "etc/ssl/certs/ca-certificates.crt": "ca-certificates",
}
MULTIARCH = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}


DEMO_KEY = ROOT / "src/emulator/demo-signing-key.pem"


def emulator_traces(binary: bytes) -> list[str]:
    """What of the emulator a binary carries: a PEM private key (the demo signing key or any
    other), a line of the demo key's body, the admin API's path. Empty for a production build."""
    found = []
    for marker in (b"PRIVATE KEY-----", b"/_emulator/"):
        if marker in binary:
            found.append(f"{marker.decode()!r} at byte {binary.index(marker)}")
    body = [l for l in DEMO_KEY.read_bytes().splitlines() if l and not l.startswith(b"-----")]
    hits = [l for l in body if l in binary]
    if hits:
        found.append(f"{len(hits)} of {len(body)} lines of the demo signing key's body")
    return found


class ImageFiles(unittest.TestCase):
    """The runtime image: scannable (os-release, dpkg status.d), every file accounted for."""

    @classmethod
    def setUpClass(cls):
        import hashlib

        sys.path.insert(0, str(ROOT / "scripts"))
        import sbom

        cls.sbom_mod = sbom
        cls.md5 = staticmethod(lambda b: hashlib.md5(b).hexdigest())
        cls.fs = sbom.ImageFS(IMAGE["tar"])
        cls.pkgs = sbom.dpkg_packages(cls.fs)
        cls.arch = IMAGE["arch"]
        cls.owner = {f: name for name, info in cls.pkgs.items() for f in info["md5sums"]}

    def test_os_release(self):
        osr = self.sbom_mod.os_release(self.fs)
        self.assertEqual(osr.get("ID"), "debian")
        self.assertTrue(osr.get("VERSION_ID"), "os-release has no VERSION_ID")
        self.assertIn("etc/debian_version", self.fs.entries)

    def test_package_entries(self):
        self.assertTrue({"base-files", "libc6", "ca-certificates"} <= set(self.pkgs), sorted(self.pkgs))
        for name, info in self.pkgs.items():
            f = info["fields"]
            with self.subTest(package=name):
                self.assertEqual(f.get("Package"), name)
                self.assertEqual(f.get("Status"), "install ok installed")
                self.assertTrue(f.get("Version"))
                self.assertIn(f.get("Architecture"), (self.arch, "all"))
                self.assertTrue(info["has_md5sums"], f"{name}.md5sums missing")
                for path, digest in info["md5sums"].items():
                    self.assertIn(path, self.fs.entries, f"{name} lists {path}, not in the image")
                    self.assertEqual(self.md5(self.fs.read(path)), digest, f"{path} differs from {name}")

    def accounted(self, path: str) -> bool:
        if path in self.owner or path in OWN_FILES:
            return True
        if path.startswith(self.sbom_mod.STATUS_D + "/"):
            base = path.rsplit("/", 1)[1].removesuffix(".md5sums")
            return base in self.pkgs
        return False

    def test_every_file_accounted_for(self):
        stray = []
        for path, e in sorted(self.fs.entries.items()):
            if e.kind == "dir":
                continue
            if e.kind == "symlink":
                # A symlink from a package (os-release, the dynamic loader, a doc directory)
                # must lead to that package's files.
                real = self.fs.resolve(path)
                if real is None:
                    stray.append(f"{path} -> {e.target} (dangling)")
                elif self.fs.entries[real].kind == "dir":
                    if not any(f.startswith(real + "/") for f in self.owner):
                        stray.append(f"{path} -> {real}/ (no package files)")
                elif not self.accounted(real):
                    stray.append(f"{path} -> {real}")
            elif e.kind != "file" or not self.accounted(path):
                stray.append(path)
        self.assertEqual(stray, [], "files in the image that no package entry accounts for")
        need = {v for v in OWN_FILES.values() if v}
        self.assertLessEqual(need, set(self.pkgs))

    def test_shared_libraries(self):
        ma = MULTIARCH[self.arch]
        elves = {}
        for path, e in self.fs.entries.items():
            if e.kind == "file" and e.data[:4] == b"\x7fELF":
                elves[path] = self.sbom_mod.parse_elf(e.data)
        self.assertEqual([p for p, elf in elves.items() if elf is None], [], "ELF files that are not 64-bit LE")
        machines = {self.sbom_mod.ELF_MACHINES.get(elf.machine) for elf in elves.values()}
        self.assertEqual(machines, {self.arch}, "every ELF file is built for the image's architecture")
        for path in elves:
            if path != self.sbom_mod.METERD:
                self.assertIn(path, self.owner, f"{path}: a library no package entry owns")
        meterd = elves[self.sbom_mod.METERD]
        interp = self.fs.resolve(meterd.interp)
        self.assertIsNotNone(interp, f"no dynamic loader {meterd.interp}")
        self.assertIn(interp, self.owner)
        # The loader searches the multiarch directories (no ld.so.cache in the image).
        for lib in meterd.needed:
            found = [d for d in (f"lib/{ma}", f"usr/lib/{ma}") if self.fs.resolve(f"{d}/{lib}")]
            self.assertTrue(found, f"{lib} (needed by meterd) is not in /lib/{ma} or /usr/lib/{ma}")
            self.assertIn(self.fs.resolve(f"{found[0]}/{lib}"), self.owner)

    def test_no_emulator_in_the_binary(self):
        # The production image is built without the emulator feature: no signing key, no
        # admin API. (The container test also asks the running sidecar for /_emulator/.)
        self.assertEqual(emulator_traces(self.fs.read(self.sbom_mod.METERD)), [])

    def test_cargo_auditable(self):
        audit = self.sbom_mod.audit_data(self.fs.read(self.sbom_mod.METERD))
        root = [p for p in audit["packages"] if p.get("root")]
        self.assertEqual([p["name"] for p in root], ["meterd"])
        names = {p["name"] for p in audit["packages"]}
        self.assertTrue({"tokio", "hyper", "rusqlite"} <= names, "dependency tree looks incomplete")

    def test_sbom_lists_packages_and_crates(self):
        bom = json.loads(pathlib.Path(IMAGE["sbom"]).read_text())
        self.assertEqual((bom["bomFormat"], bom["specVersion"]), ("CycloneDX", "1.5"))
        purls = {c.get("purl", "") for c in bom["components"]}
        for name, info in self.pkgs.items():
            f = info["fields"]
            self.assertTrue(any(p.startswith(f"pkg:deb/debian/{name}@") and f"arch={f['Architecture']}" in p
                                for p in purls), f"{name} missing from the SBOM")
        audit = self.sbom_mod.audit_data(self.fs.read(self.sbom_mod.METERD))
        for p in audit["packages"]:
            if not p.get("root"):
                self.assertIn(f"pkg:cargo/{p['name']}@{p['version']}", purls)
        self.assertEqual(bom["metadata"]["component"]["components"][0]["name"], "meterd")
        # And the build's lock file: every crate compiled in is one Cargo.lock pins.
        lock = tomllib.loads((ROOT / "Cargo.lock").read_text())
        locked = {(p["name"], p["version"]) for p in lock["package"]}
        for p in audit["packages"]:
            self.assertIn((p["name"], p["version"]), locked)


class DockerfilePlatforms(unittest.TestCase):
    """deploy/Dockerfile and mkrootfs.sh for each platform: the paths they derive from
    TARGETARCH, resolved against Debian's multiarch layout."""

    def test_no_hard_coded_architecture(self):
        for f in ("deploy/Dockerfile", "deploy/container/mkrootfs.sh"):
            text = (ROOT / f).read_text()
            code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
            for triplet in MULTIARCH.values():
                # The triplets appear once, in the TARGETARCH -> triplet mapping.
                self.assertLessEqual(code.count(triplet), 1, f"{f} hard-codes {triplet}")
            self.assertNotRegex(code, r"/lib(64)?/(x86_64|aarch64)-linux-gnu|ld-linux-(x86-64|aarch64)",
                                f"{f} hard-codes a library path")

    def test_platform_args(self):
        text = (ROOT / "deploy/Dockerfile").read_text()
        self.assertIn("ARG TARGETARCH", text)
        for stage in ("builder", "rootfs"):
            self.assertRegex(text, rf"FROM --platform=\$BUILDPLATFORM \S+ AS {stage}\b")
        self.assertRegex(text, r"FROM scratch AS runtime-base")

    def test_mapping_resolves_in_debian_layout(self):
        """The TARGETARCH -> triplet mapping of both files gives paths that exist in each
        architecture's libc6 (as Debian ships it: dpkg -L libc6 on that architecture)."""
        libc6_paths = {
            # bookworm's libc6 file lists (the loader and the libraries meterd links).
            "amd64": {"lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libm.so.6",
                      "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", "lib64/ld-linux-x86-64.so.2"},
            "arm64": {"lib/aarch64-linux-gnu/libc.so.6", "lib/aarch64-linux-gnu/libm.so.6",
                      "lib/aarch64-linux-gnu/ld-linux-aarch64.so.1", "lib/ld-linux-aarch64.so.1"},
        }
        sh = (ROOT / "deploy/container/mkrootfs.sh").read_text()
        docker = (ROOT / "deploy/Dockerfile").read_text()
        for arch, triplet in MULTIARCH.items():
            with self.subTest(arch=arch):
                for text in (sh, docker):
                    m = re.search(rf"\b{arch}\) ma=([\w-]+) ;;", text)
                    self.assertIsNotNone(m, f"no {arch} mapping")
                    self.assertEqual(m.group(1), triplet)
                    rust = f"{triplet.split('-')[0]}-unknown-linux-gnu"
                    self.assertIn(rust, {"x86_64-unknown-linux-gnu", "aarch64-unknown-linux-gnu"})
                for pattern in ("*/$ma/libc.so.6", "*/$ma/libm.so.6", "*/$ma/ld-linux-*.so.*", "lib*/ld-linux-*.so.*"):
                    self.assertIn(pattern, sh)
                    rx = re.escape(pattern.replace("$ma", triplet)).replace(r"\*", ".*")
                    self.assertTrue(any(re.fullmatch(rx, p) for p in libc6_paths[arch]),
                                    f"{pattern} matches nothing in {arch}'s libc6")


# ---------------------------------------------------------------- systemd


def unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "deploy/systemd/meterd.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


class SystemdUnit(unittest.TestCase):
    def test_required_directives(self):
        d = unit_directives()
        want = {
            "Type": "notify", "Restart": "on-failure", "StateDirectory": "meterd",
            "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
            "NoNewPrivileges": "yes", "PrivateTmp": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "CapabilityBoundingSet": "",
        }
        for k, v in want.items():
            self.assertEqual(d.get(k), [v], k)
        self.assertIn("@system-service", d["SystemCallFilter"])

    def test_stop_timeout_exceeds_grace(self):
        cfg = tomllib.loads((ROOT / "deploy/systemd/meterd.toml").read_text())
        grace = seconds(cfg["server"]["grace_period"])
        self.assertGreater(seconds(unit_directives()["TimeoutStopSec"][0]), grace)

    def test_example_config_matches_unit(self):
        cfg = tomllib.loads((ROOT / "deploy/systemd/meterd.toml").read_text())
        self.assertEqual(cfg["state"]["dir"], "/var/lib/meterd")  # StateDirectory=meterd
        self.assertEqual(cfg["platform"], "ec2")
        self.assertTrue(cfg["server"]["listen"].startswith("127.0.0.1:"))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 64
    group = sys.argv[1]
    if group == "no-emulator":
        traces = emulator_traces(pathlib.Path(sys.argv[2]).read_bytes())
        for t in traces:
            print(f"{sys.argv[2]}: emulator inside: {t}", file=sys.stderr)
        return 1 if traces else 0
    if group == "helm-config":
        cm = only(load_render(pathlib.Path(sys.argv[2])), "ConfigMap")
        print(cm["data"]["meterd.toml"].replace("/var/run/secrets/meterd/token", sys.argv[3]), end="")
        return 0
    cases = {"helm": HelmRender, "ecs": EcsTaskDefinition, "systemd": SystemdUnit,
             "image": ImageFiles, "dockerfile": DockerfilePlatforms}[group]
    if group == "image":
        if len(sys.argv) != 5:
            print(__doc__, file=sys.stderr)
            return 64
        IMAGE.update(tar=sys.argv[2], sbom=sys.argv[3], arch=sys.argv[4])
    if group == "helm":
        defaults = yaml.safe_load((ROOT / "helm/meterd/values.yaml").read_text())
        for arg in sys.argv[2:]:
            d, _, over = arg.partition(":")
            values = merged(defaults, yaml.safe_load(pathlib.Path(over).read_text())) if over else defaults
            RENDER_DIRS.append((pathlib.Path(d), values))
        if not RENDER_DIRS:
            print("helm: give at least one render directory", file=sys.stderr)
            return 64
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(cases)
    result = unittest.TextTestRunner(verbosity=1, stream=sys.stderr).run(suite)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
