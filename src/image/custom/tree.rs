//! Working on an image's root tree from the host: paths resolved as the
//! guest would see them (a symlink in the tree never leads the host out of
//! it), files copied in, and what airlock's init needs in a foreign base.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// Symlinks followed while resolving one path, as the kernel's limit.
const MAX_HOPS: usize = 40;

/// The host path of `guest` (absolute, as seen inside `root`), following
/// the tree's symlinks inside the root only: an absolute link target starts
/// again at `root`, and `..` stops at it, as in a chroot. The last
/// component is followed too when `follow_last` is set. Parts that do not
/// exist yet are appended as they are.
pub fn resolve(root: &Path, guest: &Path, follow_last: bool) -> Result<PathBuf> {
    let mut pending: Vec<OsString> = components(guest)?;
    pending.reverse();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = host_path(root, &resolved).join(&part);
        let is_last = pending.is_empty();
        let link = match std::fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() && (!is_last || follow_last) => {
                std::fs::read_link(&candidate)
                    .with_context(|| format!("cannot read the link {}", candidate.display()))?
            }
            _ => {
                resolved.push(part);
                continue;
            }
        };
        hops += 1;
        if hops > MAX_HOPS {
            bail!("too many symbolic links resolving {}", guest.display());
        }
        if link.is_absolute() {
            resolved.clear();
        }
        let mut rest = components(&link)?;
        rest.reverse();
        pending.extend(rest);
    }
    Ok(host_path(root, &resolved))
}

fn components(path: &Path) -> Result<Vec<OsString>> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::Normal(part) => parts.push(part.to_os_string()),
            Component::Prefix(_) => bail!("{} is not a Unix path", path.display()),
        }
    }
    Ok(parts)
}

fn host_path(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(parts);
    path
}

/// Whether `guest` names a file in the tree that could be executed.
pub fn is_executable(root: &Path, guest: &str) -> bool {
    resolve(root, Path::new(guest), true)
        .ok()
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first of `candidates` that the tree can execute.
pub fn find_program(root: &Path, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|c| is_executable(root, c))
        .map(|c| c.to_string())
}

/// Writes `bytes` as the file `guest` in the tree (root's, `mode`): what is
/// there is removed first, and the new file is created without following a
/// link, so the tree's links never lead the write onto the host.
pub fn write_file(root: &Path, guest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let parent = guest
        .parent()
        .with_context(|| format!("{} has no parent directory", guest.display()))?;
    let name = guest
        .file_name()
        .with_context(|| format!("{} names no file", guest.display()))?;
    let path = make_dirs(root, parent)?.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            bail!("{} is a directory in the image", guest.display())
        }
        Ok(_) => std::fs::remove_file(&path)
            .with_context(|| format!("cannot replace {} in the image", guest.display()))?,
        Err(_) => {}
    }
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&path)
        .with_context(|| format!("cannot create {} in the image", guest.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {} in the image", guest.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", guest.display()))?;
    std::os::unix::fs::fchown(&file, Some(0), Some(0))
        .with_context(|| format!("cannot give {} to root", guest.display()))
}

/// The content of the regular file `guest` in the tree (links followed
/// inside the root only), at most `limit` bytes; none if there is none.
pub fn read_file(root: &Path, guest: &Path, limit: u64) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let path = resolve(root, guest, true)?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => {}
        _ => return Ok(None),
    }
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .with_context(|| format!("cannot read {} in the image", guest.display()))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {} in the image", guest.display()))?;
    if bytes.len() as u64 > limit {
        bail!(
            "{} in the image is larger than {limit} bytes",
            guest.display()
        );
    }
    Ok(Some(bytes))
}

