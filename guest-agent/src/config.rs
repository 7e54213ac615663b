//! How the agent runs user code: as whom, where, and with which environment.
//! PID 1 in the guest uses [`Config::guest`]; the debug mode
//! (`--serve-unix`) uses [`Config::debug`]: the current user, no cgroups,
//! no mounts.

use std::path::PathBuf;

use crate::init;
use crate::sys::Creds;

#[derive(Debug, Clone)]
pub struct Config {
    /// Drop to these for user code; `None` keeps the agent's own.
    pub creds: Option<Creds>,
    pub user: String,
    pub home: PathBuf,
    /// Root-owned directory for the interpreter drivers and bash's cells.
    pub run_dir: PathBuf,
    /// Confine user code in cgroups (PID 1 only).
    pub cgroups: bool,
    /// The agent runs at oom_score_adj -1000; children go back to 0.
    pub reset_oom_score: bool,
    /// The tmpfs mounts whose size limits can be changed.
    pub tmpfs_tmp: Option<PathBuf>,
    pub tmpfs_home: Option<PathBuf>,
    /// Set the wall clock and credit entropy on Refresh.
    pub privileged: bool,
    pub python: String,
    pub node: String,
    pub bash: String,
    /// Keep user code off AVX (set by the VMM on kvm_pvm, where the guest
    /// kernel cannot save AVX state; see the VMM's `PVM_USER_ENV`).
    pub no_avx: bool,
    /// Point user code's proxy variables at the egress relay (see
    /// `egress`). Always set in the guest: with egress off nothing listens
    /// there, so a proxied connection is refused at once, and code warmed
    /// in the template needs no change when a sandbox gets egress.
    pub proxy_env: bool,
}

/// Variables from the agent's own environment (the kernel command line)
/// that steer libraries' CPU dispatch; passed on to user code unchanged.
const CPU_POLICY_VARS: [&str; 5] = [
    "GLIBC_TUNABLES",
    "OPENSSL_ia32cap",
    "NPY_DISABLE_CPU_FEATURES",
    "OPENBLAS_CORETYPE",
    "SIMDUTF_FORCE_IMPLEMENTATION",
];

/// V8's switches for the same policy.
pub const NODE_NO_AVX_FLAGS: [&str; 3] =
    ["--no-enable-avx", "--no-enable-avx2", "--no-enable-fma3"];

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Config {
    pub fn guest() -> Config {
        Config {
            creds: Some(Creds {
                uid: init::SANDBOX_UID,
                gid: init::SANDBOX_GID,
            }),
            user: "sandbox".into(),
            home: init::SANDBOX_HOME.into(),
            run_dir: "/run/airlock".into(),
            cgroups: true,
            reset_oom_score: true,
            tmpfs_tmp: Some("/tmp".into()),
            tmpfs_home: Some(init::SANDBOX_HOME.into()),
            privileged: true,
            python: "/usr/bin/python3".into(),
            node: "/usr/bin/node".into(),
            bash: "/bin/bash".into(),
            no_avx: std::env::var("AIRLOCK_NO_AVX").is_ok_and(|v| v == "1"),
            proxy_env: true,
        }
    }

    /// The current user in `home`, with drivers in `run_dir`.
    pub fn debug(home: PathBuf, run_dir: PathBuf) -> Config {
        Config {
            creds: None,
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            home,
            run_dir,
            cgroups: false,
            reset_oom_score: false,
            tmpfs_tmp: None,
            tmpfs_home: None,
            privileged: false,
            python: "python3".into(),
            node: "node".into(),
            bash: "bash".into(),
            no_avx: false,
            proxy_env: false,
        }
    }

    /// The environment user code starts with.
    pub fn base_env(&self) -> Vec<(String, String)> {
        let home = self.home.to_string_lossy().into_owned();
        let path = if self.creds.is_some() {
            PATH.to_string()
        } else {
            std::env::var("PATH").unwrap_or_else(|_| PATH.into())
        };
        let mut env = vec![
            ("PATH".into(), path),
            ("HOME".into(), home.clone()),
            ("USER".into(), self.user.clone()),
            ("LOGNAME".into(), self.user.clone()),
            ("SHELL".into(), "/bin/bash".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TERM".into(), "dumb".into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("PAGER".into(), "cat".into()),
            ("MPLBACKEND".into(), "Agg".into()),
            ("MPLCONFIGDIR".into(), format!("{home}/.config/matplotlib")),
        ];
        if self.proxy_env {
            let proxy = format!("http://127.0.0.1:{}", airlock_protocol::EGRESS_PROXY_PORT);
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.push((name.into(), proxy.clone()));
            }
            for name in ["NO_PROXY", "no_proxy"] {
                env.push((name.into(), "localhost,127.0.0.1,::1".into()));
            }
        }
        if self.no_avx {
            env.extend(CPU_POLICY_VARS.iter().filter_map(|name| {
                std::env::var(name)
                    .ok()
                    .map(|value| (name.to_string(), value))
            }));
        }
        env
    }
}

/// `base` with `overrides` applied (later entries win), in first-seen order.
pub fn merge_env(
    base: Vec<(String, String)>,
    overrides: &[(String, String)],
) -> Vec<(String, String)> {
    let mut env = base;
    for (k, v) in overrides {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}
