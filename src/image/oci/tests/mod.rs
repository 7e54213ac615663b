//! Images built in the test from small tars; no network.

use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::{Value, json};

use super::*;

mod layers;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A tar entry, its names written raw so that hostile ones (`..`, `/`) can
/// be made: the tar crate's setters refuse them.
struct Ent {
    name: String,
    ty: tar::EntryType,
    link: Option<String>,
    data: Vec<u8>,
    mode: u32,
    owner: (u64, u64),
}

fn ent(name: &str, ty: tar::EntryType, link: Option<&str>, data: &[u8], mode: u32) -> Ent {
    Ent {
        name: name.into(),
        ty,
        link: link.map(Into::into),
        data: data.into(),
        mode,
        owner: (0, 0),
    }
}

fn file(name: &str, data: &str) -> Ent {
    ent(name, tar::EntryType::Regular, None, data.as_bytes(), 0o644)
}

fn dir(name: &str) -> Ent {
    ent(name, tar::EntryType::Directory, None, b"", 0o755)
}

fn sym(name: &str, target: &str) -> Ent {
    ent(name, tar::EntryType::Symlink, Some(target), b"", 0o777)
}

fn hard(name: &str, target: &str) -> Ent {
    ent(name, tar::EntryType::Link, Some(target), b"", 0o644)
}

/// A pax extended header for the entry after it.
fn pax(records: &[(&str, &[u8])]) -> Ent {
    let mut data = Vec::new();
    for (key, value) in records {
        let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
        // The length counts its own digits.
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.extend_from_slice(&body);
    }
    ent("PaxHeader", tar::EntryType::XHeader, None, &data, 0o644)
}

fn tar_of(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(e.ty);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.owner.0);
        h.set_gid(e.owner.1);
        h.set_mtime(1_700_000_000);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        if let Some(l) = &e.link {
            gnu.linkname = [0; 100];
            gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, &e.data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// The files of an OCI layout, built up blob by blob.
#[derive(Default)]
struct Layout {
    files: Vec<(String, Vec<u8>)>,
}

impl Layout {
    fn add(&mut self, bytes: Vec<u8>, media: &str) -> Value {
        let (hex, _) = blob::sha256_hex(&bytes[..]).unwrap();
        let d = json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()});
        self.files.push((format!("blobs/sha256/{hex}"), bytes));
        d
    }

    /// A manifest with its config and layers; returns its descriptor.
    fn image(&mut self, arch: &str, layers: Vec<(Vec<u8>, &str)>) -> Value {
        let config = json!({
            "architecture": arch, "os": "linux",
            "config": {"Env": ["PATH=/usr/bin", format!("ARCH={arch}")]},
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        let config = self.add(serde_json::to_vec(&config).unwrap(), CONFIG);
        let layers: Vec<Value> = layers.into_iter().map(|(b, m)| self.add(b, m)).collect();
        let manifest =
            json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers});
        self.add(serde_json::to_vec(&manifest).unwrap(), MANIFEST)
    }

    fn finish(mut self, manifests: Vec<Value>) -> Vec<(String, Vec<u8>)> {
        self.files.push((
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ));
        let index = json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests});
        self.files
            .push(("index.json".into(), serde_json::to_vec(&index).unwrap()));
        self.files
    }
}

fn platform(mut d: Value, arch: &str) -> Value {
    d["platform"] = json!({"architecture": arch, "os": "linux"});
    d
}

fn write_dir(files: &[(String, Vec<u8>)], dir: &Path) {
    for (name, bytes) in files {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }
}

fn tar_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// A layout directory of one image whose layers are plain tars.
fn layout_of(tmp: &Path, layers: Vec<Vec<u8>>) -> OciSource {
    let mut l = Layout::default();
    let m = l.image("amd64", layers.into_iter().map(|b| (b, TAR)).collect());
    let dir = tmp.join("layout");
    write_dir(&l.finish(vec![m]), &dir);
    OciSource::Layout(dir)
}

fn run(source: &OciSource, tree: &Path) -> Result<Unpacked, OciError> {
    unpack(source, tree, &Limits::default(), &mut |_| {})
}

fn read(path: impl AsRef<Path>) -> String {
    fs::read_to_string(path).unwrap()
}

fn exists(path: impl AsRef<Path>) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).unwrap().next().is_none()
}

#[test]
fn parses_specs() {
    let base = Path::new("/recipes");
    assert_eq!(
        OciSource::parse("oci-archive:img.tar", base).unwrap(),
        OciSource::Archive("/recipes/img.tar".into())
    );
    assert_eq!(
        OciSource::parse("docker-archive:/abs/x.tar", base).unwrap(),
        OciSource::Archive("/abs/x.tar".into())
    );
    assert_eq!(
        OciSource::parse("oci-layout:./dir", base).unwrap(),
        OciSource::Layout("/recipes/./dir".into())
    );
    for bad in ["oci-archive:", "docker:x", "nothing"] {
        let e = OciSource::parse(bad, base).unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
    }
}

