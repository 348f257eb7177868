//! What the guest is told on its kernel command line. The guest harness (`/init` in the
//! initramfs, see [`crate::boot`]) reads these `certo.*` parameters from `/proc/cmdline`.

use crate::hypervisor::HypervisorKind;

/// The guest's address under QEMU's user network (what [`GuestConfig::user_network`] gives it).
pub const USER_NET_GUEST: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 15);

/// The guest's side of the testbed connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// The base URL the harness talks to, as the guest sees it (e.g. `http://10.0.2.2:8080`
    /// under user networking). No spaces.
    pub url: String,
    /// The VM's name (the domain name), sent back as `certo.vm`.
    pub vm: String,
    /// The bearer token for the guest API. Visible to anything that reads the guest's
    /// `/proc/cmdline` or the domain XML: scope it to this VM.
    pub token: String,
    /// The guest's address with prefix length, e.g. `10.0.2.15/24`.
    pub ip: String,
    /// The default gateway, e.g. `10.0.2.2`.
    pub gateway: String,
    /// Fault injection for tests: the harness sleeps forever instead of joining.
    pub hang: bool,
    /// Fault injection for tests: the guest panics its kernel (`echo c > /proc/sysrq-trigger`).
    pub panic: bool,
    /// Fault injection for tests: the harness exits right after joining, without `done`.
    pub crash: bool,
    /// The token travels in QEMU's fw_cfg (`opt/certo/token`), not on the command line:
    /// the command line then says `certo.token=fwcfg`.
    pub token_in_fwcfg: bool,
}

impl GuestConfig {
    /// A configuration for QEMU user networking (guest 10.0.2.15/24, host 10.0.2.2).
    pub fn user_network(url: &str, vm: &str, token: &str) -> Self {
        Self {
            url: url.to_owned(),
            vm: vm.to_owned(),
            token: token.to_owned(),
            ip: format!("{USER_NET_GUEST}/24"),
            gateway: "10.0.2.2".into(),
            hang: false,
            panic: false,
            crash: false,
            token_in_fwcfg: false,
        }
    }

    /// The kernel command line: console on the hypervisor's serial device, `panic=-1` (a
    /// panic reboots at once, and `on_reboot=destroy` ends the domain), quiet boot, and the
    /// `certo.*` parameters. Spaces in values are not allowed (the kernel splits on them).
    pub fn cmdline(&self, kind: HypervisorKind) -> Result<String, String> {
        for (key, value) in [
            ("url", &self.url),
            ("vm", &self.vm),
            ("token", &self.token),
            ("ip", &self.ip),
            ("gw", &self.gateway),
        ] {
            if value.is_empty()
                || value
                    .chars()
                    .any(|c| c.is_whitespace() || c == '"' || c.is_control())
            {
                return Err(format!(
                    "certo.{key} must be non-empty without spaces or quotes"
                ));
            }
        }
        let mut s = format!(
            "console={} panic=-1 loglevel=4 quiet i8042.noaux i8042.nokbd i8042.nopnp tsc=reliable \
             mitigations=off random.trust_cpu=on \
             certo.url={} certo.vm={} certo.token={} certo.ip={} certo.gw={}",
            kind.console(),
            self.url,
            self.vm,
            if self.token_in_fwcfg {
                "fwcfg"
            } else {
                self.token.as_str()
            },
            self.ip,
            self.gateway
        );
        if self.crash {
            s.push_str(" certo.crash=1");
        }
        if self.hang {
            s.push_str(" certo.hang=1");
        }
        if self.panic {
            s.push_str(" certo.panic=1");
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_carries_panic_and_the_certo_parameters() {
        let mut c = GuestConfig::user_network("http://10.0.2.2:8080", "certo-r1-x-a1", "s3cret");
        let s = c.cmdline(HypervisorKind::Qemu).expect("cmdline");
        assert!(s.starts_with("console=ttyS0 panic=-1 "), "{s}");
        for part in [
            "certo.url=http://10.0.2.2:8080",
            "certo.vm=certo-r1-x-a1",
            "certo.token=s3cret",
            "certo.ip=10.0.2.15/24",
            "certo.gw=10.0.2.2",
        ] {
            assert!(s.split(' ').any(|w| w == part), "{part} in {s}");
        }
        assert!(
            !s.contains("certo.hang") && !s.contains("certo.panic") && !s.contains("certo.crash"),
            "{s}"
        );
        let words = |c: &GuestConfig, kind| {
            let s = c.cmdline(kind).expect("cmdline");
            s.split(' ').map(str::to_owned).collect::<Vec<_>>()
        };
        // Each fault flag reaches the command line on its own, and only when set.
        c.hang = true;
        let w = words(&c, HypervisorKind::Xen);
        assert_eq!(w.first().map(String::as_str), Some("console=hvc0"), "{w:?}");
        assert!(w.iter().any(|p| p == "certo.hang=1"), "{w:?}");
        assert!(
            !w.iter()
                .any(|p| p.starts_with("certo.panic") || p.starts_with("certo.crash")),
            "{w:?}"
        );
        c.hang = false;
        c.panic = true;
        let w = words(&c, HypervisorKind::Qemu);
        assert!(w.iter().any(|p| p == "certo.panic=1"), "{w:?}");
        assert!(
            !w.iter()
                .any(|p| p.starts_with("certo.hang") || p.starts_with("certo.crash")),
            "{w:?}"
        );
        c.panic = false;
        c.crash = true;
        let w = words(&c, HypervisorKind::Qemu);
        assert!(w.iter().any(|p| p == "certo.crash=1"), "{w:?}");
        assert!(
            !w.iter()
                .any(|p| p.starts_with("certo.hang") || p.starts_with("certo.panic")),
            "{w:?}"
        );
        c.hang = true;
        c.panic = true;
        let w = words(&c, HypervisorKind::Qemu);
        for part in ["certo.hang=1", "certo.panic=1", "certo.crash=1"] {
            assert!(w.iter().any(|p| p == part), "{part} in {w:?}");
        }
        c.token = "two words".into();
        assert!(c.cmdline(HypervisorKind::Qemu).is_err());
        c.token = String::new();
        assert!(c.cmdline(HypervisorKind::Qemu).is_err());
    }
}
