//! The testbed registry's health checks: shared long-running services are checked every
//! round and marked unhealthy when they stop answering (what guests see through
//! `/api/v1/guest/testbed`).

use std::time::Duration;

use crate::store::{Store, StoreError};

/// Checks the shared services every `every`, forever.
pub async fn health_loop(store: Store, every: Duration) {
    loop {
        if let Err(e) = check_health(&store).await {
            tracing::warn!(error = %e, "health check round failed");
        }
        tokio::time::sleep(every).await;
    }
}

/// One health-check round over the shared services: a TCP connection within 2 s.
pub async fn check_health(store: &Store) -> Result<(), StoreError> {
    for service in store.services(None).await? {
        if service.slice.is_some() {
            continue;
        }
        let connect = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(service.endpoint.as_str()),
        )
        .await;
        let (healthy, detail) = match connect {
            Ok(Ok(_)) => (true, "answers".to_owned()),
            Ok(Err(e)) => (false, format!("connect: {e}")),
            Err(_) => (false, "no answer within 2 s".to_owned()),
        };
        if store.set_health(service.id, healthy, &detail).await? {
            if healthy {
                tracing::info!(service = %service.name, endpoint = %service.endpoint, "service healthy again");
            } else {
                tracing::warn!(service = %service.name, endpoint = %service.endpoint, %detail, "service unhealthy");
            }
        }
    }
    Ok(())
}
