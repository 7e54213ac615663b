//! Custom images built from recipes, on this machine (the build runs apt,
//! pip and chroot as root; no VM). What the built images do in a VM is
//! tested in tests/mcp.rs (`http_custom_images_side_by_side`).

mod common;

use std::path::{Path, PathBuf};

use common::test_images;

fn cache() -> PathBuf {
    common::image_dir()
        .parent()
        .and_then(Path::parent)
        .expect("the cache root")
        .to_path_buf()
}

fn manifest_of(name: &str) -> serde_json::Value {
    let mut cmd = common::airlock();
    cmd.args(["image", "show", name]);
    let out = common::run(cmd);
    assert!(
        out.status.success(),
        "image show {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the manifest is JSON")
}

fn names(packages: &serde_json::Value) -> Vec<String> {
    packages
        .as_array()
        .expect("a package list")
        .iter()
        .map(|p| p["name"].as_str().expect("a name").to_string())
        .collect()
}

/// The image directory a successful build printed.
fn built_dir(out: &std::process::Output) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A file's content in an image's root filesystem.
fn image_file(dir: &Path, guest_path: &str) -> String {
    common::debugfs(&dir.join("rootfs.ext4"), &format!("cat {guest_path}"))
}

#[test]
fn a_recipe_with_a_debian_package_and_a_local_wheel_builds_and_lists_its_packages() {
    let recipe = test_images::data_recipe();
    let first = test_images::build(&recipe);
    assert!(first.status.success(), "the build failed");
    let manifest = manifest_of(test_images::DATA);
    let custom = &manifest["custom"];
    assert_eq!(custom["name"], test_images::DATA);
    assert_eq!(custom["base"]["source"], "debian");
    assert!(names(&manifest["rootfs"]["packages"]).contains(&"jq".to_string()));
    assert!(
        names(&custom["pip"]).contains(&"airlock-demo".to_string()),
        "{}",
        custom["pip"]
    );
    let guest = &custom["guest"];
    assert_eq!(guest["python_imports"], serde_json::json!(["airlock_demo"]));
    assert_eq!(guest["warm"], serde_json::json!(["python", "bash"]));
    assert_eq!(guest["env"]["DEMO_GREETING"], "hello from the recipe");
    assert_eq!(
        image_file(&built_dir(&first), "/etc/airlock-test/motd.txt"),
        "copied in by the recipe\n"
    );
    assert_eq!(
        image_file(&built_dir(&first), "/etc/airlock-test/build-ran"),
        "built\n"
    );

    // The same recipe again: the cached image, at once.
    let again = test_images::build(&recipe);
    assert!(again.status.success());
    assert_eq!(again.stdout, first.stdout, "the same image directory");
    assert!(String::from_utf8_lossy(&again.stderr).contains("is up to date"));

    let mut list = common::airlock();
    list.args(["image", "list"]);
    let listed = String::from_utf8(common::run(list).stdout).expect("utf-8");
    assert!(
        listed.lines().any(|l| l.starts_with(test_images::DATA)),
        "{listed}"
    );
}

#[test]
fn an_oci_base_has_its_layers_applied_with_whiteouts_and_overrides() {
    let out = test_images::build(&test_images::oci_recipe());
    assert!(out.status.success(), "the build failed");
    let dir = built_dir(&out);
    let ext4 = dir.join("rootfs.ext4");
    assert_eq!(
        image_file(&dir, "/etc/layered"),
        "from layer 2\n",
        "a later layer's file wins"
    );
    let gone = std::process::Command::new("debugfs")
        .args(["-R", "stat /etc/deleted"])
        .arg(&ext4)
        .output()
        .expect("debugfs runs");
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("not found"),
        "the whiteout deleted /etc/deleted"
    );
    let opaque = common::debugfs(&ext4, "ls -l /opq");
    assert!(
        opaque.contains("upper") && !opaque.contains("lower"),
        "{opaque}"
    );
    assert_eq!(image_file(&dir, "/etc/build-ran"), "built\n");
    let passwd = image_file(&dir, "/etc/passwd");
    assert!(passwd.contains("sandbox:x:1000:1000"), "{passwd}");

    let manifest = manifest_of(test_images::OCI);
    let base = &manifest["custom"]["base"];
    assert!(
        base["oci_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{base}"
    );
    assert_eq!(base["oci_layers"].as_array().map(Vec::len), Some(2));
    let guest = &manifest["custom"]["guest"];
    assert_eq!(guest["python"], serde_json::Value::Null, "no Python in it");
    assert_eq!(guest["bash"], "/bin/bash");
    assert_eq!(guest["warm"], serde_json::json!(["bash"]));
}

