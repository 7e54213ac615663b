//! The custom images the tests build: their recipes and inputs are made
//! here, byte for byte the same on every run (so the image key is too, and
//! a nested test host finds the image the host built), under
//! target/test-images/.
//!
//! - `test-data`: the Debian base with `jq` and a wheel built here
//!   (`airlock_demo`, pre-imported by the warm Python).
//! - `test-oci`: an OCI archive made here from this machine's bash and its
//!   libraries, in two layers: the second overrides a file of the first,
//!   deletes one through a whiteout and makes a directory opaque.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

pub const DATA: &str = "test-data";
pub const OCI: &str = "test-oci";

pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-images")
}

/// Writes `bytes` to `path` unless it already holds them (a rewrite would
/// not change the key, but keeps mtimes still for anyone watching).
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::create_dir_all(path.parent().expect("a parent")).expect("create the fixture dir");
    std::fs::write(path, bytes).expect("write a fixture file");
}

/// The `test-data` recipe (and its wheel), returning the recipe's path.
pub fn data_recipe() -> PathBuf {
    let dir = dir().join("data");
    write_if_changed(
        &dir.join("wheels/airlock_demo-1.0-py3-none-any.whl"),
        &demo_wheel(),
    );
    write_if_changed(&dir.join("motd.txt"), b"copied in by the recipe\n");
    let recipe = dir.join("recipe.toml");
    write_if_changed(
        &recipe,
        br#"name = "test-data"
base = "debian"
[packages]
apt = ["jq"]
pip_wheels = "wheels"
[[files]]
from = "motd.txt"
to = "/etc/airlock-test/motd.txt"
mode = "0644"
[build]
run = ["python3 -c 'import airlock_demo' && echo built > /etc/airlock-test/build-ran"]
[env]
DEMO_GREETING = "hello from the recipe"
[warm]
interpreters = ["python", "bash"]
python_imports = ["airlock_demo"]
"#,
    );
    recipe
}

/// A minimal pure-Python wheel, zipped by Python's zipfile with a fixed
/// date so that its bytes never change.
fn demo_wheel() -> Vec<u8> {
    const SCRIPT: &str = r#"
import base64, hashlib, io, sys, zipfile
files = {
    "airlock_demo/__init__.py": "GREETING = 'hello from a local wheel'\n",
    "airlock_demo-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: airlock-demo\nVersion: 1.0\n",
    "airlock_demo-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: airlock-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
for name, text in files.items():
    data = text.encode()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(data)}")
record.append("airlock_demo-1.0.dist-info/RECORD,,")
files["airlock_demo-1.0.dist-info/RECORD"] = "\n".join(record) + "\n"
out = io.BytesIO()
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for name, text in files.items():
        info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        z.writestr(info, text)
sys.stdout.buffer.write(out.getvalue())
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The `test-oci` recipe and its archive, returning the recipe's path.
pub fn oci_recipe() -> PathBuf {
    let dir = dir().join("oci");
    write_if_changed(&dir.join("bash-layers.tar"), &oci_archive(&bash_layers()));
    let recipe = dir.join("recipe.toml");
    write_if_changed(
        &recipe,
        br#"name = "test-oci"
base = "oci-archive:bash-layers.tar"
[build]
run = ["echo built > /etc/build-ran"]
[env]
DEMO_GREETING = "hello from an OCI base"
"#,
    );
    recipe
}

/// A recipe file with `text` in a directory of its own (for the bad-input
/// tests), beside the OCI archive.
pub fn scratch_recipe(name: &str, text: &str) -> PathBuf {
    oci_recipe();
    let path = dir().join("oci").join(format!("{name}.toml"));
    write_if_changed(&path, text.as_bytes());
    path
}

/// A file in a layer: its path, mode and content.
pub type Entry = (String, u32, Vec<u8>);

/// Layer 1: bash, its libraries, `sh`, and the files layer 2 changes.
/// Layer 2: overrides /etc/layered, deletes /etc/deleted, makes /opq opaque.
fn bash_layers() -> Vec<Vec<Entry>> {
    let mut base: Vec<Entry> = Vec::new();
    for (path, guest) in [
        ("/usr/bin/bash", "usr/bin/bash"),
        (
            "/lib/x86_64-linux-gnu/libtinfo.so.6",
            "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
        ),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/x86_64-linux-gnu/libc.so.6",
        ),
        (
            "/lib64/ld-linux-x86-64.so.2",
            "usr/lib64/ld-linux-x86-64.so.2",
        ),
    ] {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        base.push((guest.into(), 0o755, bytes));
    }
    base.push(("etc/layered".into(), 0o644, b"from layer 1\n".to_vec()));
    base.push(("etc/deleted".into(), 0o644, b"must be gone\n".to_vec()));
    base.push(("opq/lower".into(), 0o644, b"hidden by opaque\n".to_vec()));
    let top: Vec<Entry> = vec![
        ("etc/layered".into(), 0o644, b"from layer 2\n".to_vec()),
        ("etc/.wh.deleted".into(), 0o644, Vec::new()),
        ("opq/.wh..wh..opq".into(), 0o644, Vec::new()),
        ("opq/upper".into(), 0o644, b"kept\n".to_vec()),
    ];
    vec![base, top]
}

