//! The image recipe file (TOML): what a custom image adds to its base.
//!
//! Everything in it is checked before a build starts, so that a typo fails
//! in a second with the field named, not after minutes of apt-get. Names
//! that reach a command line (packages, requirements) are refused when they
//! could be read as an option, and paths inside the image are absolute and
//! never leave it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bounds on what a recipe may list: far above any real recipe, low
/// enough that a mistaken one fails fast.
const MAX_ITEMS: usize = 512;
const MAX_TEXT: usize = 4096;
const MAX_RECIPE_BYTES: u64 = 256 << 10;

/// A parsed, validated recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    /// `debian` (airlock's own Debian bookworm root filesystem), or an OCI
    /// image: `oci-archive:PATH`, `oci-layout:DIR`, `docker-archive:PATH`.
    #[serde(default = "default_base")]
    pub base: String,
    #[serde(default)]
    pub packages: Packages,
    /// Files copied into the image, in order.
    #[serde(default)]
    pub files: Vec<FileCopy>,
    #[serde(default)]
    pub build: Build,
    /// Added to the environment of every sandbox's code.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub warm: Warm,
    #[serde(default)]
    pub shape: Option<Shape>,
}

fn default_base() -> String {
    "debian".into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    /// Debian packages (`name` or `name=version`); needs a Debian base.
    #[serde(default)]
    pub apt: Vec<String>,
    /// pip requirement specifiers, from PyPI (`tabulate==0.9.0`).
    #[serde(default)]
    pub pip: Vec<String>,
    /// A directory of wheels (relative to the recipe): every `*.whl` in it
    /// is installed, without the network.
    #[serde(default)]
    pub pip_wheels: Option<PathBuf>,
    /// npm packages installed globally (`left-pad@1.3.0`).
    #[serde(default)]
    pub npm: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    /// On the build host, relative to the recipe file: a file or a directory.
    pub from: PathBuf,
    /// Absolute path in the image.
    pub to: PathBuf,
    /// Octal mode for a file (default: the source's, without write for others).
    #[serde(default)]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    /// Shell commands run with `/bin/sh -c` in a chroot of the new root, as
    /// root, after the packages and files; never at sandbox start.
    #[serde(default)]
    pub run: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Warm {
    /// Interpreters started and warmed in the template: python, javascript,
    /// bash. The others start on first use. Default: every one the image has.
    #[serde(default)]
    pub interpreters: Option<Vec<String>>,
    /// Modules the warm Python imports before the snapshot, so a sandbox's
    /// first `import` of them costs nothing.
    #[serde(default)]
    pub python_imports: Vec<String>,
}

pub const INTERPRETERS: [&str; 3] = ["python", "javascript", "bash"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    pub vcpus: u8,
    pub memory_mib: u32,
}

/// Where the base comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    Debian,
    /// An OCI spec as written (`oci-archive:…`), to give to the unpacker.
    Oci(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("cannot read the recipe {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the recipe {path} is larger than {MAX_RECIPE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("the recipe {path} is not valid TOML for a recipe: {message}")]
    Syntax { path: String, message: String },
    #[error("the recipe {path}: {field}: {why}")]
    Invalid {
        path: String,
        field: String,
        why: String,
    },
}

/// A recipe and the directory its relative paths start from.
#[derive(Debug, Clone)]
pub struct RecipeFile {
    pub path: PathBuf,
    pub dir: PathBuf,
    pub recipe: Recipe,
}

impl RecipeFile {
    pub fn load(path: &Path) -> Result<RecipeFile, RecipeError> {
        let shown = path.display().to_string();
        let read = |source| RecipeError::Read {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if meta.len() > MAX_RECIPE_BYTES {
            return Err(RecipeError::TooLarge { path: shown });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let recipe = parse(&text).map_err(|e| match e {
            ParseError::Syntax(message) => RecipeError::Syntax {
                path: shown.clone(),
                message,
            },
            ParseError::Invalid { field, why } => RecipeError::Invalid {
                path: shown.clone(),
                field,
                why,
            },
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        Ok(RecipeFile {
            path: path.to_path_buf(),
            dir,
            recipe,
        })
    }

    /// A path the recipe names, relative to the recipe's directory.
    pub fn resolve(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    Syntax(String),
    Invalid { field: String, why: String },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ParseError {
    ParseError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// Parses and validates a recipe's text.
pub fn parse(text: &str) -> Result<Recipe, ParseError> {
    let recipe: Recipe = toml::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
    validate(&recipe)?;
    Ok(recipe)
}

impl Recipe {
    pub fn base(&self) -> Base {
        if self.base == "debian" {
            Base::Debian
        } else {
            Base::Oci(self.base.clone())
        }
    }
}

fn validate(recipe: &Recipe) -> Result<(), ParseError> {
    if recipe.name == crate::image::names::DEFAULT_IMAGE || is_image_key(&recipe.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?} is taken: `default` is the built-in image, and 32 hex digits read as an image key",
                recipe.name
            ),
        ));
    }
    if !is_image_name(&recipe.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?} is not an image name (1 to 63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit)",
                recipe.name
            ),
        ));
    }
    let base_ok = recipe.base == "debian"
        || ["oci-archive:", "oci-layout:", "docker-archive:"]
            .iter()
            .any(|p| {
                recipe
                    .base
                    .strip_prefix(p)
                    .is_some_and(|rest| !rest.is_empty())
            });
    if !base_ok {
        return Err(invalid(
            "base",
            format!(
                "{:?}: use \"debian\", \"oci-archive:PATH\", \"oci-layout:DIR\" or \"docker-archive:PATH\"",
                recipe.base
            ),
        ));
    }
    let packages = &recipe.packages;
    if !packages.apt.is_empty() && recipe.base() != Base::Debian {
        return Err(invalid(
            "packages.apt",
            "Debian packages need base = \"debian\" (an OCI base may have no apt); install them in the OCI image instead",
        ));
    }
    check_list("packages.apt", &packages.apt, is_apt_package)?;
    check_list("packages.pip", &packages.pip, is_requirement)?;
    check_list("packages.npm", &packages.npm, is_requirement)?;
    if let Some(dir) = &packages.pip_wheels {
        check_host_path("packages.pip_wheels", dir)?;
    }
    bounded("files", recipe.files.len())?;
    for (i, file) in recipe.files.iter().enumerate() {
        let field = format!("files[{i}]");
        check_host_path(&format!("{field}.from"), &file.from)?;
        check_guest_path(&format!("{field}.to"), &file.to)?;
        if let Some(mode) = &file.mode {
            parse_mode(mode).ok_or_else(|| {
                invalid(
                    format!("{field}.mode"),
                    format!("{mode:?} is not an octal mode such as \"0644\""),
                )
            })?;
        }
    }
    check_list("build.run", &recipe.build.run, |c| {
        !c.trim().is_empty() && !c.contains('\0')
    })?;
    bounded("env", recipe.env.len())?;
    for (name, value) in &recipe.env {
        if !is_env_name(name) {
            return Err(invalid(
                format!("env.{name}"),
                "a variable name is letters, digits and '_', not starting with a digit",
            ));
        }
        if is_reserved_env(name) {
            return Err(invalid(
                format!("env.{name}"),
                "airlock sets this variable itself (PATH, HOME, USER, proxies, CPU policy, AIRLOCK_*)",
            ));
        }
        if value.contains('\0') || value.len() > MAX_TEXT {
            return Err(invalid(
                format!("env.{name}"),
                format!("a value has no NUL and at most {MAX_TEXT} bytes"),
            ));
        }
    }
    let warm = recipe.warm.interpreters.as_deref().unwrap_or_default();
    check_list("warm.interpreters", warm, |i| INTERPRETERS.contains(&i))?;
    check_list(
        "warm.python_imports",
        &recipe.warm.python_imports,
        is_python_module,
    )?;
    if !recipe.warm.python_imports.is_empty()
        && recipe.warm.interpreters.is_some()
        && !warm.iter().any(|i| i == "python")
    {
        return Err(invalid(
            "warm.python_imports",
            "imports are pre-loaded by the warm Python: add \"python\" to warm.interpreters",
        ));
    }
    if let Some(shape) = recipe.shape {
        if !(1..=crate::vmm::config::MAX_VCPUS).contains(&shape.vcpus) {
            return Err(invalid(
                "shape.vcpus",
                format!("between 1 and {}", crate::vmm::config::MAX_VCPUS),
            ));
        }
        let low = crate::vmm::config::MIN_MEMORY_MIB;
        let high = u32::try_from(crate::vmm::layout::MAX_MEMORY_BYTES >> 20).unwrap_or(u32::MAX);
        if !(low..=high).contains(&shape.memory_mib) {
            return Err(invalid(
                "shape.memory_mib",
                format!("between {low} and {high}"),
            ));
        }
    }
    Ok(())
}

fn bounded(field: &str, len: usize) -> Result<(), ParseError> {
    if len > MAX_ITEMS {
        return Err(invalid(field, format!("at most {MAX_ITEMS} entries")));
    }
    Ok(())
}

fn check_list(field: &str, items: &[String], ok: impl Fn(&str) -> bool) -> Result<(), ParseError> {
    bounded(field, items.len())?;
    for (i, item) in items.iter().enumerate() {
        if item.len() > MAX_TEXT || !ok(item) {
            return Err(invalid(
                format!("{field}[{i}]"),
                format!("{item:?} is not valid here"),
            ));
        }
    }
    Ok(())
}

fn check_host_path(field: &str, path: &Path) -> Result<(), ParseError> {
    if path.as_os_str().is_empty() || path.as_os_str().len() > MAX_TEXT {
        return Err(invalid(field, "an empty or overlong path"));
    }
    Ok(())
}

fn check_guest_path(field: &str, path: &Path) -> Result<(), ParseError> {
    let normal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && path.components().count() > 1;
    if !normal || path.as_os_str().len() > MAX_TEXT {
        return Err(invalid(
            field,
            format!(
                "{} must be an absolute path in the image, without '..', and not '/'",
                path.display()
            ),
        ));
    }
    Ok(())
}

pub fn parse_mode(mode: &str) -> Option<u32> {
    let digits = mode.strip_prefix("0o").unwrap_or(mode);
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

/// 32 hex digits: how `airlock image` names an image by its key.
pub fn is_image_key(text: &str) -> bool {
    text.len() == 32 && text.chars().all(|c| c.is_ascii_hexdigit())
}

pub fn is_image_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !name.contains("..")
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// Debian's package name rule, with an optional `=version`.
fn is_apt_package(spec: &str) -> bool {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let name_ok = name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+-~:".contains(c))
    });
    name_ok && version_ok
}

