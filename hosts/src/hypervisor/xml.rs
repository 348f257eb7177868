//! Domain XML, rendered from one tera template per hypervisor type (embedded in the binary).
//!
//! Every value is XML-escaped here before it reaches a template, so templates stay plain and
//! tera's HTML autoescaping is off.

use std::path::Path;
use std::sync::OnceLock;

use serde::Serialize;

use super::{DomainSpec, HypervisorError, HypervisorKind, Network};

const TEMPLATES: [(&str, &str); 4] = [
    ("qemu", include_str!("../templates/qemu.xml.tera")),
    ("kvm", include_str!("../templates/kvm.xml.tera")),
    ("xen", include_str!("../templates/xen.xml.tera")),
    ("test", include_str!("../templates/test.xml.tera")),
];

fn engine() -> Result<&'static tera::Tera, HypervisorError> {
    static ENGINE: OnceLock<Result<tera::Tera, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let mut t = tera::Tera::default();
            t.autoescape_on(vec![]);
            t.add_raw_templates(TEMPLATES).map_err(|e| chain(&e))?;
            Ok(t)
        })
        .as_ref()
        .map_err(|message| HypervisorError::Template {
            kind: "all",
            message: message.clone(),
        })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// What the templates see: every string already XML-escaped.
#[derive(Serialize)]
struct Context {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    kernel: String,
    initramfs: String,
    cmdline: String,
    root_disk: String,
    base_image: String,
    serial_log: String,
    /// `none`, `user` or `bridge`.
    network: &'static str,
    bridge: String,
    owner: String,
    secret_file: String,
}

/// Escapes text for XML attribute values and element content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn path(spec: &DomainSpec, what: &str, p: &Path) -> Result<String, HypervisorError> {
    let s = p
        .to_str()
        .ok_or_else(|| spec_error(spec, format!("{what} path {p:?} is not UTF-8")))?;
    if !p.is_absolute() {
        return Err(spec_error(spec, format!("{what} path {s} is not absolute")));
    }
    Ok(escape(s))
}

fn spec_error(spec: &DomainSpec, message: String) -> HypervisorError {
    HypervisorError::Spec {
        name: spec.name.clone(),
        message,
    }
}

/// Renders the domain XML of `spec` for `kind`.
pub fn render(kind: HypervisorKind, spec: &DomainSpec) -> Result<String, HypervisorError> {
    if spec.name.is_empty()
        || spec.name.len() > 200
        || !spec
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(spec_error(
            spec,
            "a domain name is 1-200 ASCII letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if spec.memory_mib < 32 || spec.vcpus == 0 {
        return Err(spec_error(
            spec,
            "needs at least 32 MiB and one vCPU".into(),
        ));
    }
    if spec.cmdline.contains('\0') || spec.cmdline.contains('\n') {
        return Err(spec_error(
            spec,
            "the kernel command line has a NUL or a newline".into(),
        ));
    }
    let (network, bridge) = match &spec.network {
        Network::None => ("none", String::new()),
        Network::User if kind == HypervisorKind::Xen => {
            return Err(spec_error(
                spec,
                "Xen has no user-mode networking; use a bridge".into(),
            ));
        }
        Network::User => ("user", String::new()),
        Network::Bridge(b) => ("bridge", escape(b)),
    };
    let secret_file = match &spec.secret_file {
        Some(p) => path(spec, "secret file", p)?,
        None => String::new(),
    };
    let owner = match &spec.owner {
        None => String::new(),
        Some(o)
            if !o.is_empty()
                && o.len() <= 64
                && o.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            o.clone()
        }
        Some(o) => {
            return Err(spec_error(
                spec,
                format!("owner {o:?}: 1-64 ASCII letters, digits, '-', '_' or '.'"),
            ));
        }
    };
    let ctx = Context {
        name: spec.name.clone(),
        memory_mib: spec.memory_mib,
        vcpus: spec.vcpus,
        kernel: path(spec, "kernel", &spec.kernel)?,
        initramfs: path(spec, "initramfs", &spec.initramfs)?,
        cmdline: escape(&spec.cmdline),
        root_disk: path(spec, "root disk", &spec.root_disk)?,
        base_image: match &spec.base_image {
            Some(b) => path(spec, "base image", b)?,
            None => String::new(),
        },
        serial_log: path(spec, "serial log", &spec.serial_log)?,
        network,
        bridge,
        owner,
        secret_file,
    };
    let ctx = tera::Context::from_serialize(&ctx).map_err(|e| HypervisorError::Template {
        kind: kind.as_str(),
        message: chain(&e),
    })?;
    engine()?
        .render(kind.as_str(), &ctx)
        .map_err(|e| HypervisorError::Template {
            kind: kind.as_str(),
            message: chain(&e),
        })
}

/// The serial console's file in a domain's XML (as libvirt returns it): the `<source path=...>`
/// of a `type='file'` serial device, or a console's `<log file=...>`.
pub fn serial_log_of(xml: &str) -> Option<String> {
    let attr = |from: &str, key: &str| -> Option<String> {
        let at = from.find(key)? + key.len();
        let quote = from[at..].chars().next()?;
        if quote != '\'' && quote != '"' {
            return None;
        }
        let rest = &from[at + 1..];
        let end = rest.find(quote)?;
        Some(unescape(&rest[..end]))
    };
    if let Some(at) = xml
        .find("<serial type='file'")
        .or_else(|| xml.find("<serial type=\"file\""))
    {
        let end = xml[at..].find("</serial>").map_or(xml.len(), |e| at + e);
        if let Some(p) = attr(&xml[at..end], "<source path=") {
            return Some(p);
        }
    }
    let at = xml.find("<console")?;
    let end = xml[at..].find("</console>").map_or(xml.len(), |e| at + e);
    attr(&xml[at..end], "<log file=")
}

