//! Offline tests: every name is answered by an injected resolver, nothing touches the network.

use super::address::*;
use super::pattern::*;
use super::*;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::Mutex;

/// Answers from a fixed table and records every name it is asked about.
#[derive(Default)]
struct FakeResolver {
    answers: HashMap<String, Vec<IpAddr>>,
    calls: Mutex<Vec<String>>,
}

impl FakeResolver {
    fn answering(name: &str, addresses: &[&str]) -> FakeResolver {
        let mut resolver = FakeResolver::default();
        resolver
            .answers
            .insert(name.to_string(), addresses.iter().map(|a| ip(a)).collect());
        resolver
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Resolver for FakeResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        self.calls.lock().unwrap().push(name.to_string());
        (self.answers.get(name).cloned())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
    }
}

/// For decisions that must never reach the resolver.
struct PanickingResolver;

impl Resolver for PanickingResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        panic!("resolver asked about {name}")
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn sockets(addresses: &[&str], port: u16) -> Vec<SocketAddr> {
    addresses
        .iter()
        .map(|a| SocketAddr::new(ip(a), port))
        .collect()
}

fn policy_with(patterns: &[&str], hosts: HostsMap, own: &[&str]) -> Policy {
    let allow = Allowlist::parse(patterns.iter().copied()).unwrap();
    Policy::new(allow, Arc::new(hosts), own.iter().map(|a| ip(a)).collect())
}

fn policy(patterns: &[&str]) -> Policy {
    policy_with(patterns, HostsMap::empty(), &[])
}

fn pattern_problem(pattern: &str) -> String {
    Entry::from_str(pattern).unwrap_err().to_string()
}

/// How a guest would write the address as a host: IPv6 in brackets.
fn as_host(address: &str) -> String {
    if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_string()
    }
}

/// The entry that covers exactly this address.
fn single_entry(address: &str) -> String {
    as_host(address)
}

const OWN_ADDRESS: &str = "8.8.4.4";
const INTERNAL: [&str; 12] = [
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "169.254.169.254",
    "127.0.0.1",
    "0.0.0.0",
    "::1",
    "fc00::1",
    "fd12::1",
    "fe80::1",
    OWN_ADDRESS,
];

#[test]
fn internal_literals_are_refused_without_a_covering_entry() {
    let policy = policy_with(&["example.com"], HostsMap::empty(), &[OWN_ADDRESS]);
    for address in INTERNAL {
        let host = as_host(address);
        assert_eq!(
            policy.decide(&host, 443, &PanickingResolver),
            Err(Refusal::NotAllowed { host, port: 443 }),
            "{address}"
        );
    }
    // Bare IPv6 is accepted as a host too.
    assert!(policy.decide("fd12::1", 443, &PanickingResolver).is_err());
}

#[test]
fn internal_resolver_answers_are_refused_for_an_allowed_name() {
    let policy = policy_with(&["example.com"], HostsMap::empty(), &[OWN_ADDRESS]);
    for address in INTERNAL {
        let resolver = FakeResolver::answering("example.com", &[address]);
        assert_eq!(
            policy.decide("example.com", 443, &resolver),
            Err(Refusal::PrivateAddress {
                host: "example.com".into(),
                addresses: vec![ip(address)],
            }),
            "{address}"
        );
    }
}

