//! Finds the Debian mirror this machine already uses, from its apt sources.

use std::path::Path;

use anyhow::{Result, bail};

/// The mirror for `suite`: `$AIRLOCK_DEBIAN_MIRROR`, else the first apt source
/// that serves `suite` with the `main` component.
pub fn find_mirror(suite: &str) -> Result<String> {
    if let Ok(mirror) = std::env::var("AIRLOCK_DEBIAN_MIRROR")
        && !mirror.is_empty()
    {
        return Ok(mirror);
    }
    let mut texts = Vec::new();
    let sources = Path::new("/etc/apt/sources.list");
    if let Ok(text) = std::fs::read_to_string(sources) {
        texts.push((false, text));
    }
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let deb822 = path.extension().is_some_and(|e| e == "sources");
            let list = path.extension().is_some_and(|e| e == "list");
            if (deb822 || list)
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                texts.push((deb822, text));
            }
        }
    }
    for (deb822, text) in &texts {
        let found = if *deb822 {
            mirror_in_deb822(text, suite)
        } else {
            mirror_in_one_line(text, suite)
        };
        if let Some(uri) = found {
            return Ok(uri);
        }
    }
    bail!(
        "no apt source on this machine serves Debian {suite} (main); add one to \
         /etc/apt/sources.list, or set AIRLOCK_DEBIAN_MIRROR to a Debian mirror URL"
    )
}

/// `deb [options] URI SUITE COMPONENTS...` lines.
fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']')?.1.trim_start(),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        let line_suite = words.next()?;
        (line_suite == suite && words.any(|c| c == "main") && is_http(uri)).then(|| uri.to_string())
    })
}

/// deb822 stanzas with Types, URIs, Suites and Components fields.
fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_string())
            })
        };
        let enabled = field("Enabled").is_none_or(|v| v != "no");
        let is_deb = field("Types")?.split_whitespace().any(|t| t == "deb");
        let has_suite = field("Suites")?.split_whitespace().any(|s| s == suite);
        let has_main = field("Components")?.split_whitespace().any(|c| c == "main");
        let uris = field("URIs")?;
        let uri = uris.split_whitespace().find(|u| is_http(u))?;
        (enabled && is_deb && has_suite && has_main).then(|| uri.to_string())
    })
}

fn is_http(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_stanza_with_suite() {
        let text = "Types: deb\n# comment\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").as_deref(),
            Some("http://deb.example/debian")
        );
        assert_eq!(mirror_in_deb822(text, "trixie"), None);
    }

    #[test]
    fn deb822_disabled_or_wrong_component_is_skipped() {
        let text = "Types: deb\nURIs: http://a/debian\nSuites: bookworm\nComponents: contrib\n\nTypes: deb\nURIs: http://b/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n";
        assert_eq!(mirror_in_deb822(text, "bookworm"), None);
    }

    #[test]
    fn one_line_format_with_options() {
        let text = "# deb http://old/debian bookworm main\ndeb-src http://src/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\n";
        assert_eq!(
            mirror_in_one_line(text, "bookworm").as_deref(),
            Some("http://m/debian")
        );
        assert_eq!(
            mirror_in_one_line("deb https://x/debian bookworm-security main\n", "bookworm"),
            None
        );
    }
}
