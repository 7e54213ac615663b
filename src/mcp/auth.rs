//! Bearer-token authentication for HTTP mode.
//!
//! Tokens come from a file (`--tokens-file`) or the `AIRLOCK_TOKENS`
//! environment variable: one per line (or comma-separated in the variable),
//! either `principal:token` or a bare token. The principal names the tenant:
//! sandboxes belong to it, and its limits count them. A bare token gets a
//! principal derived from a hash of the token, so the token never shows in
//! logs or metrics.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// Shortest token accepted: guessing must be hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who is calling, as established by the auth middleware and read by tools
/// from the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(pub String);

impl Principal {
    /// The caller when no tokens are configured (loopback or explicitly
    /// insecure), and of the stdio server.
    pub fn anonymous() -> Principal {
        Principal("anonymous".into())
    }
}

/// The configured tokens, hashed.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Arc<Vec<([u8; 32], Principal)>>,
}

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Parses `principal:token` or `token` entries, one per line; blank lines
    /// and lines starting with `#` are skipped.
    pub fn parse(text: &str, source: &str) -> Result<Tokens> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (principal, token) = match line.split_once(':') {
                Some((p, t)) => (p.trim().to_string(), t.trim()),
                None => (String::new(), line),
            };
            if token.len() < MIN_TOKEN_LEN {
                bail!(
                    "{source} line {}: tokens must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 24`)",
                    n + 1
                );
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                bail!("{source} line {}: a token cannot contain spaces", n + 1);
            }
            let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
            let principal = if principal.is_empty() {
                let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
                format!("token-{hex}")
            } else {
                principal
            };
            if entries.iter().any(|(h, _)| *h == hash) {
                bail!("{source} line {}: the same token appears twice", n + 1);
            }
            entries.push((hash, Principal(principal)));
        }
        Ok(Tokens {
            entries: Arc::new(entries),
        })
    }

    /// Tokens from `file` if given, else from `AIRLOCK_TOKENS` (lines or
    /// commas), else none.
    pub fn load(file: Option<&Path>, env: Option<&str>) -> Result<Tokens> {
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read the tokens file {}", file.display()))?;
            let tokens = Tokens::parse(&text, &file.display().to_string())?;
            if tokens.is_empty() {
                bail!("the tokens file {} holds no token", file.display());
            }
            return Ok(tokens);
        }
        match env {
            Some(value) if !value.trim().is_empty() => {
                Tokens::parse(&value.replace(',', "\n"), "AIRLOCK_TOKENS")
            }
            _ => Ok(Tokens::default()),
        }
    }

    /// These tokens and `more`; the same token twice is an error.
    pub fn merged(self, more: Tokens, source: &str) -> Result<Tokens> {
        let mut entries = Arc::unwrap_or_clone(self.entries);
        for (hash, principal) in more.entries.iter() {
            if entries.iter().any(|(h, _)| h == hash) {
                bail!(
                    "{source}: principal {}'s token is also given elsewhere",
                    principal.0
                );
            }
            entries.push((*hash, principal.clone()));
        }
        Ok(Tokens {
            entries: Arc::new(entries),
        })
    }

    /// The principal of `token`, comparing hashes in constant time.
    pub fn check(&self, token: &str) -> Option<Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (h, principal) in self.entries.iter() {
            let diff = h
                .iter()
                .zip(hash.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 {
                found = Some(principal.clone());
            }
        }
        found
    }
}

/// Axum middleware: with tokens configured, a request needs
/// `Authorization: Bearer <token>`; it then carries its [`Principal`] in its
/// extensions. Without tokens every request is [`Principal::anonymous`].
pub async fn require_token(
    State(tokens): State<Tokens>,
    mut request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let principal = if tokens.is_empty() {
        Some(Principal::anonymous())
    } else {
        request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .and_then(|token| tokens.check(token))
    };
    match principal {
        Some(principal) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        None => {
            let has_header = request.headers().contains_key(http::header::AUTHORIZATION);
            let challenge = if has_header {
                r#"Bearer realm="airlock", error="invalid_token", error_description="the token is not valid""#
            } else {
                r#"Bearer realm="airlock""#
            };
            (
                http::StatusCode::UNAUTHORIZED,
                [(http::header::WWW_AUTHENTICATE, challenge)],
                "airlock: a valid bearer token is required (Authorization: Bearer <token>)\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_and_bare_tokens() {
        let tokens = Tokens::parse(
            "# comment\nalice:0123456789abcdef0123\n\n  fedcba9876543210fedc  \n",
            "test",
        )
        .unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.check("0123456789abcdef0123"),
            Some(Principal("alice".into()))
        );
        let bare = tokens.check("fedcba9876543210fedc").unwrap();
        assert!(
            bare.0.starts_with("token-") && !bare.0.contains("fedcba"),
            "{bare:?}"
        );
        assert_eq!(tokens.check("0123456789abcdef012"), None);
        assert_eq!(tokens.check(""), None);
    }

    #[test]
    fn refuses_weak_or_duplicate_tokens() {
        assert!(Tokens::parse("bob:short", "t").is_err());
        assert!(Tokens::parse("0123456789abcdef0123\nx:0123456789abcdef0123", "t").is_err());
        assert!(Tokens::parse("a:0123456789abcdef 0123", "t").is_err());
    }

    #[test]
    fn env_accepts_commas() {
        let tokens =
            Tokens::load(None, Some("a:0123456789abcdef0123,b:abcdefabcdefabcdefab")).unwrap();
        assert_eq!(
            tokens.check("abcdefabcdefabcdefab"),
            Some(Principal("b".into()))
        );
        assert!(Tokens::load(None, None).unwrap().is_empty());
    }
}
