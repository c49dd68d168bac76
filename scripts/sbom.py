#!/usr/bin/env python3
"""CycloneDX SBOM of a meterd image, from its file system (no syft needed).

    podman export "$(podman create IMAGE)" > image.tar      # or docker create / docker export
    python3 scripts/sbom.py image.tar -o meterd.cdx.json

The components are what a scanner sees in the image:
  - the Debian packages of /var/lib/dpkg/status.d/<package> (the distroless layout that
    deploy/container/mkrootfs.sh writes), with deb package URLs;
  - the crates compiled into /usr/local/bin/meterd, read from its cargo auditable section
    (.dep-v0: zlib-compressed JSON), with their dependency graph.

Standard library only. scripts/deploy_tests.py (group image) imports the readers below.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import posixpath
import struct
import sys
import tarfile
import urllib.parse
import uuid
import zlib

METERD = "usr/local/bin/meterd"
STATUS_D = "var/lib/dpkg/status.d"
ELF_MACHINES = {62: "amd64", 183: "arm64"}


@dataclasses.dataclass
class Entry:
    path: str  # relative, no leading slash
    kind: str  # "file", "dir", "symlink"
    target: str = ""
    data: bytes = b""
    mode: int = 0


class ImageFS:
    """A flattened image file system, from `podman export` / `docker export` output."""

    def __init__(self, tar_path: str):
        self.entries: dict[str, Entry] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                path = posixpath.normpath(m.name.lstrip("./") or ".")
                if path == ".":
                    continue
                if m.isdir():
                    self.entries[path] = Entry(path, "dir", mode=m.mode)
                elif m.issym():
                    self.entries[path] = Entry(path, "symlink", target=m.linkname, mode=m.mode)
                elif m.islnk():
                    src = self.entries[posixpath.normpath(m.linkname.lstrip("./"))]
                    self.entries[path] = Entry(path, "file", data=src.data, mode=m.mode)
                elif m.isfile():
                    f = tar.extractfile(m)
                    self.entries[path] = Entry(path, "file", data=f.read() if f else b"", mode=m.mode)
                else:
                    self.entries[path] = Entry(path, "other", mode=m.mode)

    def resolve(self, path: str, depth: int = 0) -> str | None:
        """The path with every symlink resolved inside the image, or None if dangling."""
        if depth > 20:
            return None
        parts = [p for p in path.strip("/").split("/") if p]
        cur = ""
        for i, part in enumerate(parts):
            nxt = posixpath.join(cur, part) if cur else part
            e = self.entries.get(nxt)
            if e is None:
                return None
            if e.kind == "symlink":
                if e.target.startswith("/"):
                    tgt = posixpath.normpath(e.target.lstrip("/"))
                else:
                    tgt = posixpath.normpath(posixpath.join(posixpath.dirname(nxt), e.target))
                while tgt.startswith("../"):  # .. at the root stays at the root
                    tgt = tgt[3:]
                rest = "/".join(parts[i + 1:])
                return self.resolve(posixpath.join(tgt, rest) if rest else tgt, depth + 1)
            cur = nxt
        return cur

    def read(self, path: str) -> bytes:
        real = self.resolve(path)
        if real is None or self.entries[real].kind != "file":
            raise FileNotFoundError(path)
        return self.entries[real].data


# ---------------------------------------------------------------- dpkg


def parse_stanza(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def dpkg_packages(fs: ImageFS) -> dict[str, dict]:
    """status.d/<package> stanzas with their md5sums: {name: {"fields", "md5sums"}}."""
    out = {}
    for path, e in sorted(fs.entries.items()):
        if posixpath.dirname(path) != STATUS_D or e.kind != "file" or path.endswith(".md5sums"):
            continue
        fields = parse_stanza(e.data.decode())
        sums = {}
        md5 = fs.entries.get(path + ".md5sums")
        if md5 is not None:
            for line in md5.data.decode().splitlines():
                digest, _, file = line.partition("  ")
                sums[file.strip()] = digest
        # Conffiles (" /etc/debian_version <md5>" lines) have no md5sums line, as in dpkg.
        for line in fields.get("Conffiles", "").splitlines():
            if line.strip():
                file, _, digest = line.strip().partition(" ")
                sums[file.lstrip("/")] = digest.split()[0]
        out[posixpath.basename(path)] = {"fields": fields, "md5sums": sums, "has_md5sums": md5 is not None}
    return out


def os_release(fs: ImageFS) -> dict[str, str]:
    out = {}
    for line in fs.read("etc/os-release").decode().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v.strip().strip('"')
    return out


# ---------------------------------------------------------------- ELF


@dataclasses.dataclass
class Elf:
    machine: int
    sections: dict[str, bytes]
    needed: list[str]
    interp: str


def parse_elf(data: bytes) -> Elf | None:
    """64-bit little-endian ELF (amd64, arm64): sections, DT_NEEDED and the interpreter."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    machine = struct.unpack_from("<H", data, 0x12)[0]
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(shnum):
        name, stype, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        headers.append((name, stype, off, size))
    _, _, stroff, strsize = headers[shstrndx]
    strtab = data[stroff:stroff + strsize]

    def cstr(table: bytes, at: int) -> str:
        return table[at:table.index(b"\0", at)].decode()

    sections = {}
    for name, stype, off, size in headers:
        # SHT_NOBITS (8) has no bytes in the file.
        sections[cstr(strtab, name)] = b"" if stype == 8 else data[off:off + size]
    needed = []
    dynstr = sections.get(".dynstr", b"")
    dyn = sections.get(".dynamic", b"")
    for i in range(0, len(dyn) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dyn, i)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            needed.append(cstr(dynstr, val))
    interp = sections.get(".interp", b"").rstrip(b"\0").decode()
    return Elf(machine, sections, needed, interp)