/// A layer's tar: directories first, with links for a merged /usr.
pub fn layer_tar(entries: &[Entry], links: &[(&str, &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in entries.iter().filter(|(p, _, _)| !p.contains("..")) {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            dirs.insert(p.to_path_buf());
            parent = p.parent();
        }
    }
    for dir in &dirs {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_mtime(0);
        header.set_size(0);
        builder
            .append_data(&mut header, format!("{}/", dir.display()), std::io::empty())
            .expect("a directory entry");
    }
    for (name, target) in links {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        header.set_mtime(0);
        header.set_size(0);
        builder
            .append_link(&mut header, name, target)
            .expect("a link entry");
    }
    for (path, mode, bytes) in entries {
        let mut header = tar::Header::new_ustar();
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        if path.contains("..") {
            // The tar crate refuses to write such a name: a hostile
            // archive's is written by hand.
            let name = &mut header.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder
                .append(&header, bytes.as_slice())
                .expect("a file entry");
        } else {
            builder
                .append_data(&mut header, path, bytes.as_slice())
                .expect("a file entry");
        }
    }
    builder.into_inner().expect("a layer")
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// An OCI archive (a tar of an OCI image layout) of gzipped layers.
pub fn oci_archive(layers: &[Vec<Entry>]) -> Vec<u8> {
    let mut tars = Vec::new();
    for (i, entries) in layers.iter().enumerate() {
        let links: &[(&str, &str)] = if i == 0 {
            &[
                ("bin", "usr/bin"),
                ("lib", "usr/lib"),
                ("lib64", "usr/lib64"),
                ("usr/bin/sh", "bash"),
            ]
        } else {
            &[]
        };
        tars.push(layer_tar(entries, links));
    }
    oci_archive_of_tars(&tars)
}

/// An OCI archive of these layer tars, gzipped.
pub fn oci_archive_of_tars(tars: &[Vec<u8>]) -> Vec<u8> {
    let mut blobs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layers_json = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in tars {
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        diff_ids.push(sha(tar));
        layers_json.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha(&gz),
            "size": gz.len(),
        }));
        blobs.push((sha(&gz), gz));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config json");
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(&config),
            "size": config.len(),
        },
        "layers": layers_json,
    }))
    .expect("manifest json");
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    }))
    .expect("index json");
    blobs.push((sha(&config), config));
    blobs.push((sha(&manifest), manifest));
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_ustar();
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_size(bytes.len() as u64);
        builder
            .append_data(&mut header, name, bytes)
            .expect("an archive entry");
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (digest, bytes) in &blobs {
        let hex = digest.trim_start_matches("sha256:");
        add(&format!("blobs/sha256/{hex}"), bytes);
    }
    builder.into_inner().expect("an archive")
}

/// `airlock image build --recipe PATH`, with its output.
pub fn build(recipe: &Path) -> Output {
    let mut cmd = super::airlock();
    cmd.args(["image", "build", "--recipe"])
        .arg(recipe)
        .stdin(Stdio::null());
    let out = super::run(cmd);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Builds (or finds cached) both test images.
pub fn ensure_built() {
    for recipe in [data_recipe(), oci_recipe()] {
        let out = build(&recipe);
        assert!(
            out.status.success(),
            "building {} failed:\n{}",
            recipe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
