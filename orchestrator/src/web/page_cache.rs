//! Settled patch pages, kept rendered. A page whose newest run has finished changes only
//! when its stamp does ([`crate::store::Store::patch_stamp`]): a revision, a run, a verdict,
//! the owner, or a newer certified verdict anywhere (the last good runs it compares
//! against). So its viewer-independent part is rendered once per stamp and kept here,
//! zstd-compressed (about a tenth of its size), within [`LIMIT`] bytes; the oldest pages
//! kept make room first. A page read with another stamp is made again.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Compressed bytes kept at most: some 10,000 typical patch pages.
pub const LIMIT: usize = 48 << 20;

/// The viewer-independent part of a patch page.
#[derive(Debug)]
pub struct PatchPage {
    pub revision: u32,
    pub title_text: serde_json::Value,
    pub tone: &'static str,
    pub verdict_line: String,
    pub running: bool,
    body: Body,
}

#[derive(Debug)]
enum Body {
    Plain(String),
    Packed { bytes: Vec<u8>, len: usize },
}

impl PatchPage {
    /// A page as rendered; [`PatchPage::packed`] makes the form kept.
    pub fn new(
        revision: u32,
        title_text: serde_json::Value,
        tone: &'static str,
        verdict_line: String,
        running: bool,
        body: String,
    ) -> Self {
        PatchPage {
            revision,
            title_text,
            tone,
            verdict_line,
            running,
            body: Body::Plain(body),
        }
    }

    /// The body's HTML.
    pub fn body(&self) -> std::borrow::Cow<'_, str> {
        match &self.body {
            Body::Plain(s) => s.as_str().into(),
            Body::Packed { bytes, len } => zstd::bulk::decompress(bytes, *len)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default()
                .into(),
        }
    }

    /// This page with its body compressed (a body that does not compress stays as it is).
    fn packed(self) -> Self {
        let Body::Plain(s) = &self.body else {
            return self;
        };
        let body = match zstd::bulk::compress(s.as_bytes(), 1) {
            Ok(bytes) if bytes.len() < s.len() => Body::Packed {
                bytes,
                len: s.len(),
            },
            _ => return self,
        };
        PatchPage { body, ..self }
    }

    fn weight(&self) -> usize {
        let body = match &self.body {
            Body::Plain(s) => s.len(),
            Body::Packed { bytes, .. } => bytes.len(),
        };
        body + self.verdict_line.len() + 256
    }
}

#[derive(Debug, Default)]
struct Pages {
    by_patch: HashMap<(u64, u64), (String, u64, Arc<PatchPage>)>,
    /// Patches in the order their pages were kept, with the serial of each keeping.
    order: VecDeque<((u64, u64), u64)>,
    bytes: usize,
    serial: u64,
}

/// Patch pages kept within a byte limit.
#[derive(Debug)]
pub struct Cache {
    pages: Mutex<Pages>,
    limit: usize,
    /// Off, every look makes its page (what a measurement of making them turns off).
    enabled: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What a cache holds and how it served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub pages: usize,
    pub bytes: usize,
    pub limit: usize,
    /// Looks that found the page kept for their stamp, and looks that did not.
    pub hits: u64,
    pub misses: u64,
}

/// The server's cache, of [`LIMIT`] bytes.
pub fn global() -> &'static Cache {
    static C: OnceLock<Cache> = OnceLock::new();
    C.get_or_init(|| Cache::new(LIMIT))
}

