//! The image's own settings: `/etc/airlock/image.json`, written by the host
//! into a custom image's root filesystem when it builds it. The built-in
//! image has none, and then nothing changes.
//!
//! ```json
//! {"name": "data", "python": "/usr/local/bin/python3", "node": null,
//!  "bash": "/bin/bash", "warm": ["python", "bash"],
//!  "python_imports": ["tabulate", "sklearn.linear_model"],
//!  "env": {"FOO": "bar"}}
//! ```
//!
//! Every field is optional. An interpreter path left out keeps the default;
//! `null` says the image has no such interpreter.
//!
//! A bad file must not cost the VM its agent, so nothing here fails: each
//! problem is logged to the console and
//! - a file that cannot be read, is over [`MAX_FILE_LEN`], is not JSON, or
//!   has an unknown field or a value of the wrong type is ignored whole (the
//!   built-in defaults);
//! - a field that parses but is invalid falls back to its default: a
//!   relative path, a bad name, a `warm` naming an unknown interpreter (the
//!   default warms everything: a dropped name would leave one cold), or
//!   more entries than allowed;
//! - within `python_imports` and `env`, a bad entry is dropped alone (the
//!   others stand by themselves). An env name the agent sets itself
//!   ([`is_reserved_env`]) is refused that way too.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use airlock_protocol::Language;
use serde::{Deserialize, Deserializer};

use crate::log::log;

/// Where the host writes the file in a custom image.
pub const IMAGE_CONFIG_PATH: &str = "/etc/airlock/image.json";
/// Far above any real file; a bigger one is not read at all.
pub const MAX_FILE_LEN: u64 = 64 << 10;
pub const MAX_PYTHON_IMPORTS: usize = 64;
pub const MAX_ENV: usize = 256;
const MAX_NAME_LEN: usize = 128;
const MAX_PATH_LEN: usize = 4096;

/// The file as written; types only, the rules are in [`validate`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageFile {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    python: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    node: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    bash: Option<Option<String>>,
    #[serde(default)]
    warm: Option<Vec<String>>,
    #[serde(default)]
    python_imports: Option<Vec<String>>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
}

/// A field that is present, even as `null` (`Some(None)`); absent stays `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// What an interpreter field says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Interp {
    /// Not given (or invalid): the agent's default.
    #[default]
    Default,
    /// The image has none.
    Absent,
    At(String),
}

impl Interp {
    /// The program to run, given the agent's default.
    pub fn resolve(&self, default: &str) -> Option<String> {
        match self {
            Interp::Default => Some(default.to_string()),
            Interp::Absent => None,
            Interp::At(path) => Some(path.clone()),
        }
    }
}

/// The validated settings; [`Default`] is the built-in image.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageConfig {
    pub name: Option<String>,
    pub python: Interp,
    pub node: Interp,
    pub bash: Interp,
    /// `None`: the default set (every interpreter the image has).
    pub warm: Option<Vec<Language>>,
    pub python_imports: Vec<String>,
    /// Added to user code's environment, in name order.
    pub env: Vec<(String, String)>,
}

/// Reads and validates the file at `path`; logs each problem. An absent
/// file is the built-in image: the defaults, without a word.
pub fn load(path: &Path) -> ImageConfig {
    let bytes = match read_bounded(path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return ImageConfig::default(),
        Err(why) => {
            log!("{}: {why}; using the defaults", path.display());
            return ImageConfig::default();
        }
    };
    let (config, problems) = parse(&bytes);
    for problem in &problems {
        log!("{}: {problem}", path.display());
    }
    log!(
        "image {} (from {})",
        config.name.as_deref().unwrap_or("without a name"),
        path.display()
    );
    config
}

/// The file's bytes; `None` if there is no file.
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    // Read one byte past the bound rather than trust the size (it may not
    // be a regular file).
    let mut bytes = Vec::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(format!("larger than {MAX_FILE_LEN} bytes, not read"));
    }
    Ok(Some(bytes))
}

/// Parses and validates; returns the settings and the problems found (each
/// already handled as the module's doc says).
pub fn parse(bytes: &[u8]) -> (ImageConfig, Vec<String>) {
    // serde would take the struct from an array too.
    let file = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<ImageFile>(bytes).map_err(|e| e.to_string()),
        _ => Err("not a JSON object".to_string()),
    };
    match file {
        Ok(file) => validate(file),
        Err(e) => (
            ImageConfig::default(),
            vec![format!("not a valid image file ({e}); using the defaults")],
        ),
    }
}