def audit_data(binary: bytes) -> dict:
    """The cargo auditable dependency tree embedded in a Rust binary."""
    elf = parse_elf(binary)
    if elf is None or ".dep-v0" not in elf.sections:
        raise ValueError("no .dep-v0 section: build with `cargo auditable build`")
    return json.loads(zlib.decompress(elf.sections[".dep-v0"]))


# ---------------------------------------------------------------- CycloneDX


def deb_purl(fields: dict, distro: str) -> str:
    name = fields["Package"]
    version = urllib.parse.quote(fields["Version"], safe="")
    return f"pkg:deb/debian/{name}@{version}?arch={fields['Architecture']}&distro={distro}"


def cargo_purl(pkg: dict) -> str:
    return f"pkg:cargo/{pkg['name']}@{pkg['version']}"


def sbom(fs: ImageFS, name: str = "meterd") -> dict:
    osr = os_release(fs)
    distro = f"{osr.get('ID', 'debian')}-{osr.get('VERSION_ID', '')}"
    components = [{
        "type": "operating-system",
        "bom-ref": "os",
        "name": osr.get("ID", "debian"),
        "version": fs.read("etc/debian_version").decode().strip() if "etc/debian_version" in fs.entries
        else osr.get("VERSION_ID", ""),
        "description": osr.get("PRETTY_NAME", ""),
    }]
    for pkg, info in sorted(dpkg_packages(fs).items()):
        f = info["fields"]
        purl = deb_purl(f, distro)
        components.append({
            "type": "library",
            "bom-ref": purl,
            "name": f["Package"],
            "version": f["Version"],
            "purl": purl,
            "properties": [
                {"name": "meterd:package-type", "value": "deb"},
                {"name": "meterd:architecture", "value": f["Architecture"]},
                {"name": "meterd:files-in-image", "value": str(len(info["md5sums"]))},
            ],
        })
    binary = fs.read(METERD)
    audit = audit_data(binary)
    pkgs = audit["packages"]
    refs = []
    root_ref = None
    for p in pkgs:
        ref = cargo_purl(p)
        refs.append(ref)
        if p.get("root"):
            root_ref = ref
            continue
        comp = {"type": "library", "bom-ref": ref, "name": p["name"], "version": p["version"], "purl": ref,
                "properties": [{"name": "meterd:package-type", "value": "cargo"},
                               {"name": "meterd:source", "value": p.get("source", "")},
                               {"name": "meterd:kind", "value": p.get("kind", "runtime")}]}
        if p.get("kind") == "build":
            comp["scope"] = "excluded"  # build scripts' dependencies: not in the binary
        components.append(comp)
    deps = [{"ref": refs[i], "dependsOn": sorted({refs[d] for d in p.get("dependencies", [])})}
            for i, p in enumerate(pkgs)]
    root = next(p for p in pkgs if p.get("root"))
    digest = hashlib.sha256(binary).hexdigest()
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {
            "tools": {"components": [{"type": "application", "name": "scripts/sbom.py"}]},
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": name,
                "version": root["version"],
                "components": [{
                    "type": "application", "bom-ref": root_ref, "name": root["name"],
                    "version": root["version"], "purl": root_ref,
                    "hashes": [{"alg": "SHA-256", "content": digest}],
                    "properties": [{"name": "meterd:path", "value": "/" + METERD}],
                }],
            },
        },
        "components": components,
        "dependencies": deps,
    }
    if os.environ.get("SOURCE_DATE_EPOCH"):
        import datetime
        ts = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.timezone.utc)
        bom["metadata"]["timestamp"] = ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    # Same image, same serial number: the SBOM is reproducible.
    body = json.dumps(bom, sort_keys=True).encode()
    bom["serialNumber"] = "urn:uuid:" + str(uuid.uuid5(uuid.NAMESPACE_URL, hashlib.sha256(body).hexdigest()))
    return bom


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image_tar", help="the image's file system, from podman/docker export")
    ap.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    ap.add_argument("--name", default="meterd", help="the image's name in the SBOM")
    args = ap.parse_args()
    try:
        bom = sbom(ImageFS(args.image_tar), args.name)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"sbom: {e}", file=sys.stderr)
        return 1
    text = json.dumps(bom, indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
        n_deb = sum(1 for c in bom["components"] if c.get("purl", "").startswith("pkg:deb/"))
        n_crate = sum(1 for c in bom["components"] if c.get("purl", "").startswith("pkg:cargo/"))
        print(f"sbom: {args.output}: {n_deb} Debian packages, {n_crate} crates", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
