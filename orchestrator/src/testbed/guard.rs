//! The testbed's guard: does a patch slice's service try to take over a shared service?
//!
//! Two ways a slice can try, and what tells:
//! - [`takeover`]: what the slice's service said when the host looked at its port from
//!   outside (the probe's evidence) announces a shared service's identity: a
//!   `GlueServiceUniqueID` (or `GlueServiceEndpoint`, `GlueServiceName`) that is the
//!   shared service's name, its `NAME:PORT` or its endpoint; a `dn:` with an RDN whose
//!   value is one of those (`mds-vo-name=testbed-bdii.certo,o=grid`); or a banner whose
//!   first word is the shared name or endpoint. Mentioning a shared service elsewhere (a
//!   client naming the top BDII it uses) is not a claim.
//! - [`registration_refusal`] / [`refused_registration`]: the guest API refused to
//!   register a slice's service under a shared service's name or endpoint; the refusal
//!   says `testbed: ...` naming the shared service, the harness logs it and the VM's
//!   reason keeps it.
//!
//! Both return one line a certifier understands, naming the shared service; neither
//! starts with `testbed:` (the caller says where the line comes from).

use crate::store::ServiceRow;

/// What starts the text of a refused registration (the guest API's answer, the VM's reason).
pub const REFUSAL_PREFIX: &str = "testbed: ";

/// Most characters of the evidence line quoted in a takeover's line.
const QUOTE_MAX: usize = 200;

/// The identities one shared service goes by: its name, `NAME:PORT` and its endpoint.
struct Identity<'a> {
    name: &'a str,
    name_port: Option<String>,
    endpoint: &'a str,
}

impl<'a> Identity<'a> {
    fn of(service: &'a ServiceRow) -> Self {
        let port = service
            .endpoint
            .rsplit_once(':')
            .map(|(_, p)| p)
            .filter(|p| p.parse::<u16>().is_ok());
        Identity {
            name: &service.name,
            name_port: port.map(|p| format!("{}:{p}", service.name)),
            endpoint: &service.endpoint,
        }
    }