#[test]
fn unpacks_a_layout_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let source = layout_of(
        tmp.path(),
        vec![
            tar_of(&[
                dir("etc/"),
                file("etc/hostname", "box\n"),
                sym("etc/link", "hostname"),
            ]),
            tar_of(&[
                dir("./usr/bin/"),
                file("usr/bin/tool", "#!/bin/sh\n"),
                hard("usr/bin/tool2", "usr/bin/tool"),
            ]),
        ],
    );
    let u = run(&source, &tree).unwrap();
    assert!(u.manifest_digest.starts_with("sha256:"));
    assert_eq!(u.layers.len(), 2);
    assert_eq!(
        u.env,
        vec!["PATH=/usr/bin".to_string(), "ARCH=amd64".into()]
    );
    assert_eq!(u.files, 6);
    assert_eq!(u.bytes, 4 + 10);
    assert_eq!(read(tree.join("etc/hostname")), "box\n");
    assert_eq!(
        fs::read_link(tree.join("etc/link")).unwrap(),
        Path::new("hostname")
    );
    let a = fs::metadata(tree.join("usr/bin/tool")).unwrap();
    let b = fs::metadata(tree.join("usr/bin/tool2")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.mtime(), 1_700_000_000);
    assert_eq!(
        fs::metadata(tree.join("etc")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let layer = tar_of(&[file("a", "good")]);
    let source = layout_of(tmp.path(), vec![layer.clone()]);
    let (hex, _) = blob::sha256_hex(&layer[..]).unwrap();
    let path = tmp.path().join("layout/blobs/sha256").join(&hex);
    let mut bad = layer.clone();
    let at = bad.windows(4).position(|w| w == b"good").unwrap();
    bad[at..at + 4].copy_from_slice(b"evil");
    fs::write(&path, &bad).unwrap();
    let e = run(&source, &tree).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, OciError::Blob { .. }), "{msg}");
    assert!(msg.contains(&hex) && msg.contains("hashes to"), "{msg}");
    assert!(
        !exists(tree.join("a")),
        "a layer was used before it was verified"
    );

    // A size that differs from the descriptor's.
    fs::write(&path, [&layer[..], b"x"].concat()).unwrap();
    let msg = run(&source, &tree).unwrap_err().to_string();
    assert!(msg.contains(&hex) && msg.contains("bytes"), "{msg}");
}

#[test]
fn legacy_docker_save() {
    let layer1 = tar_of(&[dir("etc/"), file("etc/os", "legacy")]);
    let layer2 = tar_of(&[file("etc/.wh.os", ""), file("etc/new", "new")]);
    let diff = |b: &[u8]| format!("sha256:{}", blob::sha256_hex(b).unwrap().0);
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["LEGACY=1"]},
        "rootfs": {"type": "layers", "diff_ids": [diff(&layer1), diff(&layer2), diff(&layer1)]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let (config_hex, _) = blob::sha256_hex(&config[..]).unwrap();
    let manifest = json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": ["x:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]);
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        (
            "manifest.json".to_string(),
            serde_json::to_vec(&manifest).unwrap(),
        ),
        (format!("{config_hex}.json"), config),
        ("aaa/layer.tar".into(), layer1.clone()),
        // Compressed: found by its magic, checked against the diff ID of its tar.
        ("bbb/layer.tar".into(), gzip(&layer2)),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    // Docker links a layer repeated in the image.
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "ccc/layer.tar", "../aaa/layer.tar")
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("save.tar");
    fs::write(&archive, b.into_inner().unwrap()).unwrap();
    let tree = tmp.path().join("tree");
    let u = run(
        &OciSource::parse("docker-archive:save.tar", tmp.path()).unwrap(),
        &tree,
    )
    .unwrap();
    assert_eq!(u.manifest_digest, format!("sha256:{config_hex}"));
    assert_eq!(u.layers, vec![diff(&layer1), diff(&layer2), diff(&layer1)]);
    assert_eq!(u.env, vec!["LEGACY=1".to_string()]);
    assert_eq!(read(tree.join("etc/os")), "legacy");
    assert_eq!(read(tree.join("etc/new")), "new");
}

