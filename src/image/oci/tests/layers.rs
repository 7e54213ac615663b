//! Applying layers: whiteouts, overrides, metadata, and hostile entries.

use super::*;

#[test]
fn whiteout_deletes_a_lower_file() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let source = layout_of(
        tmp.path(),
        vec![
            tar_of(&[
                dir("etc/"),
                file("etc/a", "a"),
                file("etc/b", "b"),
                dir("etc/d/"),
                file("etc/d/x", "x"),
            ]),
            tar_of(&[
                file("etc/.wh.a", ""),
                file("etc/.wh.d", ""),
                file("gone/.wh.nothing", ""),
            ]),
        ],
    );
    run(&source, &tree).unwrap();
    assert!(!exists(tree.join("etc/a")));
    assert!(!exists(tree.join("etc/d")));
    assert!(!exists(tree.join("gone")));
    assert_eq!(read(tree.join("etc/b")), "b");
    assert!(!exists(tree.join("etc/.wh.a")));
}

#[test]
fn opaque_directory_drops_lower_content_in_either_order() {
    let lower = tar_of(&[
        dir("d/"),
        file("d/old", "old"),
        dir("d/sub/"),
        file("d/sub/lower", "lower"),
        file("keep", "keep"),
    ]);
    // The marker after this layer's entries, then before them.
    let after = tar_of(&[
        dir("d/"),
        file("d/new", "new"),
        file("d/sub/upper", "u"),
        file("d/.wh..wh..opq", ""),
    ]);
    let before = tar_of(&[
        file("d/.wh..wh..opq", ""),
        file("d/new", "new"),
        file("d/sub/upper", "u"),
    ]);
    for upper in [after, before] {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        run(&layout_of(tmp.path(), vec![lower.clone(), upper]), &tree).unwrap();
        assert!(!exists(tree.join("d/old")));
        assert!(!exists(tree.join("d/sub/lower")));
        assert!(!exists(tree.join("d/.wh..wh..opq")));
        assert_eq!(read(tree.join("d/new")), "new");
        assert_eq!(read(tree.join("d/sub/upper")), "u");
        assert_eq!(read(tree.join("keep")), "keep");
    }
}

#[test]
fn later_layers_override_files_and_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let source = layout_of(
        tmp.path(),
        vec![
            tar_of(&[
                file("a", "one"),
                dir("x/"),
                file("x/f", "f"),
                file("y", "y"),
                sym("z", "a"),
            ]),
            tar_of(&[
                file("a", "two"),
                file("x", "now a file"),
                dir("y/"),
                file("y/in", "in"),
                file("z", "real"),
            ]),
        ],
    );
    run(&source, &tree).unwrap();
    assert_eq!(read(tree.join("a")), "two");
    assert_eq!(read(tree.join("x")), "now a file");
    assert_eq!(read(tree.join("y/in")), "in");
    assert!(fs::symlink_metadata(tree.join("z")).unwrap().is_file());
    assert_eq!(
        read(tree.join("a")),
        "two",
        "writing z must not follow the old z -> a"
    );
}

#[test]
fn dotdot_and_absolute_entries_are_refused() {
    for (name, why) in [
        ("../sibling/pwned", "leaves the root"),
        ("ok/../../sibling/pwned", "leaves the root"),
        ("/sibling/pwned", "absolute"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let sibling = tmp.path().join("sibling");
        fs::create_dir(&sibling).unwrap();
        let tree = tmp.path().join("tree");
        let source = layout_of(
            tmp.path(),
            vec![tar_of(&[file("fine", "x")]), tar_of(&[file(name, "evil")])],
        );
        let e = run(&source, &tree).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, OciError::Entry { index: 2, .. }), "{msg}");
        assert!(
            msg.contains(why) && msg.contains(name) && msg.contains("layer 2 (sha256:"),
            "{msg}"
        );
        assert!(is_empty_dir(&sibling));
    }
}

#[test]
fn symlinks_never_lead_writes_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside-dir");
    fs::create_dir(&outside).unwrap();
    let tree = tmp.path().join("tree");
    let abs = outside.to_str().unwrap();
    let source = layout_of(
        tmp.path(),
        vec![
            tar_of(&[
                sym("evil", abs),
                sym("rel", "../../outside-dir"),
                dir("a/"),
                sym("a/up", "../../../outside-dir/x"),
                sym("loop", "loop"),
            ]),
            tar_of(&[
                file("evil/pwned", "1"),
                file("rel/pwned", "2"),
                file("a/up/pwned", "3"),
                // In the same layer: a symlink, then a write through it.
                sym("late", "/"),
                file("late/outside-dir/pwned4", "4"),
            ]),
        ],
    );
    run(&source, &tree).unwrap();
    assert!(
        is_empty_dir(&outside),
        "something was written outside the tree"
    );
    // As a chroot would see it: the writes land inside.
    assert_eq!(
        read(tree.join(abs.trim_start_matches('/')).join("pwned")),
        "1"
    );
    assert_eq!(read(tree.join("outside-dir/pwned")), "2");
    assert_eq!(read(tree.join("outside-dir/x/pwned")), "3");
    assert_eq!(read(tree.join("outside-dir/pwned4")), "4");

    let tree2 = tmp.path().join("tree2");
    let source = layout_of(
        &tmp.path().join("l2"),
        vec![tar_of(&[sym("loop", "loop"), file("loop/x", "")])],
    );
    let e = run(&source, &tree2).unwrap_err().to_string();
    assert!(e.contains("too many levels of symlinks"), "{e}");
    assert!(is_empty_dir(&outside));
}

