#!/usr/bin/env python3
"""Times custom image builds against a baseline from the same run.

    sudo -E python3 examples/image_build_timing.py [path/to/airlock]

- baseline: copying airlock's cached Debian base (rootfs.ext4) once, the
  I/O floor of any image made from it;
- a small recipe on the cached Debian base (jq from apt, a build command);
- a recipe on an OCI base: an archive made here from this machine's bash
  and its libraries, in two layers.

Each recipe carries a fresh value, so it builds anew; the images are removed
afterwards. Needs root (the build chroots) and the Debian mirror (apt).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

AIRLOCK = sys.argv[1] if len(sys.argv) > 1 else "target/release/airlock"
CACHE = os.environ.get("AIRLOCK_HOME") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "airlock"
)


def layer(files: dict[str, tuple[int, bytes]], links: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({os.path.dirname(p) for p in files} - {""})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, (mode, data) in files.items():
            info = tarfile.TarInfo(name)
            info.mode, info.size = mode, len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def oci_archive(path: str) -> None:
    base = {
        "usr/bin/bash": (0o755, open("/usr/bin/bash", "rb").read()),
        "etc/layered": (0o644, b"one\n"),
    }
    for lib in ["libtinfo.so.6", "libc.so.6"]:
        base[f"usr/lib/x86_64-linux-gnu/{lib}"] = (0o755, open(f"/lib/x86_64-linux-gnu/{lib}", "rb").read())
    base["usr/lib64/ld-linux-x86-64.so.2"] = (0o755, open("/lib64/ld-linux-x86-64.so.2", "rb").read())
    layers = [
        layer(base, {"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "usr/bin/sh": "bash"}),
        layer({"etc/layered": (0o644, b"two\n")}, {}),
    ]
    blobs, descriptors, diff_ids = {}, [], []
    for raw in layers:
        gz = gzip.compress(raw, mtime=0)
        digest = "sha256:" + hashlib.sha256(gz).hexdigest()
        blobs[digest] = gz
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        descriptors.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": len(gz)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    blobs[config_digest] = config
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": descriptors,
    }).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blobs[manifest_digest] = manifest
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": len(manifest),
    }]}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index)] + [
            (f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items()
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def main() -> None:
    subprocess.run([AIRLOCK, "image", "build"], check=True, stdout=subprocess.DEVNULL)
    bases = sorted(glob.glob(os.path.join(CACHE, "rootfs", "*", "rootfs.ext4")), key=os.path.getmtime)
    if not bases:
        sys.exit(f"no cached Debian base under {CACHE}/rootfs")
    nonce = os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="airlock-timing-") as work:
        started = time.monotonic()
        shutil.copyfile(bases[-1], os.path.join(work, "copy.ext4"))
        baseline = time.monotonic() - started
        os.unlink(os.path.join(work, "copy.ext4"))

        debian = os.path.join(work, "debian.toml")
        with open(debian, "w") as f:
            f.write(f'name = "timing-debian"\n[packages]\napt = ["jq"]\n[build]\nrun = ["jq --version"]\n[env]\nNONCE = "{nonce}"\n')
        oci_archive(os.path.join(work, "base.tar"))
        oci = os.path.join(work, "oci.toml")
        with open(oci, "w") as f:
            f.write(f'name = "timing-oci"\nbase = "oci-archive:base.tar"\n[env]\nNONCE = "{nonce}"\n')
        try:
            debian_s = timed([AIRLOCK, "image", "build", "--recipe", debian])
            oci_s = timed([AIRLOCK, "image", "build", "--recipe", oci])
        finally:
            for name in ["timing-debian", "timing-oci"]:
                subprocess.run([AIRLOCK, "image", "remove", name], stderr=subprocess.DEVNULL)
    print(f"baseline: copy of the cached Debian base ({os.path.getsize(bases[-1]) >> 20} MiB): {baseline:.1f} s (1.00x)")
    print(f"small recipe on the Debian base (jq, a command): {debian_s:.1f} s ({debian_s / baseline:.2f}x the baseline)")
    print(f"recipe on an OCI base (bash, two layers): {oci_s:.1f} s ({oci_s / baseline:.2f}x the baseline)")


if __name__ == "__main__":
    main()
