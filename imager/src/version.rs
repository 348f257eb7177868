//! Version order as the package managers see it, to tell an upgrade from a downgrade:
//! RPM's `EPOCH:VERSION-RELEASE` (rpm's segment comparison, `~` before anything, `^`
//! after the end but before anything else) and Debian's `EPOCH:UPSTREAM-REVISION`
//! (dpkg's alternation of non-digit and digit parts, `~` before everything, letters
//! before other characters). The unit tests check both against the real tools.

use std::cmp::Ordering;

/// Compares two versions of the family `family` (`rpm` or `deb`).
pub fn compare(family: &str, a: &str, b: &str) -> Ordering {
    if family == "deb" {
        deb_compare(a, b)
    } else {
        rpm_evr_compare(a, b)
    }
}

/// Splits `[EPOCH:]VERSION[-RELEASE]` at the first `:` (when what precedes it is all
/// digits) and the last `-`. A missing epoch is 0.
fn split_evr(evr: &str) -> (u64, &str, Option<&str>) {
    let (epoch, rest) = match evr.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {
            (e.parse().unwrap_or(u64::MAX), rest)
        }
        _ => (0, evr),
    };
    match rest.rsplit_once('-') {
        Some((v, r)) => (epoch, v, Some(r)),
        None => (epoch, rest, None),
    }
}

/// RPM's order of `[EPOCH:]VERSION[-RELEASE]`: epoch, then version, then release (as
/// rpm's `rpm.ver` orders them, a missing release before any release).
pub fn rpm_evr_compare(a: &str, b: &str) -> Ordering {
    let (ea, va, ra) = split_evr(a);
    let (eb, vb, rb) = split_evr(b);
    ea.cmp(&eb)
        .then_with(|| rpm_segments_compare(va, vb))
        .then_with(|| match (ra, rb) {
            (Some(ra), Some(rb)) => rpm_segments_compare(ra, rb),
            (Some(_), None) => Ordering::Greater,
            (None, Some(_)) => Ordering::Less,
            (None, None) => Ordering::Equal,
        })
}

