//! Shared testbed services Certo runs itself: a top BDII that answers the way a top BDII
//! introduces itself, so that every patch's slice has a real one to use and the guard has
//! a real identity to protect.
//!
//! To each connection the top BDII writes
//! ```text
//! dn: mds-vo-name=NAME,o=grid
//! GlueServiceUniqueID: NAME:PORT
//! GlueServiceType: bdii_top
//! ```
//! and closes its side; then it reads at most one line the client sends (a `REGISTER ...`
//! of a node that would announce itself as the top BDII) within [`LINE_WAIT`], logs it
//! and drops it: nothing a client says changes what the service answers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How long a connection may take to send its one line after the banner.
pub const LINE_WAIT: Duration = Duration::from_secs(2);
/// Most bytes of a client's line read (the rest is ignored).
pub const LINE_MAX: u64 = 4096;
/// Most connections served at once (others wait in the listen queue).
pub const MAX_CONNECTIONS: usize = 64;

/// The banner a top BDII named `name` answers with on `port`.
pub fn top_bdii_banner(name: &str, port: u16) -> String {
    format!(
        "dn: mds-vo-name={name},o=grid\nGlueServiceUniqueID: {name}:{port}\nGlueServiceType: bdii_top\n"
    )
}

/// Serves a top BDII named `name` on `listener` until `shutdown` completes; every line a
/// client sends is logged (warn) and has no effect.
pub async fn serve_top_bdii(
    listener: TcpListener,
    name: &str,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_top_bdii_with(listener, name, shutdown, |_, _| {}).await
}

/// [`serve_top_bdii`], also telling `heard` each line a client sent (its address, the
/// line without its end).
pub async fn serve_top_bdii_with(
    listener: TcpListener,
    name: &str,
    shutdown: impl Future<Output = ()>,
    heard: impl Fn(SocketAddr, &str) + Send + Sync + 'static,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let banner: Arc<str> = top_bdii_banner(name, port).into();
    let name: Arc<str> = name.into();
    let heard = Arc::new(heard);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin or stop.
                    tracing::warn!(error = %e, "top BDII: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (banner, name, heard) = (banner.clone(), name.clone(), heard.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(stream, peer, &banner, &name, &*heard).await {
                tracing::debug!(%peer, error = %e, "top BDII: connection ended early");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    banner: &str,
    name: &str,
    heard: &(dyn Fn(SocketAddr, &str) + Send + Sync),
) -> std::io::Result<()> {
    stream.write_all(banner.as_bytes()).await?;
    // Banner, then close: the client reads to the end at once.
    stream.shutdown().await?;
    let mut line = Vec::new();
    let read = tokio::time::timeout(
        LINE_WAIT,
        BufReader::new(stream.take(LINE_MAX)).read_until(b'\n', &mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&line);
    let text: String = text
        .trim_end_matches(['\r', '\n'])
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.trim().is_empty() {
        return Ok(());
    }
    tracing::warn!(%peer, line = %text, "the shared top BDII {name} takes no registrations; nothing changed");
    heard(peer, &text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_like_a_top_bdii_and_a_registration_changes_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let server = tokio::spawn(serve_top_bdii_with(
            listener,
            "testbed-bdii.certo",
            async move {
                let _ = stopped.await;
            },
            move |_, line| {
                let _ = tx.send(line.to_owned());
            },
        ));
        let expected = format!(
            "dn: mds-vo-name=testbed-bdii.certo,o=grid\nGlueServiceUniqueID: testbed-bdii.certo:{}\nGlueServiceType: bdii_top\n",
            addr.port()
        );
        // A reader gets the banner and the end at once.
        let mut said = String::new();
        let mut s = TcpStream::connect(addr).await.expect("connect");
        tokio::time::timeout(Duration::from_secs(1), s.read_to_string(&mut said))
            .await
            .expect("closed within 1 s")
            .expect("read");
        assert_eq!(said, expected);
        // A hijacker's registration is heard and changes nothing.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(
            b"REGISTER GlueServiceUniqueID=testbed-bdii.certo:2170 GlueServiceType=bdii_top\n",
        )
        .await
        .expect("write");
        let mut said = String::new();
        s.read_to_string(&mut said).await.expect("read");
        assert_eq!(said, expected);
        let line = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("heard within 2 s")
            .expect("a line");
        assert_eq!(
            line,
            "REGISTER GlueServiceUniqueID=testbed-bdii.certo:2170 GlueServiceType=bdii_top"
        );
        let mut said = String::new();
        TcpStream::connect(addr)
            .await
            .expect("connect")
            .read_to_string(&mut said)
            .await
            .expect("read");
        assert_eq!(said, expected);
        // A connection that says nothing and goes (a health check) leaves it serving.
        drop(TcpStream::connect(addr).await.expect("connect"));
        let mut said = String::new();
        TcpStream::connect(addr)
            .await
            .expect("connect")
            .read_to_string(&mut said)
            .await
            .expect("read");
        assert_eq!(said, expected);
        stop.send(()).expect("stop");
        server.await.expect("join").expect("served");
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }
}
