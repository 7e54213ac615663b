//! Save and restore of a whole microVM: vCPU, VM and device state in one
//! versioned, checksummed state file, and guest memory as one file that a
//! restore maps copy-on-write.

pub mod dirty;
pub mod identity;
pub mod memory;
pub mod overlay;
pub mod vcpu_state;
pub mod vm_state;
pub mod working_set;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::vmm::devices::serial::SerialSnapshot;
use crate::vmm::devices::virtio::mmio::TransportState;
use identity::ImageIdentity;
use vcpu_state::VcpuState;
use vm_state::VmState;

/// Bumped on any change to what the state file holds or means.
pub const FORMAT_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";

/// Everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    pub image: ImageIdentity,
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    /// One per virtio-mmio device, in bus order (blk, rng, vsock).
    pub transports: Vec<TransportState>,
    pub cmdline: String,
    /// A diff snapshot: memory is its base snapshot's plus these pages, in
    /// [`overlay::OVERLAY_FILE`]. Absent: memory is all in [`MEMORY_FILE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<overlay::Overlay>,
}

/// The state file: version and checksum around the state.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format_version: u32,
    /// Hex SHA-256 of `state` as serialized in this file.
    checksum: String,
    state: Box<serde_json::value::RawValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a snapshot state file: {reason}")]
    Corrupt { path: String, reason: String },
    #[error(
        "{path} has snapshot format {found}, this airlock reads format {FORMAT_VERSION}; \
         recreate the template (airlock snapshot create)"
    )]
    Version { path: String, found: u32 },
    #[error(
        "the snapshot was made from image {expected}, but the VM was given image {found}; recreate the template for this image"
    )]
    WrongImage { expected: String, found: String },
    #[error("KVM refused {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.display().to_string();
    move |source| SnapshotError::Io { what, path, source }
}

pub fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn memory_path(dir: &Path) -> PathBuf {
    dir.join(MEMORY_FILE)
}

/// Writes the state file (atomically: temp file, then rename).
pub fn write_state(dir: &Path, state: &MachineState) -> Result<(), SnapshotError> {
    let path = state_path(dir);
    let body = serde_json::to_string(state)
        .map_err(|e| SnapshotError::Invalid(format!("cannot serialize state: {e}")))?;
    let checksum = hex(&Sha256::digest(body.as_bytes()));
    let raw = serde_json::value::RawValue::from_string(body)
        .map_err(|e| SnapshotError::Invalid(format!("cannot serialize state: {e}")))?;
    let file = StateFile {
        format_version: FORMAT_VERSION,
        checksum,
        state: raw,
    };
    let text = serde_json::to_string(&file)
        .map_err(|e| SnapshotError::Invalid(format!("cannot serialize state: {e}")))?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    std::fs::write(&tmp, text).map_err(io_error("write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error("rename into place", &path))
}

/// Reads and verifies the state file.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    read_state_and_checksum(dir).map(|(state, _)| state)
}

/// The state file's state and its checksum (which names this snapshot: a
/// diff snapshot records its base's).
pub fn read_state_and_checksum(dir: &Path) -> Result<(MachineState, String), SnapshotError> {
    let path = state_path(dir);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(io_error("read", &path))?;
    parse_state_and_checksum(&text, &shown)
}

#[cfg(test)]
fn parse_state(text: &str, shown: &str) -> Result<MachineState, SnapshotError> {
    parse_state_and_checksum(text, shown).map(|(state, _)| state)
}

fn parse_state_and_checksum(
    text: &str,
    shown: &str,
) -> Result<(MachineState, String), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: shown.to_string(),
        reason,
    };
    let file: StateFile = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    if file.format_version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: shown.to_string(),
            found: file.format_version,
        });
    }
    let body = file.state.get();
    if hex(&Sha256::digest(body.as_bytes())) != file.checksum {
        return Err(corrupt(
            "checksum mismatch (the file was damaged or edited)".into(),
        ));
    }
    let state = serde_json::from_str(body).map_err(|e| corrupt(e.to_string()))?;
    Ok((state, file.checksum))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MachineState {
        MachineState {
            image: ImageIdentity {
                recipe_hash: "abc".into(),
                kernel_fingerprint: "k".into(),
                rootfs_fingerprint: "r".into(),
            },
            memory_bytes: 1 << 20,
            vcpus: Vec::new(),
            vm: VmState::default(),
            serial: SerialSnapshot::default(),
            transports: Vec::new(),
            cmdline: "console=ttyS0".into(),
            overlay: None,
        }
    }

    #[test]
    fn state_round_trips_and_detects_damage() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &sample()).unwrap();
        let back = read_state(dir.path()).unwrap();
        assert_eq!(back.cmdline, "console=ttyS0");

        let text = std::fs::read_to_string(state_path(dir.path())).unwrap();
        let damaged = text.replace("console=ttyS0", "console=ttyS1");
        assert!(matches!(
            parse_state(&damaged, "x"),
            Err(SnapshotError::Corrupt { .. })
        ));
        let future = text.replacen(
            &format!("\"format_version\":{FORMAT_VERSION}"),
            "\"format_version\":99",
            1,
        );
        assert!(matches!(
            parse_state(&future, "x"),
            Err(SnapshotError::Version { found: 99, .. })
        ));
        assert!(matches!(
            parse_state("garbage", "x"),
            Err(SnapshotError::Corrupt { .. })
        ));
    }
}
