//! Tokens by hash, as a persistent map: a published snapshot shares it whole, and a
//! change after that copies only the few pieces it touches.
//!
//! Two radix levels over the hash's bytes 8..16 pick one of `2^bits` leaves; a leaf is a
//! small open-addressed array probed from the hash's first eight bytes. Token hashes are
//! SHA-256 outputs, uniform already, and clients cannot choose which hashes the map
//! holds, so the bytes are the hash.
//!
//! A leaf holds the routes themselves: a lookup of a token not used recently waits for
//! its slot (the route next to its hash), not for a slot and then a route record
//! elsewhere. A request holds its route through a [`TokenRef`], which keeps the leaf
//! alive.
//!
//! A change copies the root's pointers, one branch's pointers and one leaf (at 100,000
//! tokens 128 + 64 pointers and 16 or 32 slots), where a flat hash map shared with a
//! snapshot had to be copied whole. The map is rebuilt with more or fewer leaves when a
//! leaf holds 16 entries on average or fewer than 2, as a growing hash table is:
//! amortised O(1) per change.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

use super::TokenRoute;
use crate::token::TokenHash;

type Entry = (TokenHash, TokenRoute);
/// Open addressing, linear probing, at most half full: a probe ends at an empty slot.
type Leaf = Arc<[Option<Entry>]>;
type Branch = Arc<[Leaf]>;

/// Mean entries per leaf right after a rebuild, and the bounds that trigger the next one.
const MEAN_ENTRIES: usize = 8;
const GROW_AT: usize = 16;
const SHRINK_AT: usize = 2;

static EMPTY_LEAF: LazyLock<Leaf> = LazyLock::new(|| Arc::from(Vec::new()));

/// Tokens by hash.
#[derive(Clone, Debug)]
pub struct TokenMap {
    len: usize,
    /// log2 of the number of branches.
    root_bits: u32,
    /// log2 of the number of leaves in one branch.
    branch_bits: u32,
    root: Arc<[Branch]>,
}

impl Default for TokenMap {
    fn default() -> Self {
        Self::from_entries(Vec::new())
    }
}

impl TokenMap {
    /// A map of `entries` (a later entry of the same hash wins).
    pub fn from_entries(entries: Vec<Entry>) -> Self {
        let leaves_bits = (entries.len() / MEAN_ENTRIES).max(1).ilog2();
        let (root_bits, branch_bits) = (leaves_bits.div_ceil(2), leaves_bits / 2);
        let mut grouped: Vec<Vec<Entry>> = vec![Vec::new(); 1 << leaves_bits];
        for entry in entries {
            let (branch, leaf) = position(root_bits, branch_bits, &entry.0);
            grouped[(branch << branch_bits) | leaf].push(entry);
        }
        let mut len = 0;
        let mut leaves = grouped.into_iter().map(|entries| {
            let leaf = build_leaf(entries);
            len += leaf.iter().flatten().count();
            leaf
        });
        let root = (0..1usize << root_bits).map(|_| leaves.by_ref().take(1 << branch_bits).collect()).collect();
        drop(leaves);
        Self { len, root_bits, branch_bits, root }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The route of the token with hash `hash`.
    pub fn get(&self, hash: &TokenHash) -> Option<TokenRef> {
        let leaf = self.leaf(hash);
        // Start loading the leaf's reference count alongside the slot: the clone below
        // then finds it in cache rather than waiting for a second miss after the first.
        std::hint::black_box(Arc::strong_count(leaf));
        let slot = find(leaf, hash)?;
        Some(TokenRef { leaf: leaf.clone(), slot: slot as u32 })
    }

    /// Every token, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.root.iter().flat_map(|branch| branch.iter()).flat_map(|leaf| leaf.iter().flatten())
    }

    /// Sets the route of `hash`.
    pub fn insert(&mut self, hash: TokenHash, route: TokenRoute) {
        self.edit_leaf(&hash, |entries| match entries.iter_mut().find(|(h, _)| *h == hash) {
            Some(entry) => entry.1 = route,
            None => entries.push((hash, route)),
        });
    }

    /// Removes `hash`, if present.
    pub fn remove(&mut self, hash: &TokenHash) {
        if self.get(hash).is_some() {
            self.edit_leaf(hash, |entries| entries.retain(|(h, _)| h != hash));
        }
    }

    fn leaf(&self, hash: &TokenHash) -> &Leaf {
        let (branch, leaf) = position(self.root_bits, self.branch_bits, hash);
        &self.root[branch][leaf]
    }

    /// Rebuilds the leaf of `hash` with `edit` applied to its entries, copying on the way
    /// down whatever a snapshot still shares.
    fn edit_leaf(&mut self, hash: &TokenHash, edit: impl FnOnce(&mut Vec<Entry>)) {
        let (branch, leaf) = position(self.root_bits, self.branch_bits, hash);
        let branch = &mut Arc::make_mut(&mut self.root)[branch];
        let leaf = &mut Arc::make_mut(branch)[leaf];
        let mut entries: Vec<Entry> = leaf.iter().flatten().cloned().collect();
        let before = entries.len();
        edit(&mut entries);
        self.len = self.len + entries.len() - before;
        *leaf = build_leaf(entries);
        let leaves = 1usize << (self.root_bits + self.branch_bits);
        if self.len > GROW_AT * leaves || (leaves > 1 && self.len < SHRINK_AT * leaves) {
            *self = Self::from_entries(self.iter().cloned().collect());
        }
    }
}