/// A build that must fail: its error names `wanted` and the image is not
/// in the cache afterwards, nor any scratch space.
fn fails_cleanly(name: &str, recipe_text: &str, wanted: &[&str]) {
    let recipe = test_images::scratch_recipe(name, recipe_text);
    let out = test_images::build(&recipe);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{name}: the build succeeded");
    for fragment in wanted {
        assert!(
            stderr.contains(fragment),
            "{name}: no {fragment:?} in:\n{stderr}"
        );
    }
    if let Some(log) = stderr.split("Full log: ").nth(1) {
        let log = log.lines().next().unwrap_or_default().trim();
        assert!(
            Path::new(log).is_file(),
            "{name}: the log it names, {log}, is kept"
        );
    }
    let mut show = common::airlock();
    show.args(["image", "show", name]);
    assert!(
        !common::run(show).status.success(),
        "{name}: an image was left behind"
    );
    let tmp = cache().join("tmp");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("custom-{name}-")))
        .collect();
    assert!(leftovers.is_empty(), "{name}: scratch left: {leftovers:?}");
}

#[test]
fn bad_inputs_give_one_clear_error_each_and_leave_no_image() {
    fails_cleanly(
        "bad-apt",
        "name = \"bad-apt\"\n[packages]\napt = [\"airlock-no-such-package\"]\n",
        &["step packages.apt failed", "airlock-no-such-package"],
    );
    fails_cleanly(
        "bad-command",
        "name = \"bad-command\"\nbase = \"oci-archive:bash-layers.tar\"\n[build]\nrun = [\"echo about to fail; exit 3\"]\n",
        &["step build.run[0]", "about to fail"],
    );
    let garbage = test_images::dir().join("oci/garbage.tar");
    test_images::write_if_changed(&garbage, b"this is not a tar archive at all");
    fails_cleanly(
        "bad-archive",
        "name = \"bad-archive\"\nbase = \"oci-archive:garbage.tar\"\n",
        &["cannot unpack the OCI base", "garbage.tar"],
    );
    fails_cleanly(
        "bad-recipe",
        "name = \"bad-recipe\"\n[env]\nPATH = \"/evil\"\n",
        &["env.PATH"],
    );

    // A layer that climbs out of the root: refused, and nothing lands
    // beside the build directory.
    let sentinel = cache().join("tmp/escaped-by-a-layer");
    let _ = std::fs::remove_file(&sentinel);
    let evil = test_images::layer_tar(
        &[("../../escaped-by-a-layer".into(), 0o644, b"pwned".to_vec())],
        &[],
    );
    let archive = test_images::oci_archive_of_tars(&[evil]);
    test_images::write_if_changed(&test_images::dir().join("oci/traversal.tar"), &archive);
    fails_cleanly(
        "bad-traversal",
        "name = \"bad-traversal\"\nbase = \"oci-archive:traversal.tar\"\n",
        &["cannot unpack the OCI base", "escaped-by-a-layer"],
    );
    assert!(
        !sentinel.exists(),
        "a layer wrote outside the build directory"
    );
}

#[test]
fn a_rebuilt_recipe_replaces_its_older_build_and_prune_has_nothing_left() {
    let name = "test-prune";
    let recipe_with = |greeting: &str| {
        test_images::scratch_recipe(
            name,
            &format!(
                "name = \"{name}\"\nbase = \"oci-archive:bash-layers.tar\"\n[env]\nGREETING = \"{greeting}\"\n"
            ),
        )
    };
    let first = test_images::build(&recipe_with("one"));
    assert!(first.status.success(), "the first build failed");
    let older = built_dir(&first);
    let second = test_images::build(&recipe_with("two"));
    assert!(second.status.success(), "the second build failed");
    let newer = built_dir(&second);
    assert_ne!(older, newer, "a changed recipe is a new image");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("older build(s) from the cache"),
        "the build says what it pruned:\n{stderr}"
    );
    assert!(!older.exists(), "the older build is gone");
    assert!(newer.join("rootfs.ext4").is_file());

    let mut list = common::airlock();
    list.args(["image", "list"]);
    let listed = String::from_utf8_lossy(&common::run(list).stdout).into_owned();
    let lines: Vec<_> = listed.lines().filter(|l| l.contains(name)).collect();
    assert_eq!(lines.len(), 1, "{listed}");
    assert!(!lines[0].contains("(older)"), "{listed}");

    let mut prune = common::airlock();
    prune.args(["image", "prune"]);
    let pruned = common::run(prune);
    assert!(pruned.status.success());
    let report = String::from_utf8_lossy(&pruned.stdout);
    assert!(report.contains("freed "), "{report}");
    assert!(!report.contains(&newer.display().to_string()), "{report}");
    assert!(newer.exists(), "the current build stays");

    let mut remove = common::airlock();
    remove.args(["image", "remove", name]);
    assert!(common::run(remove).status.success());
}