#[test]
fn gzipped_oci_archive_with_compressed_layers() {
    let mut l = Layout::default();
    let m = l.image(
        "amd64",
        vec![
            (gzip(&tar_of(&[file("gz", "gzip layer")])), TAR_GZ),
            (
                zstd::encode_all(&tar_of(&[file("zst", "zstd layer")])[..], 3).unwrap(),
                TAR_ZST,
            ),
        ],
    );
    let files = l.finish(vec![m]);
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("img.tar.gz"), gzip(&tar_files(&files))).unwrap();
    let tree = tmp.path().join("tree");
    let mut notes = Vec::new();
    let u = unpack(
        &OciSource::parse("oci-archive:img.tar.gz", tmp.path()).unwrap(),
        &tree,
        &Limits::default(),
        &mut |s| notes.push(s.to_owned()),
    )
    .unwrap();
    assert_eq!(u.layers.len(), 2);
    assert_eq!(read(tree.join("gz")), "gzip layer");
    assert_eq!(read(tree.join("zst")), "zstd layer");
    assert!(
        notes.iter().any(|n| n.contains("decompressing")),
        "{notes:?}"
    );
}

#[test]
fn an_index_with_two_platforms_gives_amd64() {
    let mut l = Layout::default();
    let arm = l.image("arm64", vec![(tar_of(&[file("arch", "arm64")]), TAR)]);
    let amd = l.image("amd64", vec![(tar_of(&[file("arch", "amd64")]), TAR)]);
    // Nested, as Docker 25+ and buildx write it: index.json -> index -> manifests.
    let nested = json!({"schemaVersion": 2, "mediaType": INDEX,
        "manifests": [platform(arm, "arm64"), platform(amd.clone(), "amd64")]});
    let nested = l.add(serde_json::to_vec(&nested).unwrap(), INDEX);
    let files = l.finish(vec![nested]);
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("img.tar"), tar_files(&files)).unwrap();
    let tree = tmp.path().join("tree");
    let u = run(&OciSource::Archive(tmp.path().join("img.tar")), &tree).unwrap();
    assert_eq!(read(tree.join("arch")), "amd64");
    assert_eq!(Value::String(u.manifest_digest), amd["digest"]);
    assert!(u.env.contains(&"ARCH=amd64".to_string()));

    // Only arm64: a clear refusal that names what there is.
    let mut l = Layout::default();
    let arm = l.image("arm64", vec![(tar_of(&[file("arch", "arm64")]), TAR)]);
    let dir = tmp.path().join("arm");
    write_dir(&l.finish(vec![platform(arm, "arm64")]), &dir);
    let e = run(&OciSource::Layout(dir), &tmp.path().join("tree2"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no linux/amd64") && e.contains("linux/arm64"),
        "{e}"
    );
}

#[test]
fn malformed_json_and_garbage_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let dir = tmp.path().join("bad");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("index.json"), "{not json").unwrap();
    let e = run(&OciSource::Layout(dir.clone()), &tree)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("index.json") && e.contains("invalid JSON"),
        "{e}"
    );

    fs::write(
        dir.join("index.json"),
        r#"{"schemaVersion": 2, "manifests": [{"mediaType": "x"}]}"#,
    )
    .unwrap();
    let e = run(&OciSource::Layout(dir.clone()), &tree)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("index.json") && e.contains("invalid JSON"),
        "{e}"
    );

    let garbage = tmp.path().join("garbage.tar");
    fs::write(&garbage, vec![0xab; 4096]).unwrap();
    let e = run(&OciSource::Archive(garbage.clone()), &tree)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.tar") && e.contains("not a valid tar"),
        "{e}"
    );

    fs::write(&garbage, gzip(&[0; 1024])).unwrap();
    let e = run(&OciSource::Archive(garbage), &tree)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.tar") && e.contains("neither index.json"),
        "{e}"
    );

    let e = run(&OciSource::Archive(tmp.path().join("missing.tar")), &tree).unwrap_err();
    assert!(e.to_string().contains("missing.tar"), "{e}");

    // A layer that is not a tar.
    let source = layout_of(&tmp.path().join("l"), vec![vec![0x55; 1024]]);
    let e = run(&source, &tree).unwrap_err().to_string();
    assert!(
        e.contains("layer 1 (sha256:") && e.contains("not a valid tar"),
        "{e}"
    );
}

#[test]
fn unknown_layer_media_type_is_refused() {
    let mut l = Layout::default();
    let m = l.image(
        "amd64",
        vec![(b"x".to_vec(), "application/vnd.example.squashfs")],
    );
    let tmp = tempfile::tempdir().unwrap();
    write_dir(&l.finish(vec![m]), &tmp.path().join("d"));
    let e = run(
        &OciSource::Layout(tmp.path().join("d")),
        &tmp.path().join("t"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("layer 1") && e.contains("application/vnd.example.squashfs"),
        "{e}"
    );
}
