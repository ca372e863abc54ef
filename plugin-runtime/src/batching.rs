//! A batch class's bounds applied: which queued items make the next batch.
//! One function, so that delivery and the dry run (`map --batch`) can never
//! pack differently.

use std::collections::HashSet;

use crate::BatchClass;

/// The indices of the items that make the next batch: in order, each one
/// that is `ready`, while the class's item count and byte bound hold (an
/// item's size counts with the class's per-item overhead), skipping any
/// whose dedupe key is already in the batch.
pub fn next_batch<'k>(
    class: &BatchClass,
    items: impl IntoIterator<Item = (usize, Option<&'k str>, bool)>,
) -> Vec<usize> {
    let mut taken = Vec::new();
    let mut keys = HashSet::new();
    let mut bytes = 0usize;
    for (index, (size, key, ready)) in items.into_iter().enumerate() {
        if taken.len() >= class.max_items as usize {
            break;
        }
        let size = size + class.item_overhead_bytes as usize;
        if !ready || bytes + size > class.max_bytes as usize || key.is_some_and(|k| keys.contains(k)) {
            continue;
        }
        if let Some(key) = key {
            keys.insert(key);
        }
        bytes += size;
        taken.push(index);
    }
    taken
}

/// Splits `items` into the ones at the `taken` indices (ascending, as
/// `next_batch` gives them) and the rest, each in order.
pub fn split_taken<T>(items: impl IntoIterator<Item = T>, taken: &[usize]) -> (Vec<T>, Vec<T>) {
    let mut taken = taken.iter().copied().peekable();
    let (mut batch, mut rest) = (Vec::with_capacity(taken.len()), Vec::new());
    for (index, item) in items.into_iter().enumerate() {
        if taken.next_if_eq(&index).is_some() {
            batch.push(item);
        } else {
            rest.push(item);
        }
    }
    (batch, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(max_items: u32, max_bytes: u32) -> BatchClass {
        BatchClass {
            name: "events".into(),
            max_items,
            max_bytes,
            item_overhead_bytes: 10,
            max_wait_ms: 1000,
            rate_class: "bulk".into(),
        }
    }

    #[test]
    fn a_batch_keeps_the_item_and_byte_bounds() {
        let items = (0..10).map(|_| (40, None, true));
        assert_eq!(next_batch(&class(3, 1000), items.clone()), [0, 1, 2]);
        // 50 bytes each with the overhead: four fit in 200.
        assert_eq!(next_batch(&class(100, 200), items), [0, 1, 2, 3]);
    }

    #[test]
    fn a_repeated_dedupe_key_waits_for_the_next_batch() {
        let items = [
            (1, Some("a"), true),
            (1, Some("a"), true),
            (1, Some("b"), true),
            (1, None, true),
        ];
        assert_eq!(next_batch(&class(10, 1000), items), [0, 2, 3]);
    }

    #[test]
    fn splitting_keeps_both_sides_in_order() {
        assert_eq!(
            split_taken(["a", "b", "c", "d"], &[0, 2]),
            (vec!["a", "c"], vec!["b", "d"])
        );
    }

    #[test]
    fn items_not_ready_and_too_large_are_passed_over() {
        let items = [(1, None, false), (5000, None, true), (1, None, true)];
        assert_eq!(next_batch(&class(10, 1000), items), [2]);
    }
}