/// Copies `from` (a file or a directory, on the host) to `to` in the tree,
/// creating parent directories (root's, 0755). Symlinks inside a copied
/// directory are copied as links; special files are refused.
pub fn copy_in(root: &Path, from: &Path, to: &Path, mode: Option<u32>) -> Result<()> {
    let meta = std::fs::symlink_metadata(from)
        .with_context(|| format!("cannot read {}", from.display()))?;
    let parent = to
        .parent()
        .with_context(|| format!("{} has no parent directory", to.display()))?;
    let host_parent = make_dirs(root, parent)?;
    let name = to
        .file_name()
        .with_context(|| format!("{} names no file", to.display()))?;
    let dest = host_parent.join(name);
    if meta.is_dir() {
        copy_tree(from, &dest)
    } else if meta.is_file() {
        copy_file(
            from,
            &dest,
            mode.unwrap_or(meta.permissions().mode() & 0o7775),
        )
    } else {
        bail!(
            "{} is neither a file nor a directory; only those are copied",
            from.display()
        )
    }
}

/// Creates `guest_dir` in the tree (resolved in the root) and returns its
/// host path.
pub fn make_dirs(root: &Path, guest_dir: &Path) -> Result<PathBuf> {
    let mut host = root.to_path_buf();
    let mut guest = PathBuf::from("/");
    for part in components(guest_dir)? {
        guest.push(&part);
        host = resolve(root, &guest, true)?;
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "{} exists in the image and is not a directory",
                guest.display()
            ),
            Err(_) => {
                // A link may point to a path several levels deep: its parts
                // were resolved above, so none of them is a link.
                if !host.starts_with(root) {
                    bail!("{} resolves outside the image", guest.display());
                }
                std::fs::create_dir_all(&host)
                    .with_context(|| format!("cannot create {} in the image", guest.display()))?;
                std::fs::set_permissions(&host, std::fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("cannot set the mode of {}", guest.display()))?;
            }
        }
    }
    Ok(host)
}

fn copy_file(from: &Path, dest: &Path, mode: u32) -> Result<()> {
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        bail!("{} is a directory in the image", dest.display());
    }
    // Replace, never write through: the tree's own link at `dest` is dropped.
    let _ = std::fs::remove_file(dest);
    std::fs::copy(from, dest)
        .with_context(|| format!("cannot copy {} into the image", from.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", dest.display()))?;
    std::os::unix::fs::lchown(dest, Some(0), Some(0))
        .with_context(|| format!("cannot give {} to root", dest.display()))
}

fn copy_tree(from: &Path, dest: &Path) -> Result<()> {
    if !std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        let _ = std::fs::remove_file(dest);
        std::fs::create_dir(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    }
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("cannot read {}", from.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", from.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let source = entry.path();
        let target = dest.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&source)
            .with_context(|| format!("cannot read {}", source.display()))?;
        if meta.is_dir() {
            copy_tree(&source, &target)?;
        } else if meta.is_file() {
            copy_file(&source, &target, meta.permissions().mode() & 0o7775)?;
        } else if meta.file_type().is_symlink() {
            let link = std::fs::read_link(&source)
                .with_context(|| format!("cannot read the link {}", source.display()))?;
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(&link, &target)
                .with_context(|| format!("cannot create the link {}", target.display()))?;
        } else {
            bail!(
                "{} is a special file; only files, directories and links are copied",
                source.display()
            );
        }
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("cannot set the mode of {}", dest.display()))
}

