//! What kind of KVM this host offers, and a friendly error when it offers none.

use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The KVM device path; `AIRLOCK_KVM_DEVICE` overrides it (for tests and
/// unusual hosts).
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os("AIRLOCK_KVM_DEVICE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// The flavour of KVM behind /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX or SVM): guests run at near-native speed.
    Hardware,
    /// `kvm_pvm`, a software-nested hypervisor: guest kernel code is emulated,
    /// so the guest needs the PVM kernel repairs, CPUID and command line.
    SoftwareNestedPvm,
}

impl KvmFlavor {
    /// Detects the flavour from loaded kernel modules.
    pub fn detect() -> KvmFlavor {
        Self::detect_in(Path::new("/sys/module"))
    }

    fn detect_in(sys_module: &Path) -> KvmFlavor {
        if sys_module.join("kvm_pvm").exists() {
            KvmFlavor::SoftwareNestedPvm
        } else {
            KvmFlavor::Hardware
        }
    }

    /// A short name for cache keys and reports.
    pub fn key(self) -> &'static str {
        match self {
            KvmFlavor::Hardware => "hw",
            KvmFlavor::SoftwareNestedPvm => "pvm",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            KvmFlavor::Hardware => "hardware virtualization (VMX/SVM)",
            KvmFlavor::SoftwareNestedPvm => {
                "software-nested KVM (kvm_pvm): guest kernel code is emulated, so boots are slow; \
                 snapshots restore quickly"
            }
        }
    }
}

/// Why KVM cannot be used. Each message is one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KvmAccessError {
    #[error(
        "{path} does not exist: this host offers no KVM. Enable virtualization in the firmware and \
         load kvm_intel or kvm_amd, or run airlock on a host or cloud VM with (nested) KVM"
    )]
    Missing { path: String },
    #[error(
        "cannot open {path}: permission denied. Add your user to the group that owns it \
         (usually: sudo usermod -aG kvm $USER, then log in again), or run as root"
    )]
    PermissionDenied { path: String },
    #[error("cannot open {path}: {source}. Check that it is the KVM character device")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} answered KVM_GET_API_VERSION with {version}, expected 12: this is not a usable \
         KVM device"
    )]
    BadApiVersion { path: String, version: i32 },
}

/// Opens the KVM device and checks its API version. Returns the version.
pub fn check_kvm_access(path: &Path) -> Result<i32, KvmAccessError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| match source.kind() {
            ErrorKind::NotFound => KvmAccessError::Missing {
                path: shown.clone(),
            },
            ErrorKind::PermissionDenied => KvmAccessError::PermissionDenied {
                path: shown.clone(),
            },
            _ => KvmAccessError::Open {
                path: shown.clone(),
                source,
            },
        })?;
    // SAFETY: KVM_GET_API_VERSION reads no memory; KVM insists that its
    // argument is 0. On a file that is not KVM it fails with ENOTTY.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(KvmAccessError::BadApiVersion {
            path: shown,
            version,
        });
    }
    Ok(version)
}

const KVM_API_VERSION: i32 = 12;
// _IO(KVMIO, 0x00)
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_from_module_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(KvmFlavor::detect_in(dir.path()), KvmFlavor::Hardware);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(
            KvmFlavor::detect_in(dir.path()),
            KvmFlavor::SoftwareNestedPvm
        );
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = check_kvm_access(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmAccessError::Missing { .. }));
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn a_regular_file_is_not_kvm() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = check_kvm_access(file.path()).unwrap_err();
        assert!(matches!(err, KvmAccessError::BadApiVersion { .. }), "{err}");
    }
}
