//! `Prefer: wait=N` (RFC 7240): holding a write's answer until its job is
//! final. Workers publish finished jobs' ids on `{ns}:done` (one notice per
//! group of record writes, ids space-separated); one
//! subscription per API process wakes the requests waiting for that id, so a
//! waiting request reads its job record once when woken (and at most once a
//! second as a fallback, should a notice be missed), never in a tight loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use kvq_shared::connection::Connector;
use tokio::sync::oneshot;

/// The longest wait a client may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Requests waiting for jobs, by job id.
#[derive(Clone, Default)]
pub struct Waiters(Arc<Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>>);

impl Waiters {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        // Each use is one insert or remove: a panic cannot leave it half-done.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A receiver that fires when job `id` is announced finished.
    pub fn register(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.map().entry(id.to_owned()).or_default().push(tx);
        rx
    }

    /// Drops the waiters of job `id` whose requests have given up.
    pub fn forget(&self, id: &str) {
        let mut map = self.map();
        if let Some(senders) = map.get_mut(id) {
            senders.retain(|tx| !tx.is_closed());
            if senders.is_empty() {
                map.remove(id);
            }
        }
    }

    fn notify(&self, id: &str) {
        if let Some(senders) = self.map().remove(id) {
            for tx in senders {
                let _ = tx.send(());
            }
        }
    }

    /// Follows the `{ns}:done` channel for the life of the process,
    /// reconnecting after errors.
    pub async fn follow(self, client: Connector, channel: String) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.follow_once(&client, &channel).await {
                Ok(()) => tracing::warn!("job notices ended; resubscribing"),
                Err(e) => tracing::warn!(error = %e, "job notices unavailable; resubscribing"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn follow_once(&self, client: &Connector, channel: &str) -> redis::RedisResult<()> {
        let mut pubsub = client.pubsub().await?;
        pubsub.subscribe(channel).await?;
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            // A notice names every job of a group of record writes.
            if let Ok(ids) = message.get_payload::<String>() {
                for id in ids.split_ascii_whitespace() {
                    self.notify(id);
                }
            }
        }
        Ok(())
    }
}

/// The `wait=N` preference of a request, capped at [`MAX_WAIT`]; `None`
/// without one.
pub fn preferred_wait(headers: &actix_web::http::header::HeaderMap) -> Option<Duration> {
    headers
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|pref| {
            let (name, value) = pref.split(';').next()?.split_once('=')?;
            (name.trim().eq_ignore_ascii_case("wait"))
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .next()
        .map(|secs| Duration::from_secs(secs).min(MAX_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};

    fn prefer(value: &'static str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert(
            HeaderName::from_static("prefer"),
            HeaderValue::from_static(value),
        );
        preferred_wait(&headers)
    }

    #[test]
    fn reads_the_wait_preference() {
        assert_eq!(prefer("wait=5"), Some(Duration::from_secs(5)));
        assert_eq!(
            prefer("respond-async, wait=10"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(prefer("wait=100"), Some(MAX_WAIT));
        assert_eq!(prefer("return=minimal"), None);
        assert_eq!(prefer("wait=soon"), None);
    }
}
