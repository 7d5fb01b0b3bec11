//! A transport wrapper that takes upstream progress notifications out of the message stream in
//! the order they arrive. rmcp hands each notification to its handler on a task of its own, so
//! two progress notifications (or the last progress and the response) can overtake each other;
//! reading them here, before rmcp dispatches, keeps them in wire order and guarantees that every
//! progress sent before a response is queued before that response is delivered. Log messages
//! are offered to the calls in flight the same way (for callers that ask for logs per request)
//! and then passed on.

use std::sync::Arc;

use rmcp::RoleClient;
use rmcp::model::{JsonRpcMessage, JsonRpcNotification, ServerNotification};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;

use crate::gateway::CallRouter;

pub(crate) struct ProgressTap<T> {
    inner: T,
    server: Arc<str>,
    router: Arc<CallRouter>,
}

impl<T> ProgressTap<T> {
    pub fn new(inner: T, server: Arc<str>, router: Arc<CallRouter>) -> Self {
        Self {
            inner,
            server,
            router,
        }
    }
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for ProgressTap<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleClient>> {
        loop {
            let message = self.inner.receive().await?;
            match message {
                JsonRpcMessage::Notification(JsonRpcNotification {
                    notification: ServerNotification::ProgressNotification(progress),
                    ..
                }) => self.router.push_progress(&self.server, progress.params),
                JsonRpcMessage::Notification(JsonRpcNotification {
                    notification: ServerNotification::LoggingMessageNotification(ref log),
                    ..
                }) => {
                    // Also passed on: clients of the 2025 era hear logs through `setLevel`.
                    self.router.push_log(&self.server, &log.params);
                    return Some(message);
                }
                other => return Some(other),
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}
