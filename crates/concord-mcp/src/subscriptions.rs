//! Resource subscriptions through the gateway: however many clients subscribe to a URI, the
//! owning upstream holds one subscription, taken by the first subscriber and released when the
//! last one leaves (by `resources/unsubscribe` or by going away). `notifications/resources/updated`
//! from the upstream reaches every client subscribed to that URI and no one else.

use std::collections::HashMap;
use std::sync::Arc;

use rmcp::model::{
    ResourceUpdatedNotificationParam, SubscribeRequestParams, UnsubscribeRequestParams,
};
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

struct Subscription {
    server: Arc<str>,
    subscribers: HashMap<SessionId, Subscriber>,
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    /// uri → subscription. A tokio mutex: the first subscribe and the last unsubscribe talk to
    /// the upstream while holding it, so a subscribe racing an unsubscribe cannot leave the
    /// upstream unsubscribed with a client still waiting for updates.
    by_uri: Mutex<HashMap<String, Subscription>>,
}

impl Subscriptions {
    /// Adds `session` to the subscribers of `uri`, subscribing upstream if it is the first.
    pub async fn subscribe(
        &self,
        session: SessionId,
        subscriber: Subscriber,
        server: Arc<str>,
        upstream: &Peer<RoleClient>,
        uri: &str,
    ) -> Result<(), rmcp::service::ServiceError> {
        let mut by_uri = self.by_uri.lock().await;
        if let Some(existing) = by_uri.get_mut(uri) {
            existing.subscribers.insert(session, subscriber);
            return Ok(());
        }
        upstream
            .subscribe(SubscribeRequestParams::new(uri.to_string()))
            .await?;
        by_uri.insert(
            uri.to_string(),
            Subscription {
                server,
                subscribers: HashMap::from([(session, subscriber)]),
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
            })
            .subscribers
            .insert(session, subscriber);
    }

    /// Removes `session` from `uri`'s subscribers; returns the upstream subscription to release
    /// when it was the last one.
    pub async fn unsubscribe(&self, session: SessionId, uri: &str) -> Option<Arc<str>> {
        let mut by_uri = self.by_uri.lock().await;
        let subscription = by_uri.get_mut(uri)?;
        subscription.subscribers.remove(&session);
        subscription.subscribers.retain(|_, s| !s.is_gone());
        if subscription.subscribers.is_empty() {
            by_uri.remove(uri).map(|s| s.server)
        } else {
            None
        }
    }

    /// Releases an upstream subscription nobody holds any more.
    pub async fn release(upstream: &Peer<RoleClient>, uri: &str) {
        if let Err(e) = upstream
            .unsubscribe(UnsubscribeRequestParams::new(uri.to_string()))
            .await
        {
            tracing::debug!(uri, error = %e, "upstream unsubscribe failed");
        }
    }

    /// Delivers an upstream's update to the URI's subscribers; returns the URI when every
    /// subscriber had gone, so the caller can release it upstream.
    pub async fn updated(
        &self,
        server: &str,
        params: ResourceUpdatedNotificationParam,
    ) -> Option<String> {
        let subscribers: Vec<Subscriber> = {
            let mut by_uri = self.by_uri.lock().await;
            let subscription = by_uri.get_mut(&params.uri)?;
            if &*subscription.server != server {
                return None;
            }
            subscription.subscribers.retain(|_, s| !s.is_gone());
            if subscription.subscribers.is_empty() {
                by_uri.remove(&params.uri);
                return Some(params.uri);
            }
            subscription.subscribers.values().cloned().collect()
        };
        for subscriber in subscribers {
            subscriber.updated(params.clone()).await;
        }
        None
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