/// A pip or npm requirement: never an option, one printable argument (it
/// reaches pip's or npm's argv directly, never a shell).
fn is_requirement(spec: &str) -> bool {
    !spec.starts_with('-')
        && !spec.starts_with(' ')
        && !spec.is_empty()
        && spec.chars().all(|c| c.is_ascii_graphic() || c == ' ')
}

fn is_python_module(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').count() <= 16
        && name.split('.').all(|part| {
            part.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_reserved_env(name: &str) -> bool {
    const RESERVED: [&str; 15] = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "PWD",
        // The CPU policy the VMM sets for the guest's libraries.
        "GLIBC_TUNABLES",
        "OPENSSL_IA32CAP",
        "NPY_DISABLE_CPU_FEATURES",
        "OPENBLAS_CORETYPE",
        "SIMDUTF_FORCE_IMPLEMENTATION",
    ];
    let upper = name.to_ascii_uppercase();
    RESERVED.contains(&upper.as_str()) || upper.starts_with("AIRLOCK_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "data"
base = "debian"                 # or "oci-archive:PATH" / "oci-layout:DIR"
[packages]
apt = ["jq"]
pip = ["tabulate==0.9.0"]
npm = []
[warm]
python_imports = ["tabulate"]
"#;

    #[test]
    fn the_minimal_recipe_parses_as_written() {
        let recipe = parse(MINIMAL).unwrap();
        assert_eq!(recipe.name, "data");
        assert_eq!(recipe.base(), Base::Debian);
        assert_eq!(recipe.packages.apt, ["jq"]);
        assert_eq!(recipe.packages.pip, ["tabulate==0.9.0"]);
        assert_eq!(recipe.warm.python_imports, ["tabulate"]);
        assert_eq!(recipe.warm.interpreters, None);
        assert!(recipe.shape.is_none());
    }

    #[test]
    fn a_full_recipe_parses() {
        let recipe = parse(
            r#"
name = "ml-1.0"
base = "oci-archive:./python-slim.tar"
[packages]
pip = ["scikit-learn>=1.3, <2"]
pip_wheels = "wheels"
npm = ["left-pad@1.3.0"]
[[files]]
from = "conf/app.toml"
to = "/etc/app/app.toml"
mode = "0644"
[build]
run = ["echo built > /etc/built"]
[env]
MPLBACKEND = "Agg"
[warm]
interpreters = ["python", "bash"]
python_imports = ["sklearn.linear_model"]
[shape]
vcpus = 2
memory_mib = 1024
"#,
        )
        .unwrap();
        assert_eq!(
            recipe.base(),
            Base::Oci("oci-archive:./python-slim.tar".into())
        );
        assert_eq!(recipe.files[0].to, Path::new("/etc/app/app.toml"));
        assert_eq!(
            recipe.shape,
            Some(Shape {
                vcpus: 2,
                memory_mib: 1024
            })
        );
    }

    fn field_of(text: &str) -> String {
        match parse(text) {
            Err(ParseError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("name = \"Data\"", "name"),
            ("name = \"default\"", "name"),
            ("name = \"0123456789abcdef0123456789abcdef\"", "name"),
            ("name = \"x\"\nbase = \"ubuntu\"", "base"),
            (
                "name = \"x\"\n[packages]\napt = [\"-o=Dpkg::Pre-Invoke=x\"]",
                "packages.apt[0]",
            ),
            (
                "name = \"x\"\n[packages]\npip = [\"--index-url=http://evil\"]",
                "packages.pip[0]",
            ),
            (
                "name = \"x\"\n[packages]\nnpm = [\"--prefix=/\"]",
                "packages.npm[0]",
            ),
            (
                "name = \"x\"\n[[files]]\nfrom = \"a\"\nto = \"etc/x\"",
                "files[0].to",
            ),
            (
                "name = \"x\"\n[[files]]\nfrom = \"a\"\nto = \"/etc/../../x\"",
                "files[0].to",
            ),
            (
                "name = \"x\"\n[[files]]\nfrom = \"a\"\nto = \"/x\"\nmode = \"rw\"",
                "files[0].mode",
            ),
            ("name = \"x\"\n[env]\nPATH = \"/evil\"", "env.PATH"),
            ("name = \"x\"\n[env]\nAIRLOCK_X = \"1\"", "env.AIRLOCK_X"),
            (
                "name = \"x\"\n[warm]\ninterpreters = [\"ruby\"]",
                "warm.interpreters[0]",
            ),
            (
                "name = \"x\"\n[warm]\npython_imports = [\"os; import x\"]",
                "warm.python_imports[0]",
            ),
            (
                "name = \"x\"\n[warm]\ninterpreters = [\"bash\"]\npython_imports = [\"json\"]",
                "warm.python_imports",
            ),
            (
                "name = \"x\"\n[shape]\nvcpus = 0\nmemory_mib = 512",
                "shape.vcpus",
            ),
            (
                "name = \"x\"\n[shape]\nvcpus = 1\nmemory_mib = 1",
                "shape.memory_mib",
            ),
            (
                "name = \"x\"\nbase = \"oci-layout:d\"\n[packages]\napt = [\"jq\"]",
                "packages.apt",
            ),
            ("name = \"x\"\n[build]\nrun = [\"  \"]", "build.run[0]"),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(text), field, "{text}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_toml_are_syntax_errors() {
        assert!(matches!(
            parse("name = \"x\"\nimage = 1"),
            Err(ParseError::Syntax(_))
        ));
        assert!(matches!(parse("name = "), Err(ParseError::Syntax(_))));
        assert!(matches!(
            parse("[packages]\napt = []"),
            Err(ParseError::Syntax(_))
        ));
    }

    #[test]
    fn package_specs() {
        assert!(is_apt_package("jq"));
        assert!(is_apt_package("libpq5=15.4-0+deb12u1"));
        assert!(is_apt_package("g++"));
        assert!(!is_apt_package("j"));
        assert!(!is_apt_package("jq=1 2"));
        assert!(is_requirement("numpy>=1.2,<2"));
        assert!(is_requirement("@scope/pkg@1.0.0"));
        assert!(!is_requirement("-e ."));
        assert!(!is_requirement("x\ny"));
        assert_eq!(parse_mode("0755"), Some(0o755));
        assert_eq!(parse_mode("17777"), None);
    }

    #[test]
    fn an_oversized_recipe_is_refused_before_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        std::fs::write(&path, vec![b'#'; MAX_RECIPE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            RecipeFile::load(&path),
            Err(RecipeError::TooLarge { .. })
        ));
    }
}
