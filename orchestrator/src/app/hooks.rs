//! Verdict hooks: when a run ends, every hook's URL receives a JSON event, signed with
//! `X-Certo-Signature: sha256=HEX` (HMAC-SHA-256 of the body under the hook's secret),
//! retried with backoff until the receiver answers 2xx, each attempt recorded.
//! `certo serve` delivers ([`deliver_loop`]); `certo hook` manages them.

use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use super::OpError;
use crate::store::Store;
use crate::store::hooks::DueDelivery;

/// How deliveries are retried.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// The delay before the second attempt; each further one doubles it, up to `cap`.
    pub first_delay: Duration,
    pub cap: Duration,
    /// Attempts before a delivery is given up (`failed`).
    pub attempts: u32,
    /// How long a receiver may take to answer.
    pub timeout: Duration,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            first_delay: Duration::from_secs(10),
            cap: Duration::from_secs(3600),
            attempts: 10,
            timeout: Duration::from_secs(10),
        }
    }
}

impl DeliverySettings {
    /// The delay after failed attempt `n` (1 for the first), or `None` once the attempts are
    /// used up.
    pub fn delay_after(&self, n: u32) -> Option<Duration> {
        use backon::BackoffBuilder;
        if n >= self.attempts {
            return None;
        }
        backon::ExponentialBuilder::default()
            .with_min_delay(self.first_delay)
            .with_factor(2.0)
            .with_max_delay(self.cap)
            .with_max_times(self.attempts as usize)
            .build()
            .nth(n as usize - 1)
            .map(|d| d.min(self.cap))
    }
}

/// The HMAC-SHA-256 of `body` under `secret`, hex: what `X-Certo-Signature` carries after
/// `sha256=`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Adds a hook; the secret is made here when not given. Returns the id and the secret.
pub async fn add(
    store: &Store,
    url: &str,
    secret: Option<String>,
) -> Result<(i64, String), OpError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| {
        OpError::Refused(format!(
            "hook URL {:?}: {e}",
            crate::patch::limits::shorten(url)
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || url.len() > 2048 {
        return Err(OpError::Refused(format!(
            "hook URL {:?}: give an http:// or https:// URL of at most 2048 bytes",
            crate::patch::limits::shorten(url)
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(OpError::Refused(
            "hook URL: no credentials in the URL (the body is signed with the hook's secret)"
                .into(),
        ));
    }
    let secret = match secret {
        Some(s) if s.len() >= 16 => s,
        Some(_) => {
            return Err(OpError::Refused(
                "the hook's secret must be at least 16 bytes".into(),
            ));
        }
        None => certo_proto::token::new_token().map_err(|source| super::AppError::Io {
            what: "reading /dev/urandom for a secret".into(),
            source,
        })?,
    };
    let id = store.add_hook(url, &secret).await?;
    tracing::info!(hook = id, url = %parsed, "hook added");
    Ok((id, secret))
}

/// The event a hook receives for a verdict.
pub fn event(d: &DueDelivery) -> Value {
    let v = &d.verdict;
    json!({
        "event": "verdict",
        "delivery": format!("{}-{}", d.hook_id, d.run_id),
        "run": v.run_id,
        "patch": v.patch_id,
        "revision": v.revision,
        "verdict": v.verdict,
        "stage": v.stage,
        "target": v.target,
        "reason": v.reason,
        "decided_at": v.decided_at,
        "detail": v.detail,
    })
}

/// Sends every due delivery once; returns how many were delivered.
pub async fn deliver_once(
    store: &Store,
    http: &reqwest::Client,
    settings: &DeliverySettings,
) -> Result<usize, OpError> {
    let due = store
        .take_due_deliveries(20, settings.timeout.as_secs_f64() * 3.0 + 5.0)
        .await?;
    let mut delivered = 0;
    for d in due {
        let body = serde_json::to_vec(&event(&d)).map_err(|e| OpError::Refused(e.to_string()))?;
        let sent = http
            .post(&d.url)
            .timeout(settings.timeout)
            .header("content-type", "application/json")
            .header("user-agent", concat!("certo/", env!("CARGO_PKG_VERSION")))
            .header("x-certo-event", "verdict")
            .header("x-certo-delivery", format!("{}-{}", d.hook_id, d.run_id))
            .header(
                "x-certo-signature",
                format!("sha256={}", signature(&d.secret, &body)),
            )
            .body(body)
            .send()
            .await;
        let attempt = d.attempts as u32 + 1;
        let (status, error) = match &sent {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
            Ok(r) => (
                Some(r.status().as_u16()),
                Some(format!("the receiver answered {}", r.status())),
            ),
            Err(e) => (None, Some(format!("sending: {e}"))),
        };
        let ok = error.is_none();
        let retry = if ok {
            None
        } else {
            settings.delay_after(attempt)
        };
        store
            .record_delivery(
                d.hook_id,
                d.run_id,
                status,
                error.as_deref(),
                ok,
                retry.map(|r| r.as_secs_f64()),
            )
            .await?;
        if ok {
            delivered += 1;
            tracing::info!(
                hook = d.hook_id,
                run = d.run_id,
                attempt,
                "verdict delivered"
            );
        } else {
            tracing::warn!(hook = d.hook_id, run = d.run_id, attempt, error = error.as_deref(), retry_in = ?retry, "verdict delivery failed");
        }
    }
    Ok(delivered)
}

/// Delivers every `every`, for as long as the server runs.
pub async fn deliver_loop(store: Store, settings: DeliverySettings, every: Duration) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client for the hooks");
            return;
        }
    };
    loop {
        if let Err(e) = deliver_once(&store, &http, &settings).await {
            tracing::warn!(error = %e, "delivering verdicts");
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_doubling_up_to_the_cap_then_stop() {
        let s = DeliverySettings {
            first_delay: Duration::from_secs(10),
            cap: Duration::from_secs(60),
            attempts: 5,
            timeout: Duration::from_secs(1),
        };
        let d: Vec<Option<u64>> = (1..=5)
            .map(|n| s.delay_after(n).map(|d| d.as_secs()))
            .collect();
        assert_eq!(d, vec![Some(10), Some(20), Some(40), Some(60), None]);
    }
}