/// A route in a published map; derefs to the [`TokenRoute`].
#[derive(Clone)]
pub struct TokenRef {
    leaf: Leaf,
    slot: u32,
}

impl Deref for TokenRef {
    type Target = TokenRoute;

    fn deref(&self) -> &TokenRoute {
        &self.leaf[self.slot as usize].as_ref().expect("a TokenRef points at a full slot").1
    }
}

impl fmt::Debug for TokenRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Branch and leaf of `hash` in a map of `2^root_bits` branches of `2^branch_bits` leaves.
fn position(root_bits: u32, branch_bits: u32, hash: &TokenHash) -> (usize, usize) {
    let bytes: [u8; 8] = hash.0[8..16].try_into().expect("eight bytes");
    let place = u64::from_le_bytes(bytes) as usize;
    (place & ((1 << root_bits) - 1), (place >> root_bits) & ((1 << branch_bits) - 1))
}

/// Where a probe for `hash` starts in a leaf of `slots` slots.
fn home(hash: &TokenHash, slots: usize) -> usize {
    let bytes: [u8; 8] = hash.0[..8].try_into().expect("eight bytes");
    u64::from_le_bytes(bytes) as usize & (slots - 1)
}

fn find(leaf: &[Option<Entry>], hash: &TokenHash) -> Option<usize> {
    if leaf.is_empty() {
        return None;
    }
    let mask = leaf.len() - 1;
    let mut i = home(hash, leaf.len());
    loop {
        match &leaf[i] {
            None => return None,
            Some((h, _)) if h == hash => return Some(i),
            Some(_) => i = (i + 1) & mask,
        }
    }
}

/// A leaf of `entries`, at most half full (a later entry of the same hash wins).
fn build_leaf(entries: Vec<Entry>) -> Leaf {
    if entries.is_empty() {
        return EMPTY_LEAF.clone();
    }
    let slots = (entries.len() * 2).next_power_of_two();
    let mut leaf: Vec<Option<Entry>> = vec![None; slots];
    for (hash, route) in entries {
        let mut i = home(&hash, slots);
        while let Some((h, _)) = &leaf[i]
            && *h != hash
        {
            i = (i + 1) & (slots - 1);
        }
        leaf[i] = Some((hash, route));
    }
    Arc::from(leaf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;

    fn route(name: &str) -> TokenRoute {
        TokenRoute {
            namespace: Arc::from("ns"),
            name: Arc::from(name),
            project: Arc::from("p"),
            project_uid: None,
            issued_at_us: 0,
            expires_at_us: 1,
            revoked: false,
            max_requests: None,
            request_count: 0,
            models: None,
            requests_per_minute: None,
            window_limits: Default::default(),
        }
    }

    #[test]
    fn it_behaves_like_a_map_through_growth_and_shrinking() {
        let hashes: Vec<TokenHash> = (0..3_000).map(|_| Token::mint().unwrap().hash()).collect();
        let mut map = TokenMap::default();
        let mut model = std::collections::HashMap::new();
        for (i, hash) in hashes.iter().enumerate() {
            map.insert(*hash, route(&format!("t{i}")));
            model.insert(*hash, format!("t{i}"));
        }
        assert!(map.root_bits + map.branch_bits >= 7, "grew to many leaves");
        for hash in hashes.iter().step_by(3) {
            map.insert(*hash, route("renamed"));
            model.insert(*hash, "renamed".into());
        }
        for hash in hashes.iter().skip(1).step_by(2).take(1_400) {
            map.remove(hash);
            model.remove(hash);
        }
        map.remove(&Token::mint().unwrap().hash());
        assert_eq!(map.len(), model.len());
        assert_eq!(map.iter().count(), model.len());
        for hash in &hashes {
            assert_eq!(map.get(hash).map(|r| r.name.to_string()), model.get(hash).cloned());
        }
        for hash in &hashes {
            map.remove(hash);
        }
        assert!(map.is_empty());
        assert_eq!((map.root_bits, map.branch_bits), (0, 0), "shrank back to one leaf");
    }

    #[test]
    fn a_snapshot_keeps_its_view_and_shares_what_did_not_change() {
        let hashes: Vec<TokenHash> = (0..1_000).map(|_| Token::mint().unwrap().hash()).collect();
        let mut map = TokenMap::from_entries(hashes.iter().map(|h| (*h, route("old"))).collect());
        let snapshot = map.clone();
        map.insert(hashes[0], route("new"));
        map.remove(&hashes[1]);
        assert_eq!(&*snapshot.get(&hashes[0]).unwrap().name, "old");
        assert!(snapshot.get(&hashes[1]).is_some());
        assert_eq!(&*map.get(&hashes[0]).unwrap().name, "new");
        assert!(map.get(&hashes[1]).is_none());
        let shared = hashes[2..].iter().filter(|h| Arc::ptr_eq(snapshot.leaf(h), map.leaf(h))).count();
        assert!(shared >= hashes.len() - 2 - 2 * 2 * GROW_AT, "only the touched leaves were copied: {shared} shared");
    }
}
