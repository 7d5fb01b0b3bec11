//! Who is calling: the principal an authenticated request acts as, and the delegation chain it
//! acts through.

use serde::{Deserialize, Serialize};

/// An authenticated caller. `chain` lists who the call is on behalf of, from the origin (a user)
/// to the party acting now (an agent, a sub-agent); it has at least `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub id: String,
    /// `user`, `agent` or `service`.
    pub kind: String,
    pub roles: Vec<String>,
    pub chain: Vec<String>,
    /// How the request proved it: `jwt`, `api_key`, or `none` (auth off).
    pub method: String,
}

impl Principal {
    /// The caller when authentication is off (loopback only).
    pub fn anonymous(name: &str) -> Self {
        Self {
            id: name.to_string(),
            kind: "user".into(),
            roles: Vec::new(),
            chain: vec![name.to_string()],
            method: "none".into(),
        }
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}