/// The sandbox user (uid and gid 1000, home /home/sandbox) and the mount
/// points the agent uses, in a base that did not come from airlock's own
/// Debian build. An existing entry for uid 1000 under another name is
/// refused: code would run as that user.
pub fn add_sandbox_user(root: &Path) -> Result<()> {
    const LIMIT: u64 = 1 << 20;
    let user = super::super::rootfs::SANDBOX_USER;
    let uid = super::super::rootfs::SANDBOX_UID;
    let passwd_path = Path::new("/etc/passwd");
    let group_path = Path::new("/etc/group");
    let text = |path: &Path| -> Result<String> {
        Ok(read_file(root, path, LIMIT)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    };
    let passwd = text(passwd_path)?;
    let mut has_user = false;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 3 && fields[2] == uid.to_string() {
            if fields[0] != user {
                bail!(
                    "the base image already has uid {uid} as {:?}; airlock runs code as uid {uid} \
                     named {user:?}",
                    fields[0]
                );
            }
            has_user = true;
        }
    }
    let appended = |text: &str, line: &str| {
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(line);
        out
    };
    if !has_user {
        let mut new = passwd.clone();
        if !new.lines().any(|l| l.starts_with("root:")) {
            new = appended(&new, "root:x:0:0:root:/root:/bin/sh\n");
        }
        new = appended(
            &new,
            &format!("{user}:x:{uid}:{uid}::/home/{user}:/bin/bash\n"),
        );
        write_file(root, passwd_path, new.as_bytes(), 0o644)?;
        let groups = text(group_path)?;
        if !groups
            .lines()
            .any(|l| l.split(':').nth(2) == Some(&uid.to_string()))
        {
            let new = appended(&groups, &format!("{user}:x:{uid}:\n"));
            write_file(root, group_path, new.as_bytes(), 0o644)?;
        }
    }
    let home = make_dirs(root, &Path::new("/home").join(user))?;
    std::os::unix::fs::lchown(&home, Some(uid), Some(uid))
        .with_context(|| format!("cannot give {} to the sandbox user", home.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("usr/bin/etc-abs")).unwrap();
        std::os::unix::fs::symlink("../../../../..", r.join("usr/bin/up")).unwrap();
        assert_eq!(
            resolve(r, Path::new("/bin/x"), true).unwrap(),
            r.join("usr/bin/x")
        );
        assert_eq!(
            resolve(r, Path::new("/bin/etc-abs/passwd"), true).unwrap(),
            r.join("etc/passwd")
        );
        assert_eq!(
            resolve(r, Path::new("/bin/up/etc"), true).unwrap(),
            r.join("etc")
        );
        assert_eq!(resolve(r, Path::new("/bin"), false).unwrap(), r.join("bin"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(resolve(r, Path::new("/loop/x"), true).is_err());
    }

    #[test]
    fn a_copy_never_writes_through_a_link_out_of_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        std::os::unix::fs::symlink(outside.path(), r.join("escape")).unwrap();
        let source = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(source.path(), b"data").unwrap();
        copy_in(r, source.path(), Path::new("/escape/file"), Some(0o644)).unwrap();
        assert!(!outside.path().join("file").exists());
        assert_eq!(
            std::fs::read(
                r.join(outside.path().strip_prefix("/").unwrap())
                    .join("file")
            )
            .unwrap(),
            b"data"
        );
    }

    #[test]
    fn hostile_links_in_a_base_never_reach_the_host() {
        let root = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        let secret = host.path().join("shadow");
        std::fs::write(&secret, b"root:secret-hash:::\n").unwrap();
        std::os::unix::fs::symlink(&secret, r.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink(host.path().join("group"), r.join("etc/group")).unwrap();
        add_sandbox_user(r).unwrap();
        let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
        assert!(
            !passwd.contains("secret-hash"),
            "the host file was read: {passwd}"
        );
        assert!(passwd.contains("sandbox:x:1000:1000"));
        assert_eq!(std::fs::read(&secret).unwrap(), b"root:secret-hash:::\n");
        assert!(
            !host.path().join("group").exists(),
            "a host file was written"
        );

        std::os::unix::fs::symlink(host.path().join("hostname"), r.join("etc/hostname")).unwrap();
        write_file(r, Path::new("/etc/hostname"), b"airlock\n", 0o644).unwrap();
        assert!(!host.path().join("hostname").exists());
        assert!(
            !std::fs::symlink_metadata(r.join("etc/hostname"))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        std::os::unix::fs::symlink("/dev/zero", r.join("etc/endless")).unwrap();
        assert_eq!(read_file(r, Path::new("/etc/endless"), 16).unwrap(), None);
    }

    #[test]
    fn programs_are_found_through_links() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir_all(r.join("usr/local/bin")).unwrap();
        std::fs::write(r.join("usr/local/bin/python3.12"), b"").unwrap();
        std::fs::set_permissions(
            r.join("usr/local/bin/python3.12"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("python3.12", r.join("usr/local/bin/python3")).unwrap();
        assert_eq!(
            find_program(r, &["/usr/bin/python3", "/usr/local/bin/python3"]).as_deref(),
            Some("/usr/local/bin/python3")
        );
        assert_eq!(find_program(r, &["/usr/bin/node"]), None);
    }
}