#[test]
fn an_explicit_entry_allows_internal_addresses() {
    for address in INTERNAL {
        let entry = single_entry(address);
        let policy = policy_with(&["example.com", &entry], HostsMap::empty(), &[OWN_ADDRESS]);
        let expected = Ok(sockets(&[address], 443));
        assert_eq!(
            policy.decide(&as_host(address), 443, &PanickingResolver),
            expected,
            "{address}"
        );
        let resolver = FakeResolver::answering("example.com", &[address]);
        assert_eq!(
            policy.decide("example.com", 443, &resolver),
            expected,
            "{address}"
        );
    }
    let networks = policy(&["10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "fc00::/7"]);
    for address in ["10.1.2.3", "127.0.0.1", "169.254.169.254", "fd12::1"] {
        let decision = networks.decide(&as_host(address), 80, &PanickingResolver);
        assert_eq!(decision, Ok(sockets(&[address], 80)), "{address}");
    }
}

#[test]
fn public_addresses_pass_and_private_boundaries_hold() {
    let policy = policy(&["example.com", "172.32.0.0/16", "8.8.8.8"]);
    for address in ["172.32.0.1", "8.8.8.8"] {
        let decision = policy.decide(address, 443, &PanickingResolver);
        assert_eq!(decision, Ok(sockets(&[address], 443)), "{address}");
    }
    for address in ["172.15.255.255", "172.32.0.1", "8.8.8.8"] {
        let resolver = FakeResolver::answering("example.com", &[address]);
        let decision = policy.decide("example.com", 443, &resolver);
        assert_eq!(decision, Ok(sockets(&[address], 443)), "{address}");
    }
    // Public literals still need an entry.
    let decision = policy.decide("1.1.1.1", 443, &PanickingResolver);
    assert!(matches!(decision, Err(Refusal::NotAllowed { .. })));
    for (address, special) in [
        ("172.15.255.255", false),
        ("172.16.0.0", true),
        ("172.31.255.255", true),
        ("172.32.0.0", false),
    ] {
        assert_eq!(is_special(ip(address)), special, "{address}");
    }
}

#[test]
fn special_ranges_match_their_edges() {
    let special = [
        "0.0.0.0",
        "0.255.255.255",
        "10.255.255.255",
        "100.64.0.0",
        "100.127.255.255",
        "127.255.255.255",
        "169.254.0.0",
        "192.0.0.255",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.255.255",
        "198.18.0.0",
        "198.19.255.255",
        "198.51.100.1",
        "203.0.113.255",
        "224.0.0.1",
        "239.255.255.255",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "64:ff9b:1::1",
        "100::1",
        "2001::1",
        "2001:1ff:ffff::1",
        "2001:db8::1",
        "fc00::1",
        "fdff::1",
        "fe80::1",
        "febf::1",
        "fec0::1",
        "ff02::1",
        "3fff::1",
        "::ffff:10.0.0.1",
        "::10.0.0.1",
    ];
    for address in special {
        assert!(is_special(ip(address)), "{address} should be special");
    }
    let public = [
        "1.1.1.1",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "192.0.1.0",
        "192.0.3.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2001:200::1",
        "2001:db9::1",
        "2606:4700::1111",
        "2a00:1450::1",
    ];
    for address in public {
        assert!(!is_special(ip(address)), "{address} should be public");
    }
}

#[test]
fn dns_rebinding_onto_internal_addresses_is_refused() {
    let policy = policy(&["example.com"]);
    let resolver = FakeResolver::answering("example.com", &["10.0.0.5"]);
    assert_eq!(
        policy.decide("example.com", 443, &resolver),
        Err(Refusal::PrivateAddress {
            host: "example.com".into(),
            addresses: vec![ip("10.0.0.5")],
        })
    );
    let resolver = FakeResolver::answering("example.com", &["93.184.216.34", "127.0.0.1"]);
    assert_eq!(
        policy.decide("example.com", 443, &resolver),
        Ok(sockets(&["93.184.216.34"], 443))
    );
}

#[test]
fn answers_are_canonical_deduplicated_and_in_resolver_order() {
    let policy = policy(&["example.com"]);
    let resolver = FakeResolver::answering(
        "example.com",
        &[
            "2606:4700::1",
            "::ffff:1.1.1.1",
            "10.0.0.1",
            "1.1.1.1",
            "2606:4700::1",
        ],
    );
    assert_eq!(
        policy.decide("example.com", 443, &resolver),
        Ok(sockets(&["2606:4700::1", "1.1.1.1"], 443))
    );
}

#[test]
fn denied_and_malformed_names_are_never_resolved() {
    let policy = policy(&["api.example.com:443", "*.pythonhosted.org"]);
    let resolver = FakeResolver::answering("evil.com", &["1.2.3.4"]);
    for (host, port) in [
        ("evil.com", 443),
        ("api.example.com", 80),
        ("pythonhosted.org", 443),
        ("example.com", 443),
        ("bad..name", 443),
        ("api.example.com", 0),
    ] {
        assert!(policy.decide(host, port, &resolver).is_err(), "{host}");
    }
    assert_eq!(resolver.calls(), Vec::<String>::new());
}

#[test]
fn ipv4_mapped_and_compatible_literals_are_the_ipv4_inside() {
    let none = policy(&["example.com"]);
    let loopback = policy(&["127.0.0.0/8", "169.254.169.254"]);
    for host in [
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[::ffff:169.254.169.254]",
    ] {
        let decision = none.decide(host, 80, &PanickingResolver);
        assert!(
            matches!(decision, Err(Refusal::NotAllowed { .. })),
            "{host}"
        );
        let decision = loopback.decide(host, 80, &PanickingResolver).unwrap();
        assert!(decision[0].is_ipv4(), "{host} connects over IPv4");
    }
    for answer in ["::ffff:127.0.0.1", "::ffff:a9fe:a9fe", "::7f00:1"] {
        let resolver = FakeResolver::answering("example.com", &[answer]);
        let decision = none.decide("example.com", 443, &resolver);
        assert!(
            matches!(decision, Err(Refusal::PrivateAddress { .. })),
            "{answer}"
        );
    }
}

#[test]
fn inet_aton_spellings_are_ip_literals() {
    let none = policy(&["example.com"]);
    let loopback = policy(&["127.0.0.0/8"]);
    for host in [
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "0177.0.0.1",
        "127.1",
        "0x7f.0.0.1",
        "127.0.1",
        "127.0.0.1.",
        "0177.0x0.00.1",
        "0000000177.1",
    ] {
        let decision = none.decide(host, 80, &PanickingResolver);
        assert!(
            matches!(decision, Err(Refusal::NotAllowed { .. })),
            "{host}"
        );
        let decision = loopback.decide(host, 80, &PanickingResolver);
        assert_eq!(decision, Ok(sockets(&["127.0.0.1"], 80)), "{host}");
    }
    assert_eq!(
        parse_inet_aton("1.16777215"),
        Some(Ipv4Addr::new(1, 255, 255, 255))
    );
    assert_eq!(
        parse_inet_aton("1.2.65535"),
        Some(Ipv4Addr::new(1, 2, 255, 255))
    );
    assert_eq!(parse_inet_aton("4294967295"), Some(Ipv4Addr::BROADCAST));
    for name in [
        "2130706433",
        "127.1",
        "0x7f.1",
        "0177.0.0.1",
        "*.1",
        "host.0x7f",
    ] {
        let problem = pattern_problem(name);
        assert!(problem.contains("IP address spelling"), "{name}: {problem}");
    }
}

#[test]
fn numbers_that_are_not_addresses_are_malformed() {
    let policy = policy(&["0.0.0.0/0", "example.com"]);
    for host in [
        "1.2.3.999",
        "foo.123",
        "foo.0x1f",
        "256.0.0.1",
        "08.0.0.1",
        "0x",
        "1.2.3.4.5",
        "4294967296",
        "1.16777216",
        "1..2",
        "1.2.3.4:80",
    ] {
        let decision = policy.decide(host, 80, &PanickingResolver);
        assert_eq!(decision, Err(Refusal::Malformed { host: host.into() }));
    }
}

#[test]
fn malformed_hosts_are_refused() {
    let policy = policy(&["example.com", "::/0"]);
    for host in [
        "",
        ".",
        "exa mple.com",
        "ünïcode.com",
        "a..b",
        "-a.com",
        "a-.com",
        "under*score.com",
        "[::1",
        "[fe80::1%eth0]",
        "fe80::1%eth0",
        "[127.0.0.1]",
        "example.com/",
        &"a".repeat(64),
        &format!("{}.com", "a.".repeat(125)),
    ] {
        let decision = policy.decide(host, 80, &PanickingResolver);
        assert_eq!(decision, Err(Refusal::Malformed { host: host.into() }));
    }
}

#[test]
fn nat64_and_6to4_embedding_internal_ipv4_are_refused() {
    let policy = policy(&["example.com"]);
    for (answer, allowed) in [
        ("64:ff9b::a00:1", false),
        ("64:ff9b::7f00:1", false),
        ("64:ff9b::a9fe:a9fe", false),
        ("64:ff9b:1::808:808", false),
        ("2002:a00:1::1", false),
        ("2002:c0a8:101::", false),
        ("64:ff9b::808:808", true),
        ("2002:808:808::1", true),
    ] {
        let resolver = FakeResolver::answering("example.com", &[answer]);
        let decision = policy.decide("example.com", 443, &resolver);
        assert_eq!(decision.is_ok(), allowed, "{answer}");
        assert_eq!(is_special(ip(answer)), !allowed, "{answer}");
    }
}

#[test]
fn wildcards_match_strictly_below_their_suffix() {
    let policy = policy(&["*.pythonhosted.org"]);
    let resolver = FakeResolver::answering("files.pythonhosted.org", &["151.101.0.223"]);
    for host in ["files.pythonhosted.org", "FILES.PythonHosted.org."] {
        let decision = policy.decide(host, 443, &resolver);
        assert_eq!(decision, Ok(sockets(&["151.101.0.223"], 443)), "{host}");
    }
    let resolver = FakeResolver::answering("a.b.pythonhosted.org", &["151.101.0.223"]);
    assert!(
        policy
            .decide("a.b.pythonhosted.org", 443, &resolver)
            .is_ok()
    );
    for host in [
        "pythonhosted.org",
        "evilpythonhosted.org",
        "pythonhosted.org.evil.com",
    ] {
        let decision = policy.decide(host, 443, &PanickingResolver);
        assert!(
            matches!(decision, Err(Refusal::NotAllowed { .. })),
            "{host}"
        );
    }
}

#[test]
fn exact_names_are_normalised() {
    let policy = policy(&["PyPI.org."]);
    let resolver = FakeResolver::answering("pypi.org", &["151.101.0.223"]);
    assert!(policy.decide("PYPI.ORG", 443, &resolver).is_ok());
    assert!(policy.decide("pypi.org.", 443, &resolver).is_ok());
    assert_eq!(resolver.calls(), ["pypi.org", "pypi.org"]);
    let decision = policy.decide("www.pypi.org", 443, &PanickingResolver);
    assert!(decision.is_err());
}

#[test]
fn ports_restrict_only_entries_that_name_one() {
    let policy = policy(&[
        "api.example.com:443",
        "api.example.com:8443",
        "any.example.com",
        "*.cdn.example.com:443",
        "8.8.8.0/24:53",
        "[2606:4700::1111]:443",
    ]);
    let resolver = FakeResolver {
        answers: ["api.example.com", "any.example.com", "x.cdn.example.com"]
            .into_iter()
            .map(|name| (name.to_string(), vec![ip("93.184.216.34")]))
            .collect(),
        ..FakeResolver::default()
    };
    for (host, port, allowed) in [
        ("api.example.com", 443, true),
        ("api.example.com", 8443, true),
        ("api.example.com", 80, false),
        ("any.example.com", 1, true),
        ("any.example.com", 65535, true),
        ("x.cdn.example.com", 443, true),
        ("x.cdn.example.com", 80, false),
        ("8.8.8.8", 53, true),
        ("8.8.8.8", 443, false),
        ("[2606:4700::1111]", 443, true),
        ("2606:4700::1111", 80, false),
    ] {
        let decision = policy.decide(host, port, &resolver);
        assert_eq!(decision.is_ok(), allowed, "{host}:{port}");
    }
}

#[test]
fn a_port_restricted_network_does_not_unlock_internal_answers_on_other_ports() {
    let policy = policy(&["db.internal.example", "10.0.0.0/8:5432"]);
    let resolver = FakeResolver::answering("db.internal.example", &["10.1.1.1"]);
    let allowed = policy.decide("db.internal.example", 5432, &resolver);
    assert_eq!(allowed, Ok(sockets(&["10.1.1.1"], 5432)));
    let refused = policy.decide("db.internal.example", 22, &resolver);
    assert!(matches!(refused, Err(Refusal::PrivateAddress { .. })));
}

#[test]
fn hosts_map_answers_allowed_names_without_the_resolver() {
    let hosts = HostsMap::parse(
        "# operator overrides\n\
         127.0.0.1 Mirror.Example.  other.example\n\
         \n\
         ::1 mirror.example # and its IPv6\n\
         127.0.0.1 mirror.example\n",
    )
    .unwrap();
    assert_eq!(
        hosts.lookup("mirror.example"),
        Some(&[ip("127.0.0.1"), ip("::1")][..])
    );
    let policy = policy_with(&["mirror.example"], hosts, &[]);
    assert_eq!(
        policy.decide("mirror.example", 8080, &PanickingResolver),
        Ok(sockets(&["127.0.0.1", "::1"], 8080))
    );
    // Being in the hosts map does not make a name allowed.
    let decision = policy.decide("other.example", 8080, &PanickingResolver);
    assert!(matches!(decision, Err(Refusal::NotAllowed { .. })));
}

#[test]
fn hosts_file_errors_name_the_line() {
    for (text, line, problem) in [
        ("127.0.0.1 ok\nnot-an-ip name\n", 2, "is not an IP address"),
        ("# c\n\n10.0.0.1\n", 3, "no name"),
        ("10.0.0.1 bad..name\n", 1, "empty label"),
        ("10.0.0.1 ok\n\n\n10.0.0.2 ünï.com\n", 4, "punycode"),
        ("10.0.0.1 127.1\n", 1, "IP address spelling"),
        ("fe80::1%eth0 zoned\n", 1, "is not an IP address"),
    ] {
        let error = HostsMap::parse(text).unwrap_err();
        assert_eq!(error.line, line, "{text:?}");
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("hosts file line {line}: ")),
            "{message}"
        );
        assert!(message.contains(problem), "{message}");
    }
    assert!(HostsMap::parse("").unwrap().lookup("x").is_none());
}

