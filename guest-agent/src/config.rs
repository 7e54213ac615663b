//! How the agent runs user code: as whom, where, and with which environment.
//! PID 1 in the guest uses [`Config::guest`]; the debug mode
//! (`--serve-unix`) uses [`Config::debug`]: the current user, no cgroups,
//! no mounts. Both take a custom image's settings (interpreters, warm set,
//! environment) from its image file (see `image`).

use std::path::{Path, PathBuf};

use airlock_protocol::Language;

use crate::image::{self, ImageConfig};
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
    /// The interpreters' programs; `None`: the image has none (see `image`).
    pub python: Option<String>,
    pub node: Option<String>,
    pub bash: Option<String>,
    /// The image's name, for messages (custom images only).
    pub image_name: Option<String>,
    /// The interpreters started with the agent, in start order; the others
    /// start on first use.
    pub warm: Vec<Language>,
    /// Modules the warm Python imports before it says it is ready.
    pub python_imports: Vec<String>,
    /// The image's additions to user code's environment (never a name
    /// [`image::is_reserved_env`] refuses).
    pub image_env: Vec<(String, String)>,
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
pub const CPU_POLICY_VARS: [&str; 5] = [
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
    /// PID 1 in the guest, with the image's settings from
    /// [`image::IMAGE_CONFIG_PATH`] (the defaults when it has none).
    pub fn guest() -> Config {
        let image = image::load(Path::new(image::IMAGE_CONFIG_PATH));
        let mut config = Config {
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
            python: None,
            node: None,
            bash: None,
            image_name: None,
            warm: Vec::new(),
            python_imports: Vec::new(),
            image_env: Vec::new(),
            no_avx: std::env::var("AIRLOCK_NO_AVX").is_ok_and(|v| v == "1"),
            proxy_env: true,
        };
        config.apply(image, ["/usr/bin/python3", "/usr/bin/node", "/bin/bash"]);
        config
    }

    /// The current user in `home`, with drivers in `run_dir`; the
    /// interpreters are looked up in PATH. `AIRLOCK_IMAGE_CONFIG` names an
    /// image file to honour as the guest honours its own (for tests).
    pub fn debug(home: PathBuf, run_dir: PathBuf) -> Config {
        let image = match std::env::var_os("AIRLOCK_IMAGE_CONFIG") {
            Some(path) => image::load(Path::new(&path)),
            None => ImageConfig::default(),
        };
        let mut config = Config {
            creds: None,
            user: std::env::var("USER").unwrap_or_else(|_| "user".into()),
            home,
            run_dir,
            cgroups: false,
            reset_oom_score: false,
            tmpfs_tmp: None,
            tmpfs_home: None,
            privileged: false,
            python: None,
            node: None,
            bash: None,
            image_name: None,
            warm: Vec::new(),
            python_imports: Vec::new(),
            image_env: Vec::new(),
            no_avx: false,
            proxy_env: false,
        };
        config.apply(image, ["python3", "node", "bash"]);
        config
    }

    /// Takes the image's settings over `defaults` (python, node, bash).
    fn apply(&mut self, image: ImageConfig, defaults: [&str; 3]) {
        let [python, node, bash] = defaults;
        self.python = image.python.resolve(python);
        self.node = image.node.resolve(node);
        self.bash = image.bash.resolve(bash);
        self.image_name = image.name;
        if let Some(warm) = &image.warm {
            for lang in warm.iter().filter(|l| self.program(**l).is_none()) {
                crate::log::log!("warm: the image has no {}; not started", lang.name());
            }
        }
        self.warm = warm_set(
            std::env::var("AIRLOCK_INTERPRETERS").ok().as_deref(),
            image.warm,
            |lang| self.program(lang).is_some(),
        );
        if !image.python_imports.is_empty() && self.python.is_none() {
            crate::log::log!("python_imports ignored: the image has no python");
        }
        self.python_imports = image.python_imports;
        self.image_env = image.env;
    }

    /// The program of `lang`'s interpreter; `None` if the image has none.
    pub fn program(&self, lang: Language) -> Option<&str> {
        match lang {
            Language::Python => self.python.as_deref(),
            Language::Javascript => self.node.as_deref(),
            Language::Bash => self.bash.as_deref(),
            Language::Unknown => None,
        }
    }

    /// Why `lang` cannot run here, naming the image and what it has.
    pub fn lacks(&self, lang: Language) -> String {
        let program = match lang {
            Language::Javascript => "node (javascript)",
            other => other.name(),
        };
        format!(
            "{} has no {program}; {}",
            self.this_image(),
            self.languages()
        )
    }

    /// Why a shell command cannot run here.
    pub fn lacks_shell(&self) -> String {
        format!(
            "{} has no bash to run a shell command; give the command as an argv list \
             ({})",
            self.this_image(),
            self.languages()
        )
    }

    fn this_image(&self) -> String {
        match &self.image_name {
            Some(name) => format!("this image ({name})"),
            None => "this image".to_string(),
        }
    }

    fn languages(&self) -> String {
        let have: Vec<&str> = Language::ALL
            .into_iter()
            .filter(|l| self.program(*l).is_some())
            .map(Language::name)
            .collect();
        if have.is_empty() {
            "it has no interpreters".to_string()
        } else {
            format!("its languages are {}", have.join(", "))
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
            ("SHELL".into(), self.shell()),
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
        // Over the defaults above that an image may change (LANG, ...); the
        // others are reserved, so the image cannot reach them.
        merge_env(env, &self.image_env)
    }

    /// The image's bash when it names one; /bin/sh when it has none.
    fn shell(&self) -> String {
        match self.bash.as_deref() {
            Some(path) if path.starts_with('/') => path.to_string(),
            Some(_) => "/bin/bash".to_string(),
            None => "/bin/sh".to_string(),
        }
    }
}

/// The interpreters started with the agent, in start order: bash (cheap),
/// python, javascript, or those of the image's `warm`; `AIRLOCK_INTERPRETERS`
/// (e.g. `python,bash`, or `none`; on the kernel command line for PID 1)
/// overrides both, in its own order. Only interpreters the image has.
fn warm_set(
    from_env: Option<&str>,
    image_warm: Option<Vec<Language>>,
    available: impl Fn(Language) -> bool,
) -> Vec<Language> {
    const ORDER: [Language; 3] = [Language::Bash, Language::Python, Language::Javascript];
    let mut set: Vec<Language> = match (from_env, image_warm) {
        (Some(list), _) => list.split(',').filter_map(image::parse_language).collect(),
        (None, Some(warm)) => ORDER.into_iter().filter(|l| warm.contains(l)).collect(),
        (None, None) => ORDER.to_vec(),
    };
    set.retain(|l| available(*l));
    set
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Interp;

    fn with_image(image: ImageConfig) -> Config {
        let mut config = Config::debug("/home/u".into(), "/run/a".into());
        config.apply(image, ["/usr/bin/python3", "/usr/bin/node", "/bin/bash"]);
        config
    }

    #[test]
    fn without_an_image_file_nothing_changes() {
        let config = Config::guest();
        assert_eq!(config.python.as_deref(), Some("/usr/bin/python3"));
        assert_eq!(config.node.as_deref(), Some("/usr/bin/node"));
        assert_eq!(config.bash.as_deref(), Some("/bin/bash"));
        assert_eq!(config.image_name, None);
        assert!(config.python_imports.is_empty() && config.image_env.is_empty());
        if std::env::var_os("AIRLOCK_INTERPRETERS").is_none() {
            assert_eq!(
                config.warm,
                [Language::Bash, Language::Python, Language::Javascript]
            );
        }
        let env = config.base_env();
        assert!(env.contains(&("SHELL".into(), "/bin/bash".into())));
        assert!(!env.iter().any(|(k, _)| k.starts_with("AIRLOCK")));
    }

    #[test]
    fn the_image_sets_paths_warm_set_and_env() {
        let config = with_image(ImageConfig {
            name: Some("data".into()),
            python: Interp::At("/usr/local/bin/python3".into()),
            node: Interp::Absent,
            bash: Interp::Default,
            warm: Some(vec![Language::Python, Language::Javascript]),
            python_imports: vec!["tabulate".into()],
            env: vec![("FOO".into(), "bar".into()), ("LANG".into(), "C".into())],
        });
        assert_eq!(
            config.program(Language::Python),
            Some("/usr/local/bin/python3")
        );
        assert_eq!(config.program(Language::Javascript), None);
        assert_eq!(config.program(Language::Bash), Some("/bin/bash"));
        // Node is in `warm` but absent: it cannot start.
        if std::env::var_os("AIRLOCK_INTERPRETERS").is_none() {
            assert_eq!(config.warm, [Language::Python]);
        }
        let env = config.base_env();
        assert!(env.contains(&("FOO".into(), "bar".into())));
        // Over the agent's default, in its place.
        assert_eq!(env.iter().filter(|(k, _)| k == "LANG").count(), 1);
        assert!(env.contains(&("LANG".into(), "C".into())));
        assert_eq!(
            config.lacks(Language::Javascript),
            "this image (data) has no node (javascript); its languages are python, bash"
        );
    }

    #[test]
    fn an_image_without_bash_or_anything() {
        let config = with_image(ImageConfig {
            python: Interp::Absent,
            node: Interp::Absent,
            bash: Interp::Absent,
            ..ImageConfig::default()
        });
        assert!(config.warm.is_empty());
        assert_eq!(
            config.lacks(Language::Python),
            "this image has no python; it has no interpreters"
        );
        assert!(config.lacks_shell().contains("argv list"));
        assert!(
            config
                .base_env()
                .contains(&("SHELL".into(), "/bin/sh".into()))
        );
    }

    #[test]
    fn the_warm_set_follows_the_kernel_command_line_then_the_image() {
        use Language::*;
        let all = |_| true;
        assert_eq!(warm_set(None, None, all), [Bash, Python, Javascript]);
        assert_eq!(
            warm_set(None, Some(vec![Python, Javascript, Bash]), all),
            [Bash, Python, Javascript]
        );
        assert_eq!(warm_set(None, Some(vec![]), all), []);
        assert_eq!(
            warm_set(Some("node, python"), Some(vec![Bash]), all),
            [Javascript, Python]
        );
        assert_eq!(warm_set(Some("none"), None, all), []);
        assert_eq!(warm_set(None, None, |l| l != Javascript), [Bash, Python]);
    }
}
