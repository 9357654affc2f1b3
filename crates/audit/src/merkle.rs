//! RFC 9162 section 2.1 Merkle tree hashing, inclusion and consistency proofs,
//! and the compact [`Frontier`] the writer keeps in memory.
//!
//! Everything here is pure and works on leaf hashes. A log proves from the
//! nodes it stores (perfect subtrees of [`STORED_LEVEL`] and up, see
//! [`Frontier::push_collecting`]) and at most a few blocks of leaf hashes:
//! [`inclusion_ranges`] and [`consistency_ranges`] name the subtrees a proof
//! is made of, [`perfect_subtrees`] splits them into stored nodes, and
//! [`fold`] hashes them back together.

use sha2::{Digest, Sha256};
use std::ops::Range;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Root of the empty tree: SHA-256 of the empty string (RFC 9162 2.1.1).
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// RFC 9162 leaf hash: SHA-256(0x00 || leaf).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(leaf);
    h.finalize().into()
}

/// RFC 9162 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly smaller than `n` (`n >= 2`): where RFC 9162
/// splits a tree of `n` leaves.
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    let k = n.next_power_of_two();
    if k == n { n / 2 } else { k / 2 }
}

/// Merkle Tree Hash (MTH) over leaf hashes; the empty tree hashes to SHA-256("").
pub fn root(leaves: &[Hash]) -> Hash {
    if leaves.is_empty() {
        return empty_root();
    }
    // Folding the compact range gives exactly MTH and needs no recursion.
    let mut frontier = Frontier::new();
    for leaf in leaves {
        frontier.push(*leaf);
    }
    frontier.root()
}

/// The lowest level of the tree a log stores nodes for: a node there covers
/// 256 leaves, so a log stores about one node per 128 entries, and a proof
/// hashes at most a few blocks of 256 leaf hashes below it.
pub const STORED_LEVEL: u32 = 8;

/// A perfect subtree: the `2^level` leaves from `index << level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subtree {
    /// Height above the leaves.
    pub level: u32,
    /// Position among the subtrees of its level.
    pub index: u64,
}

impl Subtree {
    /// Its first leaf.
    pub fn start(self) -> u64 {
        self.index << self.level
    }

    /// One past its last leaf.
    pub fn end(self) -> u64 {
        (self.index + 1) << self.level
    }
}

/// How many nodes a log of `size` entries stores: one per perfect subtree of
/// [`STORED_LEVEL`] and up.
pub fn stored_node_count(size: u64) -> u64 {
    (STORED_LEVEL..64).map(|level| size >> level).sum()
}

/// [`split`] for sizes of a log.
fn split_u64(n: u64) -> u64 {
    debug_assert!(n >= 2);
    let k = n.next_power_of_two();
    if k == n { n / 2 } else { k / 2 }
}

/// The leaf ranges whose tree hashes make up `PATH(m, D[n])` (RFC 9162
/// 2.1.3.1), leaf side first, as [`inclusion_proof`] lists them. Empty when
/// `m >= n`.
pub fn inclusion_ranges(m: u64, n: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    if m >= n {
        return out;
    }
    let (mut start, mut end) = (0, n);
    // From the root down; the proof lists the deepest sibling first.
    while end - start > 1 {
        let k = split_u64(end - start);
        if m < start + k {
            out.push(start + k..end);
            end = start + k;
        } else {
            out.push(start..start + k);
            start += k;
        }
    }
    out.reverse();
    out
}

/// The leaf ranges whose tree hashes make up `PROOF(m, D[n])` (RFC 9162
/// 2.1.4.1), as [`consistency_proof`] lists them. Empty when `m` is 0 or not
/// smaller than `n`.
pub fn consistency_ranges(m: u64, n: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    if m == 0 || m >= n {
        return out;
    }
    let (mut start, mut end, mut complete) = (0, n, true);
    loop {
        let (size, mm) = (end - start, m - start);
        if mm == size {
            if !complete {
                out.push(start..end);
            }
            break;
        }
        let k = split_u64(size);
        if mm <= k {
            out.push(start + k..end);
            end = start + k;
        } else {
            out.push(start..start + k);
            start += k;
            complete = false;
        }
    }
    out.reverse();
    out
}