#[test]
fn bad_patterns_say_what_is_wrong() {
    for (pattern, problem) in [
        ("*", "`*` would allow everything"),
        ("*:443", "`*` would allow everything"),
        ("10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("10.0.0.0/33", "prefix must be a number from 0 to 32"),
        ("10.0.0.0/", "prefix"),
        ("2001:db8::/32:443", "cannot take a port"),
        ("a..b", "empty label"),
        ("ünïcode.com", "punycode (xn--)"),
        ("host:0", "port \"0\" is not a number from 1 to 65535"),
        ("host:70000", "port \"70000\""),
        ("host:", "port \"\""),
        ("host:+1", "port \"+1\""),
        ("", "empty pattern"),
        ("   ", "empty pattern"),
        ("foo.*.com", "whole first label"),
        ("*foo.com", "whole first label"),
        ("-foo.com", "starts or ends with '-'"),
        ("foo bar.com", "not allowed in a name"),
        ("[2001:db8::1", "missing ']'"),
        ("[10.0.0.1]", "is not an IPv6 address"),
        ("[2001:db8::1]/64", "unexpected"),
        ("2001:db8::1:443:x", "not an IPv6 address"),
        ("*.", "empty name"),
    ] {
        let message = pattern_problem(pattern);
        assert!(message.contains(problem), "{pattern:?}: {message}");
    }
    let long_label = format!("{}.com", "a".repeat(64));
    assert!(pattern_problem(&long_label).contains("longer than 63"));
    let long_name = format!("{}com", "a.".repeat(126));
    assert!(pattern_problem(&long_name).contains("longer than 253"));
    assert!(Allowlist::parse(["pypi.org", "*", "x.org"]).is_err());
}

#[test]
fn entries_display_in_canonical_form_and_round_trip() {
    for (pattern, canonical_form) in [
        ("PyPI.org.", "pypi.org"),
        ("  api.example.com:443 ", "api.example.com:443"),
        ("*.PythonHosted.org", "*.pythonhosted.org"),
        ("*.com:8443", "*.com:8443"),
        ("203.0.113.7", "203.0.113.7"),
        ("203.0.113.7:443", "203.0.113.7:443"),
        ("203.0.113.0/24", "203.0.113.0/24"),
        ("203.0.113.0/24:443", "203.0.113.0/24:443"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("[::ffff:10.0.0.1]:443", "10.0.0.1:443"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("::ffff:a00:0/104", "10.0.0.0/8"),
        ("under_score.example", "under_score.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ] {
        let entry: Entry = pattern.parse().unwrap();
        assert_eq!(entry.to_string(), canonical_form, "{pattern:?}");
        assert_eq!(canonical_form.parse::<Entry>().unwrap(), entry);
    }
}

#[test]
fn canonical_unwraps_embedded_ipv4_only() {
    for (from, to) in [
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::10.0.0.1", "10.0.0.1"),
        ("::", "::"),
        ("::1", "::1"),
        ("64:ff9b::a00:1", "64:ff9b::a00:1"),
        ("2001:db8::1", "2001:db8::1"),
        ("10.0.0.1", "10.0.0.1"),
    ] {
        assert_eq!(canonical(ip(from)), ip(to), "{from}");
    }
}

#[test]
fn own_addresses_are_compared_in_canonical_form() {
    let policy = policy_with(&["example.com"], HostsMap::empty(), &["::ffff:8.8.4.4"]);
    let resolver = FakeResolver::answering("example.com", &["8.8.4.4"]);
    let decision = policy.decide("example.com", 443, &resolver);
    assert!(matches!(decision, Err(Refusal::PrivateAddress { .. })));
}

#[test]
fn resolution_failures_are_not_policy_decisions() {
    let policy = policy(&["example.com", "empty.example.com"]);
    let resolver = FakeResolver::answering("empty.example.com", &[]);
    let failed = policy.decide("example.com", 443, &resolver).unwrap_err();
    assert_eq!(
        failed.to_string(),
        "example.com does not resolve: no such host"
    );
    assert!(!failed.is_policy());
    let empty = policy
        .decide("empty.example.com", 443, &resolver)
        .unwrap_err();
    assert!(matches!(empty, Refusal::Unresolvable { .. }));
    assert!(!empty.is_policy());
}

#[test]
fn refusal_messages() {
    let not_allowed = Refusal::NotAllowed {
        host: "evil.com".into(),
        port: 443,
    };
    assert_eq!(not_allowed.to_string(), "evil.com is not allowed");
    assert!(not_allowed.is_policy());
    let private = Refusal::PrivateAddress {
        host: "example.com".into(),
        addresses: vec![ip("10.0.0.5"), ip("::1")],
    };
    assert_eq!(
        private.to_string(),
        "example.com resolves only to addresses that are not allowed (10.0.0.5, ::1)"
    );
    let many = Refusal::PrivateAddress {
        host: "x.com".into(),
        addresses: (1..=6)
            .map(|n| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
            .collect(),
    };
    assert_eq!(
        many.to_string(),
        "x.com resolves only to addresses that are not allowed \
         (10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4, …)"
    );
    let malformed = Refusal::Malformed {
        host: "a b\n".into(),
    };
    assert_eq!(malformed.to_string(), "\"a b\\n\" is not a valid host name");
    assert!(malformed.is_policy());
}

#[test]
fn empty_allowlist_allows_nothing() {
    let empty = policy(&[]);
    assert!(empty.allows_nothing());
    assert!(
        empty
            .decide("example.com", 443, &PanickingResolver)
            .is_err()
    );
    assert!(empty.decide("0.0.0.0", 443, &PanickingResolver).is_err());
    let one = policy(&["example.com", "example.com"]);
    assert!(!one.allows_nothing());
    assert_eq!(
        Allowlist::parse(["a.com", "a.com", "10.0.0.0/8"])
            .unwrap()
            .len(),
        3
    );
    assert!(Allowlist::new(Vec::new()).is_empty());
}

#[test]
fn a_large_allowlist_is_a_hash_lookup() {
    let names: Vec<String> = (0..100_000)
        .map(|n| format!("host{n}.example.com"))
        .collect();
    let wildcards: Vec<String> = (0..100_000)
        .map(|n| format!("*.zone{n}.example.net"))
        .collect();
    let allow = Allowlist::parse(names.iter().chain(&wildcards).map(String::as_str)).unwrap();
    assert_eq!(allow.len(), 200_000);
    let policy = Policy::new(allow, Arc::new(HostsMap::empty()), Vec::new());
    let resolver = FakeResolver {
        answers: ["host99999.example.com", "a.b.zone77777.example.net"]
            .into_iter()
            .map(|name| (name.to_string(), vec![ip("93.184.216.34")]))
            .collect(),
        ..FakeResolver::default()
    };
    assert!(
        policy
            .decide("host99999.example.com", 443, &resolver)
            .is_ok()
    );
    assert!(
        policy
            .decide("a.b.zone77777.example.net", 443, &resolver)
            .is_ok()
    );
    assert!(
        policy
            .decide("host100000.example.com", 443, &resolver)
            .is_err()
    );
    assert!(policy.decide("zone1.example.net", 443, &resolver).is_err());
    assert_eq!(resolver.calls().len(), 2);
}

unsafe extern "C" {
    /// glibc's own parser, to compare against: pure string parsing, no network.
    fn inet_aton(text: *const std::ffi::c_char, out: *mut libc::in_addr) -> std::ffi::c_int;
}

fn glibc_inet_aton(text: &str) -> Option<Ipv4Addr> {
    let text = std::ffi::CString::new(text).unwrap();
    let mut out = libc::in_addr { s_addr: 0 };
    // SAFETY: a NUL-terminated string and a valid out pointer.
    let ok = unsafe { inet_aton(text.as_ptr(), &mut out) } != 0;
    ok.then(|| Ipv4Addr::from(u32::from_be(out.s_addr)))
}

#[test]
fn inet_aton_agrees_with_glibc() {
    let mut spellings: Vec<String> = [
        "0",
        "00",
        "08",
        "0x",
        "0x0",
        "0xg",
        "1.",
        ".1",
        "1..1",
        "255.255.255.255",
        "256.1",
        "1.256.1",
        "1.2.3.256",
        "1.2.65536",
        "4294967295",
        "4294967296",
        "0xffffffff",
        "0x100000000",
        "037777777777",
        "040000000000",
        "0x7f.0x0.0x0.0x1",
        "00000000000000000000001",
        "1.2.3.4.5",
        "0xFF.1",
    ]
    .map(String::from)
    .into();
    // Deterministic pseudo-random strings over the characters that matter.
    let alphabet = b"0123456789xXaAfF.";
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..50_000 {
        let mut spelling = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for _ in 0..(state % 14 + 1) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            spelling.push(char::from(
                alphabet[(state % alphabet.len() as u64) as usize],
            ));
        }
        spellings.push(spelling);
    }
    for spelling in spellings {
        let ours = parse_inet_aton(&spelling.to_ascii_lowercase());
        assert_eq!(ours, glibc_inet_aton(&spelling), "{spelling:?}");
    }
}
