//! Which KVM the test suite runs on.

use std::path::Path;

use anyhow::{Result, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKvm {
    /// This machine's /dev/kvm (hardware virtualization).
    Native,
    /// Nested test hosts (QEMU TCG with SVM), for hosts without a correct KVM.
    Nested,
}

impl std::str::FromStr for TestKvm {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<TestKvm> {
        match text {
            "native" => Ok(TestKvm::Native),
            "nested" => Ok(TestKvm::Nested),
            other => bail!("unknown KVM choice {other:?}: use native or nested"),
        }
    }
}

/// `AIRLOCK_TEST_KVM` if set; else native on hardware KVM, nested where
/// /dev/kvm is kvm_pvm (it loses guest register state) or missing.
pub fn choose() -> Result<TestKvm> {
    if let Some(choice) = std::env::var("AIRLOCK_TEST_KVM")
        .ok()
        .filter(|v| !v.is_empty())
    {
        return choice.parse();
    }
    Ok(match host_kvm() {
        HostKvm::Hardware(_) => TestKvm::Native,
        HostKvm::Pvm | HostKvm::Missing => TestKvm::Nested,
    })
}

enum HostKvm {
    Hardware(&'static str),
    Pvm,
    Missing,
}

fn host_kvm() -> HostKvm {
    let modules = Path::new("/sys/module");
    if modules.join("kvm_pvm").exists() {
        HostKvm::Pvm
    } else if !Path::new("/dev/kvm").exists() {
        HostKvm::Missing
    } else if modules.join("kvm_amd").exists() {
        HostKvm::Hardware("kvm_amd")
    } else if modules.join("kvm_intel").exists() {
        HostKvm::Hardware("kvm_intel")
    } else {
        HostKvm::Hardware("kvm")
    }
}

pub fn describe_host() -> String {
    match host_kvm() {
        HostKvm::Hardware(module) => format!("hardware KVM ({module})"),
        HostKvm::Pvm => "kvm_pvm, a software-nested KVM that loses guest register state".into(),
        HostKvm::Missing => "no /dev/kvm".into(),
    }
}