fn validate(file: ImageFile) -> (ImageConfig, Vec<String>) {
    let mut problems = Vec::new();
    let mut config = ImageConfig::default();

    if let Some(name) = file.name {
        if !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.chars().any(char::is_control) {
            config.name = Some(name);
        } else {
            problems.push(format!(
                "name: at most {MAX_NAME_LEN} bytes, not empty, without control \
                 characters; ignored"
            ));
        }
    }

    for (field, value, slot) in [
        ("python", file.python, &mut config.python),
        ("node", file.node, &mut config.node),
        ("bash", file.bash, &mut config.bash),
    ] {
        *slot = match value {
            None => Interp::Default,
            Some(None) => Interp::Absent,
            Some(Some(path))
                if path.starts_with('/') && path.len() <= MAX_PATH_LEN && !path.contains('\0') =>
            {
                Interp::At(path)
            }
            Some(Some(path)) => {
                problems.push(format!(
                    "{field}: {path:?} is not an absolute path; using the default"
                ));
                Interp::Default
            }
        };
    }

    if let Some(names) = file.warm {
        let langs: Result<Vec<Language>, &String> = names
            .iter()
            .map(|name| parse_language(name).ok_or(name))
            .collect();
        match langs {
            Ok(mut langs) => {
                // A set: the agent picks the start order.
                langs.sort();
                langs.dedup();
                config.warm = Some(langs);
            }
            Err(bad) => problems.push(format!(
                "warm: unknown interpreter {bad:?} (python, javascript, bash); \
                 warming every interpreter"
            )),
        }
    }

    if let Some(imports) = file.python_imports {
        if imports.len() > MAX_PYTHON_IMPORTS {
            problems.push(format!(
                "python_imports: more than {MAX_PYTHON_IMPORTS}; none imported"
            ));
        } else {
            for module in imports {
                if is_python_module(&module) {
                    if !config.python_imports.contains(&module) {
                        config.python_imports.push(module);
                    }
                } else {
                    problems.push(format!(
                        "python_imports: {module:?} is not a dotted module name; skipped"
                    ));
                }
            }
        }
    }

    if let Some(env) = file.env {
        if env.len() > MAX_ENV {
            problems.push(format!("env: more than {MAX_ENV} variables; none set"));
        } else {
            for (name, value) in env {
                if !is_env_name(&name) {
                    problems.push(format!("env: {name:?} is not a variable name; skipped"));
                } else if is_reserved_env(&name) {
                    problems.push(format!(
                        "env: {name} is set by the agent itself; the image's value is refused"
                    ));
                } else if value.contains('\0') {
                    problems.push(format!("env: the value of {name} has a NUL byte; skipped"));
                } else {
                    config.env.push((name, value));
                }
            }
        }
    }

    (config, problems)
}

/// An interpreter's name in `warm` (`node` is javascript too).
pub fn parse_language(name: &str) -> Option<Language> {
    match name.trim() {
        "node" => Some(Language::Javascript),
        name => Language::ALL.into_iter().find(|l| l.name() == name),
    }
}

/// `a`, `a.b_c`: what `import` takes, without relative dots.
fn is_python_module(name: &str) -> bool {
    name.split('.').all(is_identifier)
}

