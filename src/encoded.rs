//! Encoded results, kept per backend.
//!
//! Building a result `jsonb` costs more than evaluating the flag. A
//! successful result is fully determined by the flag, the variant, the
//! reason, the rule and the detail, which live in the compiled snapshot
//! (or are one of a few constants), so the
//! first encoding of each combination is kept and later calls copy bytes.
//! Errors carry their own messages and are always built afresh.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use rustc_hash::FxBuildHasher;

use crate::postgres::jsonb::BuiltJsonb;
use flagship_engine::rules::{Denial, Reason, Resolution, Snapshot};

/// Identifies a result by where its parts live in the snapshot: the
/// addresses stay valid, and unique, while the memo holds the snapshot.
#[derive(PartialEq, Eq, Hash)]
struct ResultKey {
    flag: usize,
    variant: usize,
    reason: Reason,
    rule: usize,
    detail: Option<Denial>,
}

struct Memo {
    snapshot: Rc<Snapshot>,
    results: HashMap<ResultKey, Box<[u8]>, FxBuildHasher>,
}

/// Beyond this many distinct results (flags x variants x rules), start over.
const MAX_RESULTS: usize = 4096;

thread_local! {
    static MEMO: RefCell<Option<Memo>> = const { RefCell::new(None) };
}

/// The result `jsonb` of any resolution, built afresh.
pub fn build(resolution: &Resolution) -> BuiltJsonb {
    BuiltJsonb::from_value(&resolution.to_json())
}

/// The result `jsonb` of a resolution made from `snapshot`.
pub fn encode(snapshot: &Rc<Snapshot>, resolution: &Resolution) -> BuiltJsonb {
    if resolution.error.is_some() {
        return build(resolution);
    }
    let address = |text: Option<&str>| text.map_or(0, |text| text.as_ptr() as usize);
    let key = ResultKey {
        flag: resolution.key.as_ptr() as usize,
        variant: address(resolution.variant),
        reason: resolution.reason,
        rule: address(resolution.rule),
        detail: resolution.detail,
    };
    MEMO.with(|memo| {
        let mut memo = memo.borrow_mut();
        let memo = match memo.as_mut() {
            Some(memo) if Rc::ptr_eq(&memo.snapshot, snapshot) => memo,
            _ => memo.insert(Memo {
                snapshot: snapshot.clone(),
                results: HashMap::default(),
            }),
        };
        if let Some(bytes) = memo.results.get(&key) {
            return BuiltJsonb::from_bytes(bytes);
        }
        let built = build(resolution);
        if memo.results.len() >= MAX_RESULTS {
            memo.results.clear();
        }
        memo.results.insert(key, built.to_bytes());
        built
    })
}