/// The alias libvirt gave the first user-network NIC of a live domain's XML (`net0`: QEMU
/// knows its backend as `hostnet0`), if it has one.
pub fn user_net_alias(xml: &str) -> Option<String> {
    let at = xml
        .find("<interface type='user'")
        .or_else(|| xml.find("<interface type=\"user\""))?;
    let end = xml[at..].find("</interface>").map_or(xml.len(), |e| at + e);
    let nic = &xml[at..end];
    let key = "<alias name=";
    let from = nic.find(key)? + key.len();
    let quote = nic[from..].chars().next()?;
    let rest = &nic[from + 1..];
    let alias = &rest[..rest.find(quote)?];
    (!alias.is_empty()
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)))
    .then(|| alias.to_owned())
}

/// The owner in Certo's metadata of a domain's XML (whatever prefix libvirt gives the namespace).
pub fn owner_of(xml: &str) -> Option<String> {
    let at = xml.find(super::METADATA_NS)?;
    let rest = &xml[at..];
    let end = rest.find("</metadata>").unwrap_or(rest.len());
    let rest = &rest[..end];
    let open = rest
        .find(":owner>")
        .map(|i| i + ":owner>".len())
        .or_else(|| rest.find("<owner>").map(|i| i + "<owner>".len()))?;
    let value = &rest[open..];
    let close = value.find('<')?;
    let v = unescape(value[..close].trim());
    (!v.is_empty()).then_some(v)
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "certo-r1-x-a1".into(),
            memory_mib: 256,
            vcpus: 1,
            kernel: PathBuf::from("/k/vmlinux"),
            initramfs: PathBuf::from("/k/initramfs.img"),
            cmdline: "console=ttyS0 panic=-1 certo.url=http://10.0.2.2:8080/a?b=1&c=2".into(),
            root_disk: PathBuf::from("/v/root's.qcow2"),
            base_image: Some(PathBuf::from("/repo/images/abc/rootfs.ext4")),
            serial_log: PathBuf::from("/v/serial.log"),
            network: Network::User,
            owner: Some("nshost1".into()),
            secret_file: Some(PathBuf::from("/v/token")),
        }
    }

    #[test]
    fn the_user_network_alias_is_read_from_the_live_xml() {
        let live = "<domain><devices><interface type='bridge'><alias name='net0'/></interface>\
            <interface type='user'>\n  <mac address='52:54:00:12:34:56'/>\n  <model type='virtio'/>\n  \
            <alias name='net1'/>\n</interface></devices></domain>";
        assert_eq!(user_net_alias(live).as_deref(), Some("net1"));
        assert_eq!(
            user_net_alias("<domain><interface type='user'></interface></domain>"),
            None
        );
        // An alias QEMU's monitor could misread is not used.
        assert_eq!(
            user_net_alias("<interface type='user'><alias name='net0 x'/></interface>"),
            None
        );
    }

    #[test]
    fn values_are_escaped_and_the_log_is_found_again() {
        for kind in [
            HypervisorKind::Qemu,
            HypervisorKind::Kvm,
            HypervisorKind::Test,
        ] {
            let xml = render(kind, &spec()).expect("renders");
            assert!(
                xml.contains(&format!("<domain type='{}'>", kind.as_str())),
                "{xml}"
            );
            assert!(xml.contains("b=1&amp;c=2"), "{xml}");
            assert!(xml.contains("/v/root&apos;s.qcow2"), "{xml}");
            assert!(xml.contains("<on_crash>destroy</on_crash>"), "{xml}");
            assert!(xml.contains("<interface type='user'>"), "{xml}");
            assert!(xml.contains("<source file='/repo/images/abc/rootfs.ext4'>\n          <seclabel model='dac' relabel='no'/>"), "{xml}");
            assert_eq!(serial_log_of(&xml).as_deref(), Some("/v/serial.log"));
            assert_eq!(owner_of(&xml).as_deref(), Some("nshost1"));
        }
        // As libvirt may write it back, with another prefix.
        let back = "<metadata>\n    <c:domain xmlns:c=\"https://certo.invalid/xmlns/domain/1\">\n      <c:owner>h2</c:owner>\n    </c:domain>\n  </metadata>";
        assert_eq!(owner_of(back).as_deref(), Some("h2"));
        assert_eq!(owner_of("<domain/>"), None);
    }

    #[test]
    fn xen_takes_a_bridge_not_user_networking() {
        assert!(matches!(
            render(HypervisorKind::Xen, &spec()),
            Err(HypervisorError::Spec { .. })
        ));
        let mut s = spec();
        s.network = Network::Bridge("xenbr0".into());
        let xml = render(HypervisorKind::Xen, &s).expect("renders");
        assert!(
            xml.contains("<type arch='x86_64' machine='xenpv'>linux</type>"),
            "{xml}"
        );
        assert!(xml.contains("<source bridge='xenbr0'/>"), "{xml}");
        assert_eq!(serial_log_of(&xml).as_deref(), Some("/v/serial.log"));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut s = spec();
        s.name = "certo r1".into();
        assert!(render(HypervisorKind::Qemu, &s).is_err());
        let mut s = spec();
        s.kernel = PathBuf::from("relative/vmlinux");
        assert!(render(HypervisorKind::Qemu, &s).is_err());
        let mut s = spec();
        s.cmdline.push('\n');
        assert!(render(HypervisorKind::Qemu, &s).is_err());
        let mut s = spec();
        s.owner = Some("a b".into());
        assert!(render(HypervisorKind::Qemu, &s).is_err());
    }
}