#[test]
fn hard_links_out_of_the_tree_are_refused() {
    for (target, why) in [
        ("../../etc/passwd", "leaves the root"),
        ("/etc/passwd", "absolute"),
        ("host/passwd", "does not exist in the tree"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        let source = layout_of(
            tmp.path(),
            vec![tar_of(&[sym("host", "/etc"), hard("h", target)])],
        );
        let e = run(&source, &tree).unwrap_err().to_string();
        assert!(e.contains(why) && e.contains("entry h:"), "{e}");
        assert!(!exists(tree.join("h")));
    }
}

#[test]
fn setuid_sticky_and_owners_are_kept() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: ownership and setuid are not checked");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let mut su = ent("bin/su", tar::EntryType::Regular, None, b"elf", 0o4755);
    su.owner = (0, 0);
    let mut tmpdir = ent("tmp/", tar::EntryType::Directory, None, b"", 0o1777);
    tmpdir.owner = (0, 0);
    let mut owned = ent("home/u/f", tar::EntryType::Regular, None, b"f", 0o2640);
    owned.owner = (1000, 1001);
    let fifo = ent("run/fifo", tar::EntryType::Fifo, None, b"", 0o600);
    let dev = ent("dev/null", tar::EntryType::Char, None, b"", 0o666);
    let source = layout_of(tmp.path(), vec![tar_of(&[su, tmpdir, owned, fifo, dev])]);
    run(&source, &tree).unwrap();
    assert_eq!(
        fs::metadata(tree.join("bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(tree.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    let m = fs::metadata(tree.join("home/u/f")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o2640));
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(tree.join("run/fifo")).unwrap().file_type()
    ));
    assert!(!exists(tree.join("dev/null")), "device nodes are skipped");
    assert_eq!(
        fs::metadata(tree.join("home"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
}

#[test]
fn limits_bound_entries_bytes_and_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let source = layout_of(
        tmp.path(),
        vec![
            tar_of(&[file("a", "0123456789"), file("b", "0123456789")]),
            tar_of(&[file("c", "")]),
        ],
    );
    let go = |limits: Limits, tree: &str| {
        unpack(&source, &tmp.path().join(tree), &limits, &mut |_| {})
            .unwrap_err()
            .to_string()
    };
    let e = go(
        Limits {
            max_total_bytes: 15,
            ..Limits::default()
        },
        "t1",
    );
    assert!(
        e.contains("entry b") && e.contains("more than 15 bytes"),
        "{e}"
    );
    let e = go(
        Limits {
            max_entries: 2,
            ..Limits::default()
        },
        "t2",
    );
    assert!(
        e.contains("layer 2") && e.contains("more than 2 entries"),
        "{e}"
    );
    let e = go(
        Limits {
            max_layers: 1,
            ..Limits::default()
        },
        "t3",
    );
    assert!(e.contains("2 layers, more than the limit of 1"), "{e}");
}

#[test]
fn non_utf8_names_and_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(150));
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, &long, &b"l"[..]).unwrap();
    let mut layer = b.into_inner().unwrap();
    // Appended raw: a Latin-1 name.
    layer.truncate(layer.len() - 1024);
    let mut raw = tar_of(&[file("caf\u{e9}", "x")]);
    let at = raw
        .windows(5)
        .position(|w| w == "caf\u{e9}".as_bytes())
        .unwrap();
    raw[at..at + 5].copy_from_slice(b"caf\xe9\0");
    let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
    h.set_cksum();
    raw[..512].copy_from_slice(h.as_bytes());
    layer.extend_from_slice(&raw);
    let source = layout_of(tmp.path(), vec![layer]);
    run(&source, &tree).unwrap();
    assert_eq!(read(tree.join(&long)), "l");
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9");
    assert_eq!(read(tree.join(name)), "x");
}

#[test]
fn pax_owners_and_file_capabilities() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: ownership and capabilities are not checked");
        return;
    }
    // cap_net_raw+ep, as ping carries it (vfs_cap_data revision 2).
    let mut cap = vec![0x01, 0x00, 0x00, 0x02, 0x00, 0x20, 0, 0];
    cap.resize(20, 0);
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    let big = 3_000_000u64.to_string();
    let source = layout_of(
        tmp.path(),
        vec![tar_of(&[
            pax(&[
                ("uid", big.as_bytes()),
                ("SCHILY.xattr.security.capability", &cap),
            ]),
            file("bin/ping", "elf"),
            pax(&[("path", "a/pax-named".as_bytes())]),
            file("short", "p"),
        ])],
    );
    run(&source, &tree).unwrap();
    let ping = tree.join("bin/ping");
    assert_eq!(fs::metadata(&ping).unwrap().uid(), 3_000_000);
    assert_eq!(read(tree.join("a/pax-named")), "p");
    assert!(!exists(tree.join("short")));
    let c = std::ffi::CString::new(ping.as_os_str().as_bytes()).unwrap();
    let mut got = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"security.capability".as_ptr(),
            got.as_mut_ptr().cast(),
            got.len(),
        )
    };
    assert_eq!(n, 20, "{}", std::io::Error::last_os_error());
    assert_eq!(&got[..20], &cap[..]);
}