    /// Whether `value` (an attribute's value, an RDN's, a banner's first word) is this
    /// service: its name, `NAME:PORT`, its endpoint, or a URL or `HOST:PORT` on its name.
    fn is(&self, value: &str) -> bool {
        let v = value.trim().trim_end_matches('/');
        if v.is_empty() {
            return false;
        }
        let same = |a: &str| a.eq_ignore_ascii_case(v);
        if same(self.name) || same(self.endpoint) || self.name_port.as_deref().is_some_and(same) {
            return true;
        }
        // ldap://NAME:PORT/..., NAME:PORT of another port: the host part is the name.
        // ldap://ENDPOINT/...: the authority is the endpoint.
        let rest = v.split_once("://").map_or(v, |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or("");
        let host = authority.split(':').next().unwrap_or("");
        host.eq_ignore_ascii_case(self.name) || same_as(authority, self.endpoint)
    }
}

fn same_as(a: &str, b: &str) -> bool {
    !a.is_empty() && a.eq_ignore_ascii_case(b)
}

/// Attributes that say which service this is (LDIF `Attr: value` or `Attr=value`).
const IDENTITY_ATTRIBUTES: [&str; 3] = [
    "GlueServiceUniqueID",
    "GlueServiceEndpoint",
    "GlueServiceName",
];

/// Whether one line of what a service said claims `id`.
fn line_claims(line: &str, first: bool, id: &Identity<'_>) -> bool {
    let line = line.trim();
    // `Attr: value` / `Attr=value`.
    if let Some((attr, value)) = line
        .split_once(':')
        .filter(|(a, _)| !a.contains([' ', '=']))
        .or_else(|| line.split_once('=').filter(|(a, _)| !a.contains(' ')))
    {
        let attr = attr.trim();
        if attr.eq_ignore_ascii_case("dn") {
            return value.split(',').any(|rdn| {
                rdn.split_once('=')
                    .is_some_and(|(_, v)| id.is(v.trim_end_matches(['\r'])))
            });
        }
        if IDENTITY_ATTRIBUTES
            .iter()
            .any(|a| a.eq_ignore_ascii_case(attr))
        {
            return id.is(value);
        }
    }
    // A banner introducing itself: its first word.
    first
        && line
            .split_whitespace()
            .next()
            .is_some_and(|w| id.is(w.trim_end_matches([':', ','])))
}

/// A line fit to quote: printable, at most [`QUOTE_MAX`] characters.
fn quoted(line: &str) -> String {
    line.trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(QUOTE_MAX)
        .collect()
}

/// Whether what the slice's service `slice_service` said on `port` when the host looked
/// from outside (`evidence`, the probe's text) announces one of the shared services in
/// `shared` (rows of a slice are ignored): the line naming the shared service and quoting
/// what claimed it, e.g. `bdii-top on port 2170 announces the shared service
/// testbed-bdii.certo (GlueServiceUniqueID: testbed-bdii.certo:2170)`.
pub fn takeover(
    slice_service: &str,
    port: u16,
    evidence: &str,
    shared: &[ServiceRow],
) -> Option<String> {
    let lines: Vec<&str> = evidence.lines().filter(|l| !l.trim().is_empty()).collect();
    for service in shared.iter().filter(|s| s.slice.is_none()) {
        let id = Identity::of(service);
        // The most telling line: a unique ID or endpoint attribute over a dn over a banner.
        let mut found: Option<(usize, &str)> = None;
        for (i, line) in lines.iter().enumerate() {
            if !line_claims(line, i == 0, &id) {
                continue;
            }
            let rank = if line.trim_start().to_ascii_lowercase().starts_with("glue") {
                0
            } else if line.trim_start().to_ascii_lowercase().starts_with("dn") {
                1
            } else {
                2
            };
            if found.is_none_or(|(r, _)| rank < r) {
                found = Some((rank, line));
            }
        }
        if let Some((_, line)) = found {
            return Some(format!(
                "{slice_service} on port {port} announces the shared service {} ({})",
                service.name,
                quoted(line)
            ));
        }
    }
    None
}

/// The text the guest API refuses a slice's registration with when its name or endpoint
/// is a shared service's (the harness logs it; the VM's reason keeps it).
pub fn registration_refusal(
    service: &str,
    endpoint: &str,
    shared_name: &str,
    shared_endpoint: &str,
) -> String {
    let by = if service == shared_name {
        "its name is"
    } else {
        "its endpoint is"
    };
    format!(
        "{REFUSAL_PREFIX}{service} at {endpoint} would take over the shared service {shared_name} at {shared_endpoint} ({by} the shared service's: a patch's slice cannot take over a service other patches use)"
    )
}

/// Whether `reason` (a VM's reason, the harness's log, the guest API's answer) holds a
/// refusal of the testbed's: a registration under a shared service's name or endpoint
/// ([`registration_refusal`]) or a service that announced a shared one ([`takeover`], as
/// the guest API refuses it). Gives the refusal's line after `testbed: `, e.g.
/// `bdii-top at bdii-5.certo:2170 would take over the shared service testbed-bdii.certo at
/// 127.0.0.1:2170 (its name is the shared service's: ...)` or `bdii-top on port 2170 announces the shared service
/// testbed-bdii.certo (GlueServiceUniqueID: testbed-bdii.certo:2170)`.
pub fn refused_registration(reason: &str) -> Option<String> {
    let mut rest = reason;
    while let Some(at) = rest.find(REFUSAL_PREFIX) {
        let after = &rest[at + REFUSAL_PREFIX.len()..];
        let line = own_part(after.lines().next().unwrap_or(""));
        if shared_named_in(line).is_some() {
            return Some(quoted_long(line));
        }
        rest = after;
    }
    None
}

/// The shared service a refusal names (see [`refused_registration`]).
pub fn refused_shared_service(reason: &str) -> Option<String> {
    shared_named_in(&refused_registration(reason)?).map(str::to_owned)
}

/// A refusal's own part of a reason: up to a `; ` outside parentheses (what a later
/// reason was joined with, see `Store::finish_vm`).
fn own_part(line: &str) -> &str {
    let mut depth = 0i32;
    for (i, c) in line.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ';' if depth <= 0 && line[i + 1..].starts_with(' ') => return line[..i].trim(),
            _ => {}
        }
    }
    line.trim()
}

/// `NAME` of `... would take over the shared service NAME ...` or `... announces the
/// shared service NAME ...`, the two shapes of a refusal's line.
fn shared_named_in(line: &str) -> Option<&str> {
    [
        " would take over the shared service ",
        " announces the shared service ",
    ]
    .iter()
    .find_map(|shape| {
        let (head, tail) = line.split_once(shape)?;
        let name = tail.split_whitespace().next()?;
        (!head.trim().is_empty()).then_some(name)
    })
}

