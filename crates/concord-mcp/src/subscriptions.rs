//! Resource subscriptions through the gateway: however many clients subscribe to a URI, the
//! owning upstream holds one subscription, taken by the first subscriber and released when the
//! last one leaves (by `resources/unsubscribe` or by going away). `notifications/resources/updated`
//! from the upstream reaches every client subscribed to that URI and no one else. A 2025-era
//! upstream is subscribed with `resources/subscribe`; a 2026-07-28 upstream, which has no such
//! method, with a `subscriptions/listen` stream naming the URI, held open as long as the
//! subscription lasts.

use std::collections::HashMap;
use std::sync::Arc;

use rmcp::model::{ResourceUpdatedNotificationParam, UnsubscribeRequestParams};
use rmcp::service::{Peer, RoleClient, RoleServer, SubscriptionSink};
use tokio::sync::Mutex;

/// Identifies one downstream session (rmcp peers have no identity of their own).
pub(crate) type SessionId = u64;

/// Who receives a URI's updates: a 2025-era session (`resources/subscribe`) or a 2026-07-28
/// `subscriptions/listen` stream.
#[derive(Clone)]
pub(crate) enum Subscriber {
    Session(Peer<RoleServer>),
    Listen(SubscriptionSink),
}

impl Subscriber {
    fn is_gone(&self) -> bool {
        match self {
            Subscriber::Session(peer) => peer.is_transport_closed(),
            // A listen stream removes itself when it ends.
            Subscriber::Listen(_) => false,
        }
    }

    async fn updated(&self, params: ResourceUpdatedNotificationParam) {
        let _ = match self {
            Subscriber::Session(peer) => peer.notify_resource_updated(params).await.map_err(|_| ()),
            Subscriber::Listen(sink) => sink
                .notify_resource_updated(params.uri)
                .await
                .map_err(|_| ()),
        };
    }
}

/// What the gateway holds upstream for one URI.
pub(crate) enum UpstreamHold {
    /// `resources/subscribe` was accepted; `resources/unsubscribe` releases it.
    Subscribed,
    /// A `subscriptions/listen` stream relaying the URI's updates; dropping it closes the
    /// stream (rmcp cancels the listen request).
    Listening { _relay: AbortOnDrop },
    /// A resource the node serves itself.
    Local,
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An upstream subscription nobody holds any more, to be released.
pub(crate) struct Abandoned {
    pub server: Arc<str>,
    pub uri: String,
    pub hold: UpstreamHold,
}

impl Abandoned {
    pub async fn release(self, upstream: Option<&Peer<RoleClient>>) {
        match (self.hold, upstream) {
            (UpstreamHold::Subscribed, Some(upstream)) => {
                if let Err(e) = upstream
                    .unsubscribe(UnsubscribeRequestParams::new(self.uri.clone()))
                    .await
                {
                    tracing::debug!(uri = self.uri, error = %e, "upstream unsubscribe failed");
                }
            }
            // Dropping the hold closes the listen stream.
            (UpstreamHold::Listening { .. }, _) | (UpstreamHold::Local, _) | (_, None) => {}
        }
    }
}

struct Subscription {
    server: Arc<str>,
    subscribers: HashMap<SessionId, Subscriber>,
    hold: UpstreamHold,
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    /// uri → subscription. A tokio mutex: the first subscribe and the last unsubscribe talk to
    /// the upstream while holding it, so a subscribe racing an unsubscribe cannot leave the
    /// upstream unsubscribed with a client still waiting for updates.
    by_uri: Mutex<HashMap<String, Subscription>>,
}

impl Subscriptions {
    /// Adds `session` to the subscribers of `uri`; the first subscriber takes the upstream
    /// subscription with `take`.
    pub async fn subscribe<F>(
        &self,
        session: SessionId,
        subscriber: Subscriber,
        server: Arc<str>,
        uri: &str,
        take: F,
    ) -> Result<(), rmcp::service::ServiceError>
    where
        F: Future<Output = Result<UpstreamHold, rmcp::service::ServiceError>>,
    {
        let mut by_uri = self.by_uri.lock().await;
        if let Some(existing) = by_uri.get_mut(uri) {
            existing.subscribers.insert(session, subscriber);
            return Ok(());
        }
        let hold = take.await?;
        by_uri.insert(
            uri.to_string(),
            Subscription {
                server,
                subscribers: HashMap::from([(session, subscriber)]),
                hold,
            },
        );
        Ok(())
    }

    /// Adds a subscriber to a URI the node serves itself (no upstream subscription to take).
    pub async fn subscribe_local(
        &self,
        session: SessionId,
        subscriber: Subscriber,
        server: Arc<str>,
        uri: &str,
    ) {
        self.by_uri
            .lock()
            .await
            .entry(uri.to_string())
            .or_insert_with(|| Subscription {
                server,
                subscribers: HashMap::new(),
                hold: UpstreamHold::Local,
            })
            .subscribers
            .insert(session, subscriber);
    }

    /// Removes `session` from `uri`'s subscribers; returns the upstream subscription to release
    /// when it was the last one.
    pub async fn unsubscribe(&self, session: SessionId, uri: &str) -> Option<Abandoned> {
        let mut by_uri = self.by_uri.lock().await;
        let subscription = by_uri.get_mut(uri)?;
        subscription.subscribers.remove(&session);
        subscription.subscribers.retain(|_, s| !s.is_gone());
        if subscription.subscribers.is_empty() {
            by_uri.remove(uri).map(|s| Abandoned {
                server: s.server,
                uri: uri.to_string(),
                hold: s.hold,
            })
        } else {
            None
        }
    }

    /// Delivers an upstream's update to the URI's subscribers; returns the subscription when
    /// every subscriber had gone, so the caller can release it upstream.
    pub async fn updated(
        &self,
        server: &str,
        params: ResourceUpdatedNotificationParam,
    ) -> Option<Abandoned> {
        let subscribers: Vec<Subscriber> = {
            let mut by_uri = self.by_uri.lock().await;
            let subscription = by_uri.get_mut(&params.uri)?;
            if &*subscription.server != server {
                return None;
            }
            subscription.subscribers.retain(|_, s| !s.is_gone());
            if subscription.subscribers.is_empty() {
                return by_uri.remove(&params.uri).map(|s| Abandoned {
                    server: s.server,
                    uri: params.uri,
                    hold: s.hold,
                });
            }
            subscription.subscribers.values().cloned().collect()
        };
        for subscriber in subscribers {
            subscriber.updated(params.clone()).await;
        }
        None
    }

    /// Takes `server`'s subscriptions again after it reconnected (a restarted server has
    /// forgotten them, and listen streams ended with the old connection).
    pub async fn renew<F, Fut>(&self, server: &str, take: F)
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<UpstreamHold, rmcp::service::ServiceError>>,
    {
        let mut by_uri = self.by_uri.lock().await;
        for (uri, subscription) in by_uri.iter_mut() {
            if &*subscription.server != server {
                continue;
            }
            match take(uri.clone()).await {
                Ok(hold) => subscription.hold = hold,
                Err(e) => {
                    tracing::warn!(uri, error = %e, "could not renew a resource subscription")
                }
            }
        }
    }

    /// The URIs `server` must be subscribed to (after it reconnects).
    pub async fn uris_of(&self, server: &str) -> Vec<String> {
        self.by_uri
            .lock()
            .await
            .iter()
            .filter(|(_, s)| &*s.server == server)
            .map(|(uri, _)| uri.clone())
            .collect()
    }
}