/// The perfect subtrees a proof's range splits into, left to right, largest
/// first; [`fold`] of their hashes is the range's tree hash. (A range of
/// [`inclusion_ranges`] or [`consistency_ranges`] starts at a multiple of the
/// power of two at or above its length, so it splits as RFC 9162 does.)
pub fn perfect_subtrees(range: Range<u64>) -> Vec<Subtree> {
    let mut out = Vec::new();
    let mut at = range.start;
    while at < range.end {
        let mut level = (range.end - at).ilog2();
        if at != 0 {
            level = level.min(at.trailing_zeros());
        }
        out.push(Subtree {
            level,
            index: at >> level,
        });
        at += 1 << level;
    }
    out
}

/// The tree hash of a range from the hashes of its [`perfect_subtrees`], in
/// order; `None` when there are none.
pub fn fold(hashes: &[Hash]) -> Option<Hash> {
    let (last, rest) = hashes.split_last()?;
    Some(rest.iter().rev().fold(*last, |acc, left| node_hash(left, &acc)))
}

/// MTH of a non-empty slice.
fn subtree_root(leaves: &[Hash]) -> Hash {
    root(leaves)
}

/// Audit path `PATH(m, D[n])` of leaf `index` in the tree of all `leaves`, leaf
/// side first. Empty when `index` is out of range (no proof exists).
///
/// Costs O(n) hashes: the log proves from its stored nodes instead
/// ([`inclusion_ranges`]); this is the reference they are tested against.
pub fn inclusion_proof(index: u64, leaves: &[Hash]) -> Vec<Hash> {
    let Ok(index) = usize::try_from(index) else {
        return Vec::new();
    };
    if index >= leaves.len() {
        return Vec::new();
    }
    let mut proof = Vec::new();
    path(index, leaves, &mut proof);
    proof
}

/// Appends PATH(m, D) to `out`, deepest node first.
fn path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &leaves[..k], out);
        out.push(subtree_root(&leaves[k..]));
    } else {
        path(m - k, &leaves[k..], out);
        out.push(subtree_root(&leaves[..k]));
    }
}

/// Verifies an inclusion proof (RFC 9162 2.1.3.2): `leaf` is entry `index` of the
/// tree of `tree_size` leaves whose root is `root`.
pub fn verify_inclusion(index: u64, tree_size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= tree_size {
        return false;
    }
    let mut fnode = index;
    let mut snode = tree_size - 1;
    let mut r = *leaf;
    for p in proof {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            r = node_hash(p, &r);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    snode == 0 && r == *root
}

/// Consistency proof `PROOF(m, D[n])` between the first `first` leaves and all of
/// `leaves`. Empty when `first` is 0 or not smaller than the tree (nothing to
/// prove, or no proof exists).
pub fn consistency_proof(first: u64, leaves: &[Hash]) -> Vec<Hash> {
    let Ok(first) = usize::try_from(first) else {
        return Vec::new();
    };
    if first == 0 || first >= leaves.len() {
        return Vec::new();
    }
    let mut proof = Vec::new();
    subproof(first, leaves, true, &mut proof);
    proof
}

/// SUBPROOF(m, D, b) of RFC 9162 2.1.4.1, appended to `out`.
fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            out.push(subtree_root(leaves));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &leaves[..k], complete, out);
        out.push(subtree_root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(subtree_root(&leaves[..k]));
    }
}