/// RPM's comparison of one version or release string: runs of digits and runs of
/// letters are compared in turn (numbers numerically, a number beating letters),
/// other characters only separate them; `~` sorts before anything (even the end),
/// `^` after the end but before anything else.
pub fn rpm_segments_compare(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let separator = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    loop {
        while i < a.len() && separator(a[i]) {
            i += 1;
        }
        while j < b.len() && separator(b[j]) {
            j += 1;
        }
        let (ca, cb) = (a.get(i).copied(), b.get(j).copied());
        if ca == Some(b'~') || cb == Some(b'~') {
            if ca != Some(b'~') {
                return Ordering::Greater;
            }
            if cb != Some(b'~') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ca == Some(b'^') || cb == Some(b'^') {
            return match (ca, cb) {
                (None, _) => Ordering::Less,
                (_, None) => Ordering::Greater,
                (Some(b'^'), Some(b'^')) => {
                    i += 1;
                    j += 1;
                    continue;
                }
                (Some(b'^'), _) => Ordering::Less,
                _ => Ordering::Greater,
            };
        }
        let (Some(ca), Some(_)) = (ca, cb) else {
            break;
        };
        let numeric = ca.is_ascii_digit();
        let class = |c: u8| {
            if numeric {
                c.is_ascii_digit()
            } else {
                c.is_ascii_alphabetic()
            }
        };
        let start_a = i;
        while i < a.len() && class(a[i]) {
            i += 1;
        }
        let start_b = j;
        while j < b.len() && class(b[j]) {
            j += 1;
        }
        let (sa, sb) = (&a[start_a..i], &b[start_b..j]);
        if sb.is_empty() {
            // The other side has a segment of the other kind here: a number is newer.
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let ord = if numeric {
            let trim = |s: &[u8]| -> usize { s.iter().take_while(|c| **c == b'0').count() };
            let (sa, sb) = (&sa[trim(sa)..], &sb[trim(sb)..]);
            sa.len().cmp(&sb.len()).then_with(|| sa.cmp(sb))
        } else {
            sa.cmp(sb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// dpkg's order of `[EPOCH:]UPSTREAM[-REVISION]`.
pub fn deb_compare(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = split_evr(a);
    let (eb, ub, rb) = split_evr(b);
    ea.cmp(&eb)
        .then_with(|| deb_part_compare(ua, ub))
        .then_with(|| deb_part_compare(ra.unwrap_or(""), rb.unwrap_or("")))
}

/// The weight of one character in dpkg's non-digit parts: `~` lowest (below the end of
/// the string), then the end, then letters, then every other character.
fn deb_weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

fn deb_part_compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // The non-digit parts, character by character.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (wa, wb) = (deb_weight(a.get(i).copied()), deb_weight(b.get(j).copied()));
            if wa != wb {
                return wa.cmp(&wb);
            }
            i += 1;
            j += 1;
        }
        // The digit parts, as numbers.
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first == Ordering::Equal {
                first = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first != Ordering::Equal {
            return first;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Pairs whose order is known, and that exercise every rule of both comparisons.
    const PAIRS: &[(&str, &str)] = &[
        ("4.0.11-1", "4.0.11-0"),
        ("4.0.12-1", "4.0.11-1"),
        ("4.0.11-1", "4.0.11-1"),
        ("1.10-1", "1.9-1"),
        ("1.0-1", "1.0-1.1"),
        ("1.0~rc1-1", "1.0-1"),
        ("1.0~rc1-1", "1.0~rc2-1"),
        ("1:1.0-1", "2.0-1"),
        ("0:1.0-1", "1.0-1"),
        ("1.0a-1", "1.0-1"),
        ("1.0a-1", "1.0.1-1"),
        ("1.0-1.sl5", "1.0-1.slc4"),
        ("2.1.4-2.slc4", "2.1.4-1.slc4"),
        ("1.0.010-1", "1.0.9-1"),
        ("1.0^git1-1", "1.0-1"),
        ("1.0^git1-1", "1.0.1-1"),
        ("1.0-1", "1.0"),
        ("1.0+dfsg-1", "1.0-1"),
        ("1.0.b-1", "1.0.a-1"),
        ("12.4+deb12u15", "12.4+deb12u9"),
        ("5.2.5-1", "5.2.4-1"),
    ];

    #[test]
    fn rpm_order_of_known_pairs() {
        use Ordering::*;
        let expect = [
            Greater, Greater, Equal, Greater, Less, Less, Less, Greater, Equal, Greater, Less,
            Less, Greater, Greater, Greater, Less, Greater, Greater, Greater, Greater, Greater,
        ];
        for ((a, b), want) in PAIRS.iter().zip(expect) {
            assert_eq!(rpm_evr_compare(a, b), want, "rpm {a} vs {b}");
            assert_eq!(rpm_evr_compare(b, a), want.reverse(), "rpm {b} vs {a}");
        }
    }

    #[test]
    fn deb_order_of_known_pairs() {
        use Ordering::*;
        // dpkg: `^` is an ordinary character (after `.`), a missing revision is below `1`.
        let expect = [
            Greater, Greater, Equal, Greater, Less, Less, Less, Greater, Equal, Greater, Less,
            Less, Greater, Greater, Greater, Greater, Greater, Greater, Greater, Greater, Greater,
        ];
        for ((a, b), want) in PAIRS.iter().zip(expect) {
            assert_eq!(deb_compare(a, b), want, "deb {a} vs {b}");
            assert_eq!(deb_compare(b, a), want.reverse(), "deb {b} vs {a}");
        }
    }

    /// The same pairs through the real tools, where they are installed: rpm's own EVR
    /// comparison (its Lua `rpm.ver`) and `dpkg --compare-versions`.
    #[test]
    fn agrees_with_rpm_and_dpkg() {
        let mut checked = 0;
        for (a, b) in PAIRS {
            let rpm = Command::new("rpm")
                .arg("--eval")
                .arg(format!(
                    "%{{lua: local a, b = rpm.ver('{a}'), rpm.ver('{b}'); \
                     print(a < b and -1 or (a == b and 0 or 1))}}"
                ))
                .output();
            if let Ok(out) = rpm
                && out.status.success()
            {
                let want = match String::from_utf8_lossy(&out.stdout).trim() {
                    "-1" => Ordering::Less,
                    "0" => Ordering::Equal,
                    "1" => Ordering::Greater,
                    other => panic!("rpm said {other:?} for {a} vs {b}"),
                };
                assert_eq!(rpm_evr_compare(a, b), want, "rpm {a} vs {b}");
                checked += 1;
            }
            let dpkg = |op: &str| {
                Command::new("dpkg")
                    .args(["--compare-versions", a, op, b])
                    .status()
                    .map(|s| s.success())
            };
            if let (Ok(lt), Ok(eq)) = (dpkg("lt"), dpkg("eq")) {
                let want = if lt {
                    Ordering::Less
                } else if eq {
                    Ordering::Equal
                } else {
                    Ordering::Greater
                };
                assert_eq!(deb_compare(a, b), want, "dpkg {a} vs {b}");
                checked += 1;
            }
        }
        eprintln!("{checked} comparisons checked against the real tools");
    }
}
