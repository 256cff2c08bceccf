//! A minted token's fate: the rules the controller (status) and the proxy (routing table)
//! both apply, so they cannot disagree.
//!
//! In: what each side observed about a token and its Project ([`Facts`]). Out: one
//! [`Fate`], the most lasting reason first: a token of a deactivated project that has
//! also used up its requests is `Exhausted` (reactivating the project would not make it
//! usable), never `ProjectInactive` on one side and `Exhausted` on the other.
//!
//! A token is bound for life to the Project object it was minted for, not to its name:
//! a Project deleted by force and created again under the same name is a new object
//! (new `metadata.uid`) and does not inherit the old tokens ([`is_bound`]).

/// What decides a minted token's fate, as one side observed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Facts {
    /// Its Project exists and is the object it was minted for ([`is_bound`]).
    pub bound: bool,
    /// Revoked directly (`spec.revoked`, or already `Revoked` in status).
    pub revoked: bool,
    /// Issued before its project's `tokensNotBefore`.
    pub bulk_revoked: bool,
    /// Past its expiry.
    pub expired: bool,
    /// `maxRequests` used up.
    pub exhausted: bool,
    /// Its namespace is (still) granted by its project's `allowedNamespaces`.
    pub namespace_allowed: bool,
    /// Its project is active and not being deleted.
    pub project_active: bool,
}

/// A minted token's fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Its Project is gone (or replaced by another object of the same name). Final.
    ProjectDeleted,
    /// Revoked directly. Final.
    Revoked,
    /// Revoked by its project's `tokensNotBefore`. Final.
    BulkRevoked,
    /// Past its expiry. Final.
    Expired,
    /// `maxRequests` used up.
    Exhausted,
    /// Refused while its project no longer grants its namespace; usable again if the
    /// grant returns (not a revocation).
    NamespaceNotAllowed,
    /// Refused while its project is inactive; usable again when it is reactivated.
    ProjectInactive,
    /// Usable.
    Usable,
}

impl Facts {
    /// The fate these facts decide, the most lasting reason first. Pure.
    pub(crate) fn fate(&self) -> Fate {
        if !self.bound {
            Fate::ProjectDeleted
        } else if self.revoked {
            Fate::Revoked
        } else if self.bulk_revoked {
            Fate::BulkRevoked
        } else if self.expired {
            Fate::Expired
        } else if self.exhausted {
            Fate::Exhausted
        } else if !self.namespace_allowed {
            Fate::NamespaceNotAllowed
        } else if !self.project_active {
            Fate::ProjectInactive
        } else {
            Fate::Usable
        }
    }
}

/// Whether a token minted for the Project with uid `minted_for` (`None`: minted before
/// tokens recorded it) at `issued_at_us` belongs to the Project that now carries its
/// `projectRef.name`, whose uid is `uid` and which was created at `created_at_us`
/// (Unix microseconds).
pub(crate) fn is_bound(minted_for: Option<&str>, issued_at_us: i64, uid: &str, created_at_us: i64) -> bool {
    match minted_for {
        Some(minted_for) => minted_for == uid,
        // Tokens minted before `status.projectUid` existed: the Project must already have
        // existed when the token was issued. (`creationTimestamp` has whole seconds, so
        // a replacement created within the same second as the mint is not told apart;
        // the controller records the uid of such tokens on its next reconcile.)
        None => created_at_us <= issued_at_us,
    }
}

#[cfg(test)]
mod tests {
    use super::{Facts, Fate, is_bound};

    #[test]
    fn the_most_lasting_reason_decides() {
        let usable = Facts { bound: true, namespace_allowed: true, project_active: true, ..Facts::default() };
        assert_eq!(usable.fate(), Fate::Usable);
        let exhausted_and_inactive = Facts { exhausted: true, project_active: false, ..usable };
        assert_eq!(exhausted_and_inactive.fate(), Fate::Exhausted);
        assert_eq!(Facts { project_active: false, ..usable }.fate(), Fate::ProjectInactive);
        // A namespace without its grant, of an inactive project: the token's own reason first.
        let ungranted = Facts { namespace_allowed: false, project_active: false, ..usable };
        assert_eq!(ungranted.fate(), Fate::NamespaceNotAllowed);
        assert_eq!(Facts { exhausted: true, ..ungranted }.fate(), Fate::Exhausted);
        let everything = Facts {
            bound: false,
            revoked: true,
            bulk_revoked: true,
            expired: true,
            exhausted: true,
            namespace_allowed: false,
            project_active: false,
        };
        assert_eq!(everything.fate(), Fate::ProjectDeleted);
        assert_eq!(Facts { bound: true, ..everything }.fate(), Fate::Revoked);
        assert_eq!(Facts { bound: true, revoked: false, ..everything }.fate(), Fate::BulkRevoked);
        assert_eq!(Facts { bound: true, revoked: false, bulk_revoked: false, ..everything }.fate(), Fate::Expired);
    }

    #[test]
    fn a_token_belongs_to_the_project_object_it_was_minted_for() {
        assert!(is_bound(Some("uid-1"), 10, "uid-1", 0));
        // Same name, new object: not bound, whatever the times say.
        assert!(!is_bound(Some("uid-1"), 10, "uid-2", 0));
    }

    #[test]
    fn legacy_tokens_are_bound_to_a_project_that_existed_when_they_were_issued() {
        assert!(is_bound(None, 2_000_000, "uid", 1_000_000));
        assert!(is_bound(None, 1_000_000, "uid", 1_000_000));
        assert!(!is_bound(None, 1_000_000, "uid", 2_000_000));
    }
}
