//! Which Project object a minted token belongs to: the rule the controller (status) and
//! the proxy (routing table) both apply, so they cannot disagree.
//!
//! A token is bound for life to the Project object it was minted for, not to its name:
//! a Project deleted by force and created again under the same name is a new object
//! (new `metadata.uid`) and does not inherit the old tokens.

/// Whether a token minted for the Project with uid `minted_for` (`None`: minted before
/// tokens recorded it) at `issued_at_us` belongs to the Project that now carries its
/// `projectRef.name`, whose uid is `uid` and which was created at `created_at_us`
/// (Unix microseconds).
pub fn is_bound(minted_for: Option<&str>, issued_at_us: i64, uid: &str, created_at_us: i64) -> bool {
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
    use super::is_bound;

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
