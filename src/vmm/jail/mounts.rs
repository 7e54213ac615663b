//! The jail's root: a small tmpfs, private to the VMM's mount namespace,
//! holding read-only binds of the kernel, rootfs and template, a writable
//! bind of the run directory, and nothing else (no /proc, /dev or /sys).
//! After pivot_root the host's tree is detached, and the root itself is
//! remounted read-only.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{Binds, JailError, RUN, SNAPSHOT, TEMPLATE, check, os_error};

/// Where the new root is assembled; inside the run directory, in the VMM's
/// own mount namespace, so the host never sees it mounted.
const STAGING: &str = ".jail";
const TMPFS_OPTIONS: &str = "size=64k,nr_inodes=64,mode=0755";

pub(super) fn pivot_into_new_root(binds: &Binds) -> Result<(), JailError> {
    // Nothing done here may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    let root = binds.run_dir.join(STAGING);
    std::fs::create_dir_all(&root)
        .map_err(os_error(format!("cannot create {}", root.display())))?;
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(TMPFS_OPTIONS),
    )?;
    bind_file(&binds.kernel, &root.join(&super::KERNEL[1..]), true)?;
    bind_file(&binds.rootfs, &root.join(&super::ROOTFS[1..]), true)?;
    if let Some(template) = &binds.template {
        bind_dir(template, &root.join(&TEMPLATE[1..]), true)?;
    }
    if let Some(resume) = &binds.resume {
        bind_dir(resume, &root.join(&super::RESUME[1..]), true)?;
    }
    if let Some(snapshot) = &binds.snapshot {
        bind_dir(snapshot, &root.join(&SNAPSHOT[1..]), false)?;
    }
    bind_dir(&binds.run_dir, &root.join(&RUN[1..]), false)?;

    std::env::set_current_dir(&root).map_err(os_error("cannot enter the new root"))?;
    let dot = c_path(Path::new("."))?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching it
    // then leaves only the new root (see pivot_root(2)).
    // SAFETY: plain syscalls on NUL-terminated paths we own.
    check(
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int,
        "pivot_root",
    )?;
    // SAFETY: as above.
    check(
        unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) },
        "detaching the host's root",
    )?;
    std::env::set_current_dir("/").map_err(os_error("cannot enter /"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
    )
}

fn bind_file(source: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    std::fs::File::create(target)
        .map_err(os_error(format!("cannot create {}", target.display())))?;
    bind(source, target, read_only)
}

fn bind_dir(source: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    std::fs::create_dir(target).map_err(os_error(format!("cannot create {}", target.display())))?;
    bind(source, target, read_only)
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_path(source, target, libc::MS_BIND)?;
    // Bind flags only take effect on a remount.
    let ro = if read_only { libc::MS_RDONLY } else { 0 };
    mount(
        None,
        target,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | flags | ro,
        None,
    )
}

fn mount_path(source: &Path, target: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
    let (src, dst) = (c_path(source)?, c_path(target)?);
    // SAFETY: NUL-terminated paths we own; no data argument.
    check(
        unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                flags,
                std::ptr::null(),
            )
        },
        &format!("cannot bind {} on {}", source.display(), target.display()),
    )
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let c = |s: Option<&str>| s.map(CString::new).transpose();
    let bad = |_| JailError::Setup(format!("a NUL byte in a mount of {}", target.display()));
    let (source_c, fstype_c, data_c) = (
        c(source).map_err(bad)?,
        c(fstype).map_err(bad)?,
        c(data).map_err(bad)?,
    );
    let target_c = c_path(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string we own.
    check(
        unsafe {
            libc::mount(
                ptr(&source_c),
                target_c.as_ptr(),
                ptr(&fstype_c),
                flags,
                ptr(&data_c).cast(),
            )
        },
        &format!("cannot mount {}", target.display()),
    )
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Setup(format!("a NUL byte in {}", path.display())))
}
