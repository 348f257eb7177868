//! The HTTP serving loop of Certo's servers (`certo agent`, `certo serve`), bounded so that
//! no client can hold them: a cap on open connections and on requests in flight, a deadline
//! for each request's header (which also closes a kept-alive connection left idle), a
//! deadline for progress on each request's body, and a bounded graceful shutdown.
//!
//! Authentication is the routers' business (their extractors and middleware run before any
//! body is read); this module makes sure that a connection which never gets that far, or
//! stalls after, costs a bounded amount of memory and time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// What a server allows its clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once; one more is closed at once (and logged).
    pub max_connections: usize,
    /// Requests being served at once; one more is answered 503.
    pub max_in_flight: usize,
    /// A request's header must arrive within this; a kept-alive connection with no next
    /// request is closed after it too.
    pub header_timeout: Duration,
    /// A request body that makes no progress for this long fails (the request is refused).
    pub body_timeout: Duration,
    /// After the shutdown signal, connections still busy after this are dropped.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 192,
            max_in_flight: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then lets
/// busy connections finish for at most `limits.shutdown_grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let guard = Arc::new(Guard {
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
        body_timeout: limits.body_timeout,
    });
    let app = router.layer(axum::middleware::from_fn_with_state(guard, bounded));
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "connection cap reached: connection closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            // A client may shut its writing side once the request is sent and wait for the
            // answer (the guest harness's busybox nc does): answer it rather than hang up.
            .half_close(true)
            .keep_alive(true);
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let open = limits.max_connections - connections.available_permits();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(open, grace = ?limits.shutdown_grace, "connections still open at the end of the shutdown grace: dropped");
        }
    }
    Ok(())
}

#[derive(Debug)]
struct Guard {
    in_flight: Arc<Semaphore>,
    body_timeout: Duration,
}

/// Every request: a slot among the requests in flight, and a body that must keep moving.
async fn bounded(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let Ok(_slot) = guard.in_flight.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "1")],
            "busy: too many requests in flight; retry\n",
        )
            .into_response();
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::Body::new(Stalling::new(body, guard.body_timeout));
    next.run(Request::from_parts(parts, body)).await
}

/// A request body that fails when it makes no progress for `timeout`.
struct Stalling {
    inner: axum::body::Body,
    timeout: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Stalling {
    fn new(inner: axum::body::Body, timeout: Duration) -> Self {
        Stalling {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// The error of a body that stalled.
#[derive(Debug, thiserror::Error)]
#[error("the request body made no progress for {0:?}")]
pub struct BodyStalled(Duration);

impl Body for Stalling {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.timeout;
                this.sleep.as_mut().reset(next);
                Poll::Ready(frame.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