fn is_env_name(name: &str) -> bool {
    is_identifier(name)
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_identifier(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Variables the agent sets for user code itself (see `Config::base_env`),
/// in any case: identity and location (the sandbox user, PATH, SHELL, PWD),
/// the egress proxy, the CPU policy passed on from the kernel command line
/// (kvm_pvm needs it to keep code off AVX), and the agent's own plumbing.
/// An image may set the rest (LANG, TERM, TMPDIR, MPLBACKEND, ...), over
/// the agent's defaults.
pub fn is_reserved_env(name: &str) -> bool {
    const RESERVED: [&str; 10] = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
    ];
    let upper = name.to_ascii_uppercase();
    RESERVED.contains(&upper.as_str())
        || crate::config::CPU_POLICY_VARS
            .iter()
            .any(|v| v.eq_ignore_ascii_case(name))
        || upper.starts_with("AIRLOCK_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> ImageConfig {
        let (config, problems) = parse(json.as_bytes());
        assert!(problems.is_empty(), "{problems:?}");
        config
    }

    /// The settings and the one problem `json` has.
    fn one_problem(json: &str) -> (ImageConfig, String) {
        let (config, mut problems) = parse(json.as_bytes());
        assert_eq!(problems.len(), 1, "{problems:?}");
        (config, problems.remove(0))
    }

    #[test]
    fn a_full_file_parses() {
        let config = ok(r#"{
            "name": "data",
            "python": "/usr/local/bin/python3",
            "node": null,
            "bash": "/bin/bash",
            "warm": ["python", "bash"],
            "python_imports": ["tabulate", "sklearn.linear_model"],
            "env": {"FOO": "bar", "_X1": ""}
        }"#);
        assert_eq!(
            config,
            ImageConfig {
                name: Some("data".into()),
                python: Interp::At("/usr/local/bin/python3".into()),
                node: Interp::Absent,
                bash: Interp::At("/bin/bash".into()),
                warm: Some(vec![Language::Python, Language::Bash]),
                python_imports: vec!["tabulate".into(), "sklearn.linear_model".into()],
                env: vec![("FOO".into(), "bar".into()), ("_X1".into(), String::new())],
            }
        );
        assert_eq!(
            config.python.resolve("/usr/bin/python3").as_deref(),
            Some("/usr/local/bin/python3")
        );
        assert_eq!(config.node.resolve("/usr/bin/node"), None);
    }

    #[test]
    fn an_empty_object_is_the_built_in_image() {
        let config = ok("{}");
        assert_eq!(config, ImageConfig::default());
        assert_eq!(
            config.python.resolve("/usr/bin/python3").as_deref(),
            Some("/usr/bin/python3")
        );
        // null lists mean the default too.
        assert_eq!(ok(r#"{"warm": null, "env": null}"#), ImageConfig::default());
    }

    #[test]
    fn an_absent_file_is_the_built_in_image() {
        let dir = std::env::temp_dir().join(format!("airlock-image-test-{}", std::process::id()));
        assert_eq!(
            load(&dir.join("no-such-image.json")),
            ImageConfig::default()
        );
    }

    #[test]
    fn a_file_is_read_from_disk_and_an_oversize_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("airlock-image-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image.json");
        std::fs::write(&path, r#"{"name": "disk", "node": null}"#).unwrap();
        let config = load(&path);
        assert_eq!(
            (config.name.as_deref(), &config.node),
            (Some("disk"), &Interp::Absent)
        );

        // Valid JSON, padded past the bound: not read at all.
        let padded = format!(r#"{{"name": "big"{}}}"#, " ".repeat(MAX_FILE_LEN as usize));
        std::fs::write(&path, padded).unwrap();
        assert!(read_bounded(&path).unwrap_err().contains("larger than"));
        assert_eq!(load(&path), ImageConfig::default());
        // Exactly at the bound is fine.
        let body = r#"{"name": "edge"}"#;
        let at_bound = format!("{body}{}", " ".repeat(MAX_FILE_LEN as usize - body.len()));
        std::fs::write(&path, at_bound).unwrap();
        assert_eq!(load(&path).name.as_deref(), Some("edge"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_malformed_file_falls_back_to_every_default() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"["data", "/usr/bin/python3"]"#,
            "null",
            r#"{"name": "x""#,
            // An unknown field (a typo must not pass unseen).
            r#"{"name": "x", "pyhton": "/usr/bin/python3"}"#,
            // Wrong types.
            r#"{"name": 3}"#,
            r#"{"python": 3}"#,
            r#"{"warm": "python"}"#,
            r#"{"python_imports": [1]}"#,
            r#"{"env": {"A": 1}}"#,
            r#"{"env": ["A=1"]}"#,
        ] {
            let (config, problem) = one_problem(bad);
            assert_eq!(config, ImageConfig::default(), "{bad}");
            assert!(
                problem.contains("not a valid image file"),
                "{bad}: {problem}"
            );
        }
    }

    #[test]
    fn a_bad_path_falls_back_to_the_default_for_that_interpreter_only() {
        for bad in ["python3", "", "./python3", "usr/bin/python3"] {
            let json = format!(r#"{{"python": {bad:?}, "node": null, "env": {{"A": "1"}}}}"#);
            let (config, problem) = one_problem(&json);
            assert_eq!(config.python, Interp::Default, "{bad}");
            assert!(problem.starts_with("python:"), "{problem}");
            assert_eq!(config.node, Interp::Absent);
            assert_eq!(config.env, [("A".to_string(), "1".to_string())]);
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        let (config, _) = one_problem(&format!(r#"{{"bash": "{long}"}}"#));
        assert_eq!(config.bash, Interp::Default);
        let (config, _) = one_problem(r#"{"bash": "/bin/ba\u0000sh"}"#);
        assert_eq!(config.bash, Interp::Default);
    }

    #[test]
    fn a_bad_name_is_dropped() {
        for bad in [r#""""#, r#""a\nb""#] {
            let (config, problem) = one_problem(&format!(r#"{{"name": {bad}, "node": null}}"#));
            assert_eq!((config.name, config.node), (None, Interp::Absent));
            assert!(problem.starts_with("name:"), "{problem}");
        }
        let (config, _) = one_problem(&format!(
            r#"{{"name": "{}"}}"#,
            "n".repeat(MAX_NAME_LEN + 1)
        ));
        assert_eq!(config.name, None);
    }

    #[test]
    fn warm_is_a_set_with_node_as_an_alias_and_falls_back_whole() {
        let config = ok(r#"{"warm": ["bash", "node", "javascript", "bash"]}"#);
        assert_eq!(
            config.warm,
            Some(vec![Language::Javascript, Language::Bash])
        );
        assert_eq!(ok(r#"{"warm": []}"#).warm, Some(vec![]));
        let (config, problem) = one_problem(r#"{"warm": ["python", "ruby"], "name": "n"}"#);
        assert_eq!((config.warm, config.name.as_deref()), (None, Some("n")));
        assert!(problem.contains("\"ruby\""), "{problem}");
        let (config, _) = one_problem(r#"{"warm": ["unknown"]}"#);
        assert_eq!(config.warm, None);
    }

    #[test]
    fn bad_python_imports_are_skipped_one_by_one() {
        let (config, mut problems) = parse(
            br#"{"python_imports": ["ok_1", "a.b.c", "os; import x", "1abc", "a..b", ".rel", "", "ok_1", "_p.q"]}"#,
        );
        assert_eq!(config.python_imports, ["ok_1", "a.b.c", "_p.q"]);
        assert_eq!(problems.len(), 5, "{problems:?}");
        assert!(problems.remove(0).contains("\"os; import x\""));
        // Too many: none at all.
        let many: Vec<String> = (0..=MAX_PYTHON_IMPORTS).map(|i| format!("m{i}")).collect();
        let json = serde_json::json!({ "python_imports": many }).to_string();
        let (config, problem) = one_problem(&json);
        assert!(
            config.python_imports.is_empty() && problem.contains("more than"),
            "{problem}"
        );
        let json = serde_json::json!({ "python_imports": &many[..MAX_PYTHON_IMPORTS] }).to_string();
        assert_eq!(ok(&json).python_imports.len(), MAX_PYTHON_IMPORTS);
    }

    #[test]
    fn bad_and_reserved_env_entries_are_refused_one_by_one() {
        let (config, problems) = parse(
            br#"{"env": {
                "GOOD": "1", "lower_ok": "x=y", "9BAD": "x", "BAD-NAME": "x", "": "x",
                "NUL": "a\u0000b", "PATH": "/opt/bin", "home": "/x", "http_proxy": "x",
                "GLIBC_TUNABLES": "x", "openssl_ia32cap": "x", "AIRLOCK_PYTHON_IMPORTS": "os",
                "LANG": "de_DE.UTF-8"
            }}"#,
        );
        assert_eq!(
            config.env,
            [
                ("GOOD".to_string(), "1".to_string()),
                ("LANG".to_string(), "de_DE.UTF-8".to_string()),
                ("lower_ok".to_string(), "x=y".to_string()),
            ]
        );
        assert_eq!(problems.len(), 10, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("PATH is set by the agent")),
            "{problems:?}"
        );
        let many: serde_json::Map<String, serde_json::Value> = (0..=MAX_ENV)
            .map(|i| (format!("V{i}"), "x".into()))
            .collect();
        let json = serde_json::json!({ "env": many }).to_string();
        let (config, problem) = one_problem(&json);
        assert!(
            config.env.is_empty() && problem.contains("more than"),
            "{problem}"
        );
    }

    #[test]
    fn reserved_names_cover_what_the_agent_sets() {
        let config = crate::config::Config::debug("/h".into(), "/r".into());
        let mut with_everything = config.clone();
        with_everything.proxy_env = true;
        for (name, _) in with_everything.base_env() {
            let image_may_set = [
                "LANG",
                "TERM",
                "TMPDIR",
                "PAGER",
                "MPLBACKEND",
                "MPLCONFIGDIR",
            ];
            assert_eq!(
                is_reserved_env(&name),
                !image_may_set.contains(&name.as_str()),
                "{name}"
            );
        }
        for name in crate::config::CPU_POLICY_VARS {
            assert!(is_reserved_env(name), "{name}");
        }
    }
}