/// A refusal line fit to keep: printable, at most 600 characters.
fn quoted_long(line: &str) -> String {
    line.trim()
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(600)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(name: &str, endpoint: &str) -> ServiceRow {
        ServiceRow {
            id: 1,
            name: name.into(),
            node_type: "glite-BDII".into(),
            endpoint: endpoint.into(),
            slice: None,
            owner_vm: None,
            healthy: true,
            health_detail: None,
            last_check: None,
        }
    }

    /// What 3506's bdii-top says on 2170 (fixtures/world/packages.sh: the banner, the
    /// version line, its provider's lines).
    const HIJACK: &str = "dn: mds-vo-name=testbed-bdii.certo,o=grid\nversion: glite-bdii-top-hijack 1.0-1\nGlueServiceUniqueID: testbed-bdii.certo:2170\nGlueServiceType: bdii_top\n";

    #[test]
    fn the_hijacking_top_bdii_announces_the_shared_one() {
        let top = [shared("testbed-bdii.certo", "127.0.0.1:2170")];
        assert_eq!(
            takeover("bdii-top", 2170, HIJACK, &top).as_deref(),
            Some(
                "bdii-top on port 2170 announces the shared service testbed-bdii.certo (GlueServiceUniqueID: testbed-bdii.certo:2170)"
            )
        );
        // The dn alone is a claim too.
        assert_eq!(
            takeover(
                "bdii-top",
                2170,
                "dn: mds-vo-name=testbed-bdii.certo,o=grid\n",
                &top
            )
            .as_deref(),
            Some(
                "bdii-top on port 2170 announces the shared service testbed-bdii.certo (dn: mds-vo-name=testbed-bdii.certo,o=grid)"
            )
        );
    }

    #[test]
    fn a_site_bdii_and_other_services_announce_nothing() {
        let top = [shared("testbed-bdii.certo", "testbed-bdii.certo:2170")];
        for said in [
            "dn: o=grid\nversion: bdii 5.2.4-1\n",
            "dn: mds-vo-name=resource,o=grid\nGlueServiceUniqueID: bdii-7.certo:2170\n",
            "WMS workload manager ready\nversion: glite-wms-manager 3.2.14-1\n",
            // A client naming the top BDII it uses is no claim to be it.
            "site bdii ready\nBDII_HOST=testbed-bdii.certo\ntop: testbed-bdii.certo:2170\n",
            "",
        ] {
            assert_eq!(takeover("bdii", 2170, said, &top), None, "{said:?}");
        }
        // A longer name that only starts like the shared one is another service.
        let said = "GlueServiceUniqueID: testbed-bdii.certo.example:2170\n";
        assert_eq!(takeover("bdii", 2170, said, &top), None);
    }

    #[test]
    fn the_shared_endpoint_and_a_banner_are_claims_and_slice_rows_are_not_shared() {
        let top = [shared("top-bdii", "10.1.2.3:2170")];
        let got = takeover(
            "x",
            2170,
            "GlueServiceEndpoint: ldap://10.1.2.3:2170/mds-vo-name=local,o=grid\n",
            &top,
        );
        assert!(
            got.as_deref()
                .is_some_and(|l| l.contains("the shared service top-bdii (GlueServiceEndpoint")),
            "{got:?}"
        );
        let got = takeover("x", 2170, "top-bdii:2170 ready\n", &top);
        assert!(
            got.as_deref().is_some_and(|l| l
                == "x on port 2170 announces the shared service top-bdii (top-bdii:2170 ready)"),
            "{got:?}"
        );
        let mut own = shared("bdii-top", "bdii-5.certo:2170");
        own.slice = Some("patch-3506".into());
        assert_eq!(takeover("bdii-top", 2170, "bdii-top ready\n", &[own]), None);
    }

    #[test]
    fn a_refused_registration_is_recognised_in_a_reason_and_names_the_shared_service() {
        let refusal = registration_refusal(
            "testbed-bdii.certo",
            "bdii-5.certo:2170",
            "testbed-bdii.certo",
            "127.0.0.1:2170",
        );
        assert_eq!(
            refusal,
            "testbed: testbed-bdii.certo at bdii-5.certo:2170 would take over the shared service testbed-bdii.certo at 127.0.0.1:2170 (its name is the shared service's: a patch's slice cannot take over a service other patches use)"
        );
        let reason = format!("{refusal}; the harness reported: cannot report: service");
        assert_eq!(
            refused_registration(&reason).as_deref(),
            refusal.strip_prefix(REFUSAL_PREFIX)
        );
        assert_eq!(
            refused_shared_service(&reason).as_deref(),
            Some("testbed-bdii.certo")
        );
        // As the harness logs it.
        let logged = format!("error: POST /api/v1/guest/service failed: HTTP 409: {refusal} ");
        assert!(refused_registration(&logged).is_some());
        // A takeover the guest API refused, in the VM's reason.
        let top = [shared("testbed-bdii.certo", "127.0.0.1:2170")];
        let line = takeover("bdii-top", 2170, HIJACK, &top).expect("takeover");
        let reason =
            format!("{REFUSAL_PREFIX}{line}; the harness reported: cannot report: service");
        assert_eq!(refused_registration(&reason), Some(line));
        assert_eq!(
            refused_shared_service(&reason).as_deref(),
            Some("testbed-bdii.certo")
        );
        for other in [
            "the harness reported: cannot report: service",
            "testbed: the shared services are all healthy",
            "",
        ] {
            assert_eq!(refused_registration(other), None, "{other:?}");
        }
    }
}