impl Cache {
    pub fn new(limit: usize) -> Self {
        Cache {
            pages: Mutex::default(),
            limit,
            enabled: AtomicBool::new(true),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The page of patch `id` kept for exactly `stamp`; `id` is the store's
    /// [`crate::store::Store::instance`] and the patch.
    pub fn get(&self, id: (u64, u64), stamp: &str) -> Option<Arc<PatchPage>> {
        if !self.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let found = self.pages.lock().ok().and_then(|p| {
            let (s, _, page) = p.by_patch.get(&id)?;
            (s == stamp).then(|| page.clone())
        });
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Keeps `page` as patch `id`'s page for `stamp`, compressed; returns it.
    pub fn keep(&self, id: (u64, u64), stamp: String, page: PatchPage) -> Arc<PatchPage> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Arc::new(page);
        }
        let page = Arc::new(page.packed());
        let weight = page.weight();
        if weight > self.limit / 16 {
            return page;
        }
        let Ok(mut p) = self.pages.lock() else {
            return page;
        };
        p.serial += 1;
        let serial = p.serial;
        if let Some((_, _, old)) = p.by_patch.insert(id, (stamp, serial, page.clone())) {
            p.bytes -= old.weight();
        }
        p.bytes += weight;
        p.order.push_back((id, serial));
        while p.bytes > self.limit {
            let Some((old_id, old_serial)) = p.order.pop_front() else {
                break;
            };
            // An entry kept again since is not this one.
            if p.by_patch.get(&old_id).is_some_and(|e| e.1 == old_serial)
                && let Some((_, _, old)) = p.by_patch.remove(&old_id)
            {
                p.bytes -= old.weight();
            }
        }
        // Entries kept again leave stale places in the order; keep it from growing without end.
        if p.order.len() > 2 * p.by_patch.len() + 64 {
            let Pages {
                by_patch, order, ..
            } = &mut *p;
            order.retain(|(id, serial)| by_patch.get(id).is_some_and(|e| e.1 == *serial));
        }
        page
    }

    /// Compressed bytes kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.stats().bytes
    }

    /// Turns keeping pages on or off (off, every look makes its page; what is kept stays).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        let (pages, bytes) = self
            .pages
            .lock()
            .map(|p| (p.by_patch.len(), p.bytes))
            .unwrap_or((0, 0));
        Stats {
            pages,
            bytes,
            limit: self.limit,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(body: &str) -> PatchPage {
        PatchPage::new(
            1,
            "t".into(),
            "good",
            "certified".into(),
            false,
            body.into(),
        )
    }

    #[test]
    fn a_kept_page_is_found_only_with_its_stamp_and_reads_back_whole() {
        let c = Cache::new(LIMIT);
        let body = "<table><tr><td>glite-WN</td></tr></table>\n".repeat(200);
        c.keep((1, 1), "a".into(), page(&body));
        assert!(
            c.bytes() < body.len() / 4,
            "kept compressed: {} bytes",
            c.bytes()
        );
        assert_eq!(c.get((1, 1), "a").expect("kept").body(), body);
        assert!(c.get((1, 1), "b").is_none());
        assert!(c.get((1, 2), "a").is_none());
        assert!(c.get((2, 1), "a").is_none(), "another store's patch 1");
        c.keep((1, 1), "b".into(), page("new"));
        assert!(c.get((1, 1), "a").is_none());
        assert_eq!(c.get((1, 1), "b").expect("kept").body(), "new");
    }

    #[test]
    fn the_cache_stays_within_its_limit_dropping_the_oldest() {
        // Bodies that do not compress, so each weighs what it holds.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut noise = || {
            (0..(1 << 20) / 64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(b'a' + (x % 26) as u8)
                })
                .collect::<String>()
        };
        let c = Cache::new(1 << 20);
        for i in 0..300u64 {
            c.keep((1, i), "s".into(), page(&noise()));
            // The same patch kept again replaces its page.
            c.keep((1, 0), "s".into(), page("small"));
        }
        assert!(c.bytes() <= 1 << 20, "{} bytes kept", c.bytes());
        assert!(c.bytes() > (1 << 20) / 2, "{} bytes kept", c.bytes());
        assert!(c.get((1, 1), "s").is_none(), "the oldest page was dropped");
        assert!(c.get((1, 299), "s").is_some(), "the newest page is kept");
        assert_eq!(c.get((1, 0), "s").expect("kept").body(), "small");
    }
}