/// Verifies a consistency proof (RFC 9162 2.1.4.2): the tree of `second` leaves
/// with root `second_root` extends the tree of `first` leaves with root
/// `first_root`. Equal sizes need an empty proof and equal roots; the empty tree
/// is consistent with every tree when its root is SHA-256("").
pub fn verify_consistency(first: u64, second: u64, first_root: &Hash, second_root: &Hash, proof: &[Hash]) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        return proof.is_empty() && *first_root == empty_root();
    }
    if proof.is_empty() {
        return false;
    }
    // When `first` is a power of two its root is a node of the new tree and is
    // not repeated in the proof.
    let (seed, rest) = if first.is_power_of_two() {
        (*first_root, proof)
    } else {
        (proof[0], &proof[1..])
    };
    let mut fnode = first - 1;
    let mut snode = second - 1;
    while fnode & 1 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let mut fr = seed;
    let mut sr = seed;
    for c in rest {
        if snode == 0 {
            return false;
        }
        if fnode & 1 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode & 1 == 0 {
                while fnode & 1 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    fr == *first_root && sr == *second_root && snode == 0
}

/// Compact range over leaves `[0, size)`: the roots of the perfect subtrees the
/// binary representation of `size` decomposes into, largest first. O(log n)
/// hashes, enough to append and to compute the root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    /// Perfect subtree roots, left to right (largest subtree first).
    nodes: Vec<Hash>,
    size: u64,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Frontier::default()
    }

    /// The frontier of a tree holding exactly `leaves`.
    pub fn from_leaves(leaves: &[Hash]) -> Self {
        let mut f = Frontier::new();
        f.extend(leaves);
        f
    }

    /// The frontier of a tree of `size` leaves from the hashes of
    /// `perfect_subtrees(0..size)`, largest first; `None` if there are not
    /// as many as `size` has one bits.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Frontier { nodes, size })
    }

    /// Appends one leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        self.push_inner(leaf, None);
    }

    /// Appends one leaf hash and adds to `completed` each perfect subtree of
    /// [`STORED_LEVEL`] and up that it completes, with its hash: the nodes a
    /// log stores.
    pub fn push_collecting(&mut self, leaf: Hash, completed: &mut Vec<(Subtree, Hash)>) {
        self.push_inner(leaf, Some(completed));
    }

    fn push_inner(&mut self, leaf: Hash, mut completed: Option<&mut Vec<(Subtree, Hash)>>) {
        let index = self.size;
        let mut node = leaf;
        let mut size = self.size;
        let mut level = 0;
        // Each trailing one bit of the old size is a perfect subtree of the same
        // height as `node`: merge them, as carrying in binary addition.
        while size & 1 == 1 {
            match self.nodes.pop() {
                Some(left) => node = node_hash(&left, &node),
                None => break,
            }
            size >>= 1;
            level += 1;
            if level >= STORED_LEVEL
                && let Some(out) = completed.as_deref_mut()
            {
                out.push((
                    Subtree {
                        level,
                        index: index >> level,
                    },
                    node,
                ));
            }
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// Appends leaf hashes in order.
    pub fn extend(&mut self, leaves: &[Hash]) {
        for leaf in leaves {
            self.push(*leaf);
        }
    }

    /// Root hash of the tree so far (MTH).
    pub fn root(&self) -> Hash {
        let mut iter = self.nodes.iter().rev();
        let Some(last) = iter.next() else {
            return empty_root();
        };
        iter.fold(*last, |acc, left| node_hash(left, &acc))
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The CT reference leaves (certificate-transparency-go, Trillian and
    /// transparency-dev/merkle test suites).
    fn reference_leaves() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            vec![0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            (0x60..=0x6f).collect(),
        ]
    }

    fn reference_hashes() -> Vec<Hash> {
        reference_leaves().iter().map(|l| leaf_hash(l)).collect()
    }

    /// Roots of the reference tree for sizes 0..=8.
    const REFERENCE_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// (0-based index, tree size, expected audit path), transparency-dev/merkle
    /// proof/verify_test.go `inclusionProofs`.
    fn reference_inclusion() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (
                0,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                5,
                8,
                vec![
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                3,
                vec![h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")],
            ),
            (
                1,
                5,
                vec![
                    h("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
            (0, 1, vec![]),
        ]
    }

    /// (first, second, expected proof), transparency-dev/merkle
    /// proof/verify_test.go `consistencyProofs`.
    fn reference_consistency() -> Vec<(u64, u64, Vec<Hash>)> {
        vec![
            (1, 1, vec![]),
            (
                1,
                8,
                vec![
                    h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
                ],
            ),
            (
                6,
                8,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
            (
                2,
                5,
                vec![
                    h("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
                    h("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
                ],
            ),
            (
                6,
                7,
                vec![
                    h("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
                    h("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
                    h("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
                ],
            ),
        ]
    }

    /// MTH straight from the RFC's recursive definition, sharing no code with
    /// the implementation under test (not even `split`).
    fn naive_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => Sha256::digest(b"").into(),
            1 => leaves[0],
            n => {
                let mut k = 1;
                while k * 2 < n {
                    k *= 2;
                }
                let mut h = Sha256::new();
                h.update([1u8]);
                h.update(naive_root(&leaves[..k]));
                h.update(naive_root(&leaves[k..]));
                h.finalize().into()
            }
        }
    }

    fn synthetic(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(format!("entry {i}").as_bytes())).collect()
    }

    #[test]
    fn hashing_uses_the_rfc_prefixes() {
        let mut manual = Sha256::new();
        manual.update([0x00, b'a']);
        assert_eq!(leaf_hash(b"a"), <Hash>::from(manual.finalize()));
        let (l, r) = (leaf_hash(b"l"), leaf_hash(b"r"));
        let mut manual = Sha256::new();
        manual.update([0x01]);
        manual.update(l);
        manual.update(r);
        assert_eq!(node_hash(&l, &r), <Hash>::from(manual.finalize()));
        assert_ne!(node_hash(&l, &r), node_hash(&r, &l));
    }

    #[test]
    fn reference_roots_for_every_size() {
        let leaves = reference_hashes();
        for (n, want) in REFERENCE_ROOTS.iter().enumerate() {
            assert_eq!(hex::encode(root(&leaves[..n])), *want, "root of size {n}");
            assert_eq!(
                hex::encode(Frontier::from_leaves(&leaves[..n]).root()),
                *want,
                "frontier of size {n}"
            );
        }
    }

    #[test]
    fn reference_inclusion_proofs() {
        let leaves = reference_hashes();
        for (index, size, want) in reference_inclusion() {
            let tree = &leaves[..size as usize];
            let proof = inclusion_proof(index, tree);
            assert_eq!(proof, want, "path of leaf {index} in tree of {size}");
            let r = h(REFERENCE_ROOTS[size as usize]);
            assert!(verify_inclusion(index, size, &leaves[index as usize], &want, &r));
            // The vector's proof is rejected for any other position or size.
            if size > 1 {
                assert!(!verify_inclusion(index ^ 1, size, &leaves[index as usize], &want, &r));
                assert!(!verify_inclusion(index, size * 2, &leaves[index as usize], &want, &r));
            }
        }
    }

    #[test]
    fn reference_consistency_proofs() {
        let leaves = reference_hashes();
        for (first, second, want) in reference_consistency() {
            let proof = consistency_proof(first, &leaves[..second as usize]);
            assert_eq!(proof, want, "proof {first} -> {second}");
            let r1 = h(REFERENCE_ROOTS[first as usize]);
            let r2 = h(REFERENCE_ROOTS[second as usize]);
            assert!(
                verify_consistency(first, second, &r1, &r2, &want),
                "verify {first} -> {second}"
            );
            if first != second {
                assert!(
                    !verify_consistency(first, second, &r2, &r1, &want),
                    "swapped roots {first} -> {second}"
                );
                assert!(
                    !verify_consistency(first, second, &r1, &r2, &[]),
                    "empty proof {first} -> {second}"
                );
                let mut longer = want.clone();
                longer.push(r2);
                assert!(
                    !verify_consistency(first, second, &r1, &r2, &longer),
                    "trailing garbage"
                );
                for i in 0..want.len() {
                    let mut bad = want.clone();
                    bad[i][0] ^= 0x10;
                    assert!(
                        !verify_consistency(first, second, &r1, &r2, &bad),
                        "modified proof[{i}]"
                    );
                }
            }
        }
    }

    #[test]
    fn degenerate_cases() {
        let empty = empty_root();
        assert_eq!(root(&[]), empty);
        assert!(inclusion_proof(0, &[]).is_empty());
        assert!(inclusion_proof(3, &synthetic(3)).is_empty());
        assert!(!verify_inclusion(0, 0, &empty, &[], &empty));
        let leaves = synthetic(5);
        let r5 = root(&leaves);
        assert!(verify_consistency(0, 5, &empty, &r5, &[]));
        assert!(!verify_consistency(0, 5, &leaves[0], &r5, &[]));
        assert!(!verify_consistency(0, 5, &empty, &r5, &[empty]));
        assert!(verify_consistency(5, 5, &r5, &r5, &[]));
        assert!(!verify_consistency(5, 5, &r5, &r5, &[r5]));
        assert!(!verify_consistency(5, 3, &r5, &root(&leaves[..3]), &[]));
        assert!(consistency_proof(6, &leaves).is_empty());
    }

    #[test]
    fn agrees_with_naive_recursion_on_many_sizes() {
        let leaves = synthetic(300);
        let mut frontier = Frontier::new();
        for n in 0..=leaves.len() {
            assert_eq!(root(&leaves[..n]), naive_root(&leaves[..n]), "size {n}");
            assert_eq!(frontier.root(), naive_root(&leaves[..n]), "frontier size {n}");
            assert_eq!(frontier.size(), n as u64);
            if n < leaves.len() {
                frontier.push(leaves[n]);
            }
        }
    }

    /// Recomputes the root from a proof with the RFC's recursive definition,
    /// independently of `verify_inclusion`.
    fn naive_root_from_path(index: usize, n: usize, leaf: Hash, proof: &[Hash]) -> Option<Hash> {
        fn go(m: usize, n: usize, leaf: Hash, proof: &mut Vec<Hash>) -> Option<Hash> {
            if n == 1 {
                return Some(leaf);
            }
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            let sibling = proof.pop()?;
            if m < k {
                Some(node_hash(&go(m, k, leaf, proof)?, &sibling))
            } else {
                Some(node_hash(&sibling, &go(m - k, n - k, leaf, proof)?))
            }
        }
        let mut stack = proof.to_vec();
        let r = go(index, n, leaf, &mut stack)?;
        stack.is_empty().then_some(r)
    }

    #[test]
    fn inclusion_paths_match_naive_recomputation() {
        let leaves = synthetic(40);
        for n in 1..=leaves.len() {
            let tree = &leaves[..n];
            let r = naive_root(tree);
            for i in 0..n {
                let proof = inclusion_proof(i as u64, tree);
                assert_eq!(naive_root_from_path(i, n, tree[i], &proof), Some(r), "leaf {i} of {n}");
            }
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_up_to_64() {
        let leaves = synthetic(64);
        for n in 1..=64usize {
            let tree = &leaves[..n];
            let r = root(tree);
            for i in 0..n {
                let proof = inclusion_proof(i as u64, tree);
                assert!(
                    verify_inclusion(i as u64, n as u64, &tree[i], &proof, &r),
                    "leaf {i} of {n}"
                );
                // Sizes are authenticated by the signed head, not by the proof, so
                // only the leaf, the position and the path itself are probed here.
                let other = tree[(i + 1) % n];
                if other != tree[i] {
                    assert!(!verify_inclusion(i as u64, n as u64, &other, &proof, &r));
                }
                if n > 1 {
                    assert!(!verify_inclusion(i as u64, n as u64, &tree[i], &proof, &tree[i]));
                }
                if !proof.is_empty() {
                    assert!(!verify_inclusion(
                        i as u64,
                        n as u64,
                        &tree[i],
                        &proof[..proof.len() - 1],
                        &r
                    ));
                }
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_up_to_64() {
        let leaves = synthetic(64);
        for n in 1..=64usize {
            let rn = root(&leaves[..n]);
            for m in 1..=n {
                let rm = root(&leaves[..m]);
                let proof = consistency_proof(m as u64, &leaves[..n]);
                assert!(verify_consistency(m as u64, n as u64, &rm, &rn, &proof), "{m} -> {n}");
                let mut wrong_old = rm;
                wrong_old[31] ^= 1;
                assert!(
                    !verify_consistency(m as u64, n as u64, &wrong_old, &rn, &proof),
                    "changed old root {m} -> {n}"
                );
                let mut wrong_new = rn;
                wrong_new[0] ^= 1;
                assert!(
                    !verify_consistency(m as u64, n as u64, &rm, &wrong_new, &proof),
                    "changed new root {m} -> {n}"
                );
            }
        }
    }

    /// A range's tree hash from its perfect subtrees, each hashed from its leaves.
    fn range_hash(leaves: &[Hash], range: Range<u64>) -> Hash {
        let hashes: Vec<Hash> = perfect_subtrees(range)
            .into_iter()
            .map(|s| root(&leaves[s.start() as usize..s.end() as usize]))
            .collect();
        fold(&hashes).unwrap()
    }

    #[test]
    fn proofs_from_ranges_match_the_reference_proofs_up_to_80() {
        for n in 1..=80usize {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("r/{i}").as_bytes())).collect();
            for m in 0..n {
                let proof: Vec<Hash> = inclusion_ranges(m as u64, n as u64)
                    .into_iter()
                    .map(|r| range_hash(&leaves, r))
                    .collect();
                assert_eq!(proof, inclusion_proof(m as u64, &leaves), "inclusion {m} in {n}");
            }
            for m in 0..=n {
                let proof: Vec<Hash> = consistency_ranges(m as u64, n as u64)
                    .into_iter()
                    .map(|r| range_hash(&leaves, r))
                    .collect();
                assert_eq!(proof, consistency_proof(m as u64, &leaves), "consistency {m} -> {n}");
            }
        }
        assert!(inclusion_ranges(5, 5).is_empty());
        assert!(consistency_ranges(0, 5).is_empty());
        assert!(consistency_ranges(5, 5).is_empty());
    }

    #[test]
    fn a_frontier_is_rebuilt_from_the_hashes_of_its_perfect_subtrees() {
        let leaves: Vec<Hash> = (0..1_000u64).map(|i| leaf_hash(format!("f/{i}").as_bytes())).collect();
        for n in [0u64, 1, 2, 3, 255, 256, 257, 999, 1_000] {
            let parts: Vec<Hash> = perfect_subtrees(0..n)
                .into_iter()
                .map(|s| root(&leaves[s.start() as usize..s.end() as usize]))
                .collect();
            let frontier = Frontier::from_parts(n, parts.clone()).unwrap();
            assert_eq!(frontier, Frontier::from_leaves(&leaves[..n as usize]), "{n}");
            assert_eq!(frontier.root(), root(&leaves[..n as usize]));
            if !parts.is_empty() {
                assert_eq!(fold(&parts), Some(frontier.root()));
            }
        }
        assert!(Frontier::from_parts(3, vec![[0; 32]]).is_none());
    }

    #[test]
    fn the_frontier_collects_every_stored_node_once_with_its_hash() {
        let n = 5_000u64;
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("c/{i}").as_bytes())).collect();
        let mut frontier = Frontier::new();
        let mut completed = Vec::new();
        for leaf in &leaves {
            frontier.push_collecting(*leaf, &mut completed);
        }
        assert_eq!(frontier, Frontier::from_leaves(&leaves));
        assert_eq!(completed.len() as u64, stored_node_count(n));
        // 5,000 leaves: 19 subtrees of 256, 9 of 512, 4 of 1,024, 2 of 2,048, 1 of 4,096.
        assert_eq!(stored_node_count(n), 19 + 9 + 4 + 2 + 1);
        let mut seen = std::collections::HashSet::new();
        for (subtree, hash) in completed {
            assert!(subtree.level >= STORED_LEVEL && subtree.end() <= n, "{subtree:?}");
            assert!(seen.insert(subtree), "{subtree:?} twice");
            assert_eq!(hash, root(&leaves[subtree.start() as usize..subtree.end() as usize]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// What the log does: proofs of large trees from the nodes its writer
        /// stored (level 8 and up) and leaf hashes below them equal the
        /// reference proofs from every leaf.
        #[test]
        fn proofs_from_stored_nodes_equal_the_reference(
            n in 1u64..=6_000,
            m_pick in any::<proptest::sample::Index>(),
            salt in any::<u32>(),
        ) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("{salt}/{i}").as_bytes())).collect();
            let mut frontier = Frontier::new();
            let mut completed = Vec::new();
            for leaf in &leaves {
                frontier.push_collecting(*leaf, &mut completed);
            }
            let stored: std::collections::HashMap<Subtree, Hash> = completed.into_iter().collect();
            let hash_of = |s: Subtree| -> Hash {
                if s.level >= STORED_LEVEL {
                    // Every subtree a proof needs at these levels was stored.
                    *stored.get(&s).unwrap()
                } else {
                    // Below, the leaf hashes of one block: never more than 256.
                    assert!(s.end() - s.start() < 256);
                    root(&leaves[s.start() as usize..s.end() as usize])
                }
            };
            let prove = |ranges: Vec<Range<u64>>| -> Vec<Hash> {
                ranges
                    .into_iter()
                    .map(|r| fold(&perfect_subtrees(r).into_iter().map(hash_of).collect::<Vec<_>>()).unwrap())
                    .collect()
            };
            let m = m_pick.index(n as usize) as u64;
            prop_assert_eq!(prove(inclusion_ranges(m, n)), inclusion_proof(m, &leaves));
            prop_assert_eq!(prove(consistency_ranges(m + 1, n)), consistency_proof(m + 1, &leaves));
            // A proof needs O(log n) subtrees.
            let count: usize = inclusion_ranges(m, n).into_iter().map(|r| perfect_subtrees(r).len()).sum();
            prop_assert!(count <= 2 * 64, "{} subtrees", count);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A leaf changed anywhere, or two adjacent leaves swapped, never verifies
        /// against the original root, neither by inclusion nor by root.
        #[test]
        fn tampered_trees_never_verify(n in 2usize..=64, pick in any::<proptest::sample::Index>(), salt in any::<u64>()) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("{salt}/{i}").as_bytes())).collect();
            let r = root(&leaves);
            let i = pick.index(n);

            let forged = leaf_hash(format!("{salt}/forged").as_bytes());
            let mut changed = leaves.clone();
            changed[i] = forged;
            prop_assert_ne!(root(&changed), r);
            let proof = inclusion_proof(i as u64, &changed);
            prop_assert!(!verify_inclusion(i as u64, n as u64, &forged, &proof, &r));
            let honest_proof = inclusion_proof(i as u64, &leaves);
            prop_assert!(!verify_inclusion(i as u64, n as u64, &forged, &honest_proof, &r));

            let j = i.min(n - 2);
            let mut swapped = leaves.clone();
            swapped.swap(j, j + 1);
            prop_assert_ne!(root(&swapped), r);
            let proof = inclusion_proof(j as u64, &swapped);
            prop_assert!(!verify_inclusion(j as u64, n as u64, &swapped[j], &proof, &r));
            // The real leaf claimed at its neighbour's position does not verify either.
            let proof_j = inclusion_proof(j as u64, &leaves);
            prop_assert!(verify_inclusion(j as u64, n as u64, &leaves[j], &proof_j, &r));
            prop_assert!(!verify_inclusion(j as u64 + 1, n as u64, &leaves[j], &proof_j, &r));
        }

        /// Every consistency proof verifies, and a changed leaf in the old
        /// prefix makes the old root fail against the new tree.
        #[test]
        fn consistency_holds_and_rewrites_fail(n in 1usize..=64, m_pick in any::<proptest::sample::Index>(), salt in any::<u64>()) {
            let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("{salt}/{i}").as_bytes())).collect();
            let m = m_pick.index(n) + 1;
            let proof = consistency_proof(m as u64, &leaves);
            let rm = root(&leaves[..m]);
            let rn = root(&leaves);
            prop_assert!(verify_consistency(m as u64, n as u64, &rm, &rn, &proof));

            let mut rewritten = leaves.clone();
            rewritten[m - 1] = leaf_hash(b"rewritten");
            let rewritten_root = root(&rewritten);
            let proof = consistency_proof(m as u64, &rewritten);
            prop_assert!(!verify_consistency(m as u64, n as u64, &rm, &rewritten_root, &proof));
        }
    }
}
