//! Authentication: who sent a request. Bearer tokens only, as the lab's clients use them:
//!
//! - the admin token (like a `--token-auth-file` line): user `kubernetes-admin` in group
//!   `system:masters`, which the authorizer lets do anything, as the real one does;
//! - service account tokens, issued by the stand-in for a service account and (like the bound
//!   tokens the kubelet projects into a pod) the node the pod runs on: user
//!   `system:serviceaccount:NS:NAME`, groups `system:serviceaccounts`,
//!   `system:serviceaccounts:NS`, `system:authenticated`, and
//!   `authentication.kubernetes.io/node-name` in the user's extra. Such a token is accepted only
//!   while its ServiceAccount exists (the caller checks that).
//!
//! What is not like the real server: tokens are random strings the stand-in remembers, not
//! signed JWTs (the claims a JWT would carry are what the stand-in stores beside the token), and
//! they do not expire; client certificates and impersonation are not supported. A request
//! without a token is `system:anonymous` (group `system:unauthenticated`), as with the real
//! server's default `--anonymous-auth=true`; a token the stand-in did not issue gets 401.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use subtle_eq::constant_time_eq;

/// The group that bypasses authorization (the real server's `system:masters`).
pub const SYSTEM_MASTERS: &str = "system:masters";
/// Every authenticated user is in this group.
pub const SYSTEM_AUTHENTICATED: &str = "system:authenticated";
/// Extra key of bound service account tokens that names the node the pod runs on
/// (Kubernetes 1.30+, `ServiceAccountTokenPodNodeInfo`).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Extra key naming the pod a bound token was issued for.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// Extra key identifying the credential (`JTI=...` for bound tokens).
pub const CREDENTIAL_ID_EXTRA: &str = "authentication.kubernetes.io/credential-id";

/// Bytes of randomness in a token.
const TOKEN_BYTES: usize = 32;

/// An authenticated (or anonymous) user, as `request.userInfo` shows it to admission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// The lab's administrator (the host's kubeconfig).
    pub fn admin() -> UserInfo {
        UserInfo {
            username: "kubernetes-admin".into(),
            uid: String::new(),
            groups: vec![SYSTEM_MASTERS.into(), SYSTEM_AUTHENTICATED.into()],
            extra: BTreeMap::new(),
        }
    }

    /// The lab's own control plane acting in-process (its scheduler, kubelet role and
    /// controllers write through the store directly, as privileged components).
    pub fn control_plane() -> UserInfo {
        UserInfo {
            username: "system:kwire-lab".into(),
            uid: String::new(),
            groups: vec![SYSTEM_MASTERS.into(), SYSTEM_AUTHENTICATED.into()],
            extra: BTreeMap::new(),
        }
    }

    /// A request without credentials.
    pub fn anonymous() -> UserInfo {
        UserInfo {
            username: "system:anonymous".into(),
            uid: String::new(),
            groups: vec!["system:unauthenticated".into()],
            extra: BTreeMap::new(),
        }
    }

    /// The user of a service account token bound to a pod on `node`.
    pub fn service_account(namespace: &str, name: &str, node: Option<&str>) -> UserInfo {
        let mut extra = BTreeMap::new();
        if let Some(node) = node {
            extra.insert(NODE_NAME_EXTRA.to_string(), vec![node.to_string()]);
        }
        UserInfo {
            username: service_account_username(namespace, name),
            uid: String::new(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                SYSTEM_AUTHENTICATED.into(),
            ],
            extra,
        }
    }

    /// `(namespace, name)` when this is a service account's user.
    pub fn service_account_of(&self) -> Option<(&str, &str)> {
        self.username
            .strip_prefix("system:serviceaccount:")?
            .split_once(':')
    }

    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == SYSTEM_MASTERS)
    }
}

/// `system:serviceaccount:NS:NAME`.
pub fn service_account_username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// What a request's credentials say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticated {
    User(UserInfo),
    /// No `Authorization` header.
    Anonymous,
    /// A token the stand-in did not issue, or a malformed header: 401.
    Rejected,
}

/// The tokens the stand-in issued.
#[derive(Default)]
pub struct TokenAuthenticator {
    tokens: Mutex<HashMap<String, UserInfo>>,
}

mod subtle_eq {
    /// Compares two byte strings in time that depends only on their lengths.
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl TokenAuthenticator {
    /// Issues a new token for `user`.
    pub fn issue(&self, mut user: UserInfo) -> String {
        let mut raw = [0u8; TOKEN_BYTES];
        OsRng.fill_bytes(&mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        if user.service_account_of().is_some() {
            let mut id = [0u8; 8];
            OsRng.fill_bytes(&mut id);
            let jti = id.iter().map(|b| format!("{b:02x}")).collect::<String>();
            user.extra
                .insert(CREDENTIAL_ID_EXTRA.into(), vec![format!("JTI={jti}")]);
        }
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.clone(), user);
        token
    }

    /// The user of an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Authenticated {
        let Some(header) = header else {
            return Authenticated::Anonymous;
        };
        let Some(token) = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Authenticated::Rejected;
        };
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        // Every issued token is compared, so the time taken says nothing about which matched.
        let mut found = None;
        for (t, user) in tokens.iter() {
            if constant_time_eq(t.as_bytes(), token.as_bytes()) {
                found = Some(user.clone());
            }
        }
        found.map_or(Authenticated::Rejected, Authenticated::User)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_name_their_user_and_others_are_rejected() {
        let a = TokenAuthenticator::default();
        let admin = a.issue(UserInfo::admin());
        let sa = a.issue(UserInfo::service_account(
            "kube-system",
            "kwire",
            Some("n1"),
        ));
        assert_ne!(admin, sa);
        let Authenticated::User(u) = a.authenticate(Some(&format!("Bearer {sa}"))) else {
            panic!("the service account token is accepted");
        };
        assert_eq!(u.username, "system:serviceaccount:kube-system:kwire");
        assert_eq!(u.extra[NODE_NAME_EXTRA], vec!["n1".to_string()]);
        assert!(u.extra[CREDENTIAL_ID_EXTRA][0].starts_with("JTI="));
        assert!(u
            .groups
            .contains(&"system:serviceaccounts:kube-system".into()));
        assert_eq!(u.service_account_of(), Some(("kube-system", "kwire")));
        assert!(!u.is_master());
        let Authenticated::User(u) = a.authenticate(Some(&format!("Bearer {admin}"))) else {
            panic!("the admin token is accepted");
        };
        assert!(u.is_master());
        assert_eq!(a.authenticate(None), Authenticated::Anonymous);
        assert_eq!(a.authenticate(Some("Bearer nope")), Authenticated::Rejected);
        assert_eq!(a.authenticate(Some("Basic abc")), Authenticated::Rejected);
    }
}
